"""Fault injection for game days: errors or latency in a share of an integration's attempts.

Off unless RESILIENCE_FAULT_INJECTION is on. An injection is set by an
operator (``Integration.inject_fault``) and carried by the policy with its end
time, so it expires by itself in every process without a query. A fault is
applied inside the attempt, as the upstream would misbehave: injected latency
counts against the attempt timeout, an injected error is a SERVER_ERROR and
goes through retries, the breaker and fallbacks like a real one.
"""

from __future__ import annotations

import random
from typing import Callable

from ..errors import ErrorCategory, ResilienceError
from .policy import Policy


def fault_active(policy: Policy, now: float) -> bool:
    return now < policy.fault_until and (policy.fault_error_percent > 0 or policy.fault_latency_ms > 0)


def with_fault(fn: Callable, policy: Policy, rng: random.Random, sleep: Callable[[float], None]) -> Callable:
    """``fn`` as the injection would have it behave (sync; for coroutines see ``with_async_fault``)."""

    def faulty(*args, **kwargs):
        if policy.fault_latency_ms:
            sleep(policy.fault_latency_ms / 1000)
        _maybe_fail(policy, rng)
        return fn(*args, **kwargs)

    return faulty


def with_async_fault(fn: Callable, policy: Policy, rng: random.Random, asleep) -> Callable:
    async def faulty(*args, **kwargs):
        if policy.fault_latency_ms:
            await asleep(policy.fault_latency_ms / 1000)
        _maybe_fail(policy, rng)
        return await fn(*args, **kwargs)

    return faulty


def _maybe_fail(policy: Policy, rng: random.Random) -> None:
    if policy.fault_error_percent and rng.random() * 100 < policy.fault_error_percent:
        raise ResilienceError(ErrorCategory.SERVER_ERROR, f"injected fault ({policy.fault_error_percent:g}% of calls)",
                              integration=policy.name, injected=True)

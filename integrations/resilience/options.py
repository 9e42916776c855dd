"""Per-call options, and deadlines that flow from an inbound request into the calls made for it.

    execute("billing", charge, order, call_options=CallOptions(timeout_ms=2_000, max_retries=1))
    execute("reports", fetch, report_id, call_options=CallOptions(retry_if_result=lambda r: r["status"] == "pending"))

    with deadline(1.5):        # every guarded call in the block ends within 1.5 s from here
        ...

``CallOptions`` overrides the integration's timeouts and retries for one call (validated by the
same knobs as the Integration's fields: a bad value names the field), and says what to retry
beyond the integration's ``retry_on`` categories: ``retry_if_result`` retries a call whose value
is not yet the wanted one (the last value is returned once the retries are spent), and
``retry_if_error`` narrows which failures of a retryable category may be retried (the http
Client uses it for a POST without an idempotency key: only when the request surely never left).

``deadline(seconds)`` sets the time by which every guarded call made in the block (this
context: the thread, or the task and the tasks it starts) must end; nested deadlines keep the
earliest. ``integrations.inbound.RequestDeadlineMiddleware`` sets one per inbound request from
``RESILIENCE_REQUEST_BUDGETS``. A call made with less time left than its own ``timeout_ms``
gets only what is left, and one made after the deadline is refused with TIMEOUT before any
attempt.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import time
from dataclasses import dataclass
from typing import Any, Callable

from .policy import KNOBS, InvalidPolicy, Policy

_OVERRIDABLE = ("timeout_ms", "attempt_timeout_ms", "max_retries")
_KNOBS = {knob.name: knob for knob in KNOBS if knob.name in _OVERRIDABLE}

# When (time.monotonic()) the calls of the current context must have ended; None: no deadline.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("resilience_deadline", default=None)


# Policies with a call's overrides, by (the policy's id, the overrides): a call with the same
# options on the same policy reuses its copy (the policy itself is kept to tell a reused id apart).
_APPLIED: dict[tuple, tuple[Policy, Policy]] = {}
_APPLIED_MAX = 1024


@dataclass(frozen=True, slots=True)
class CallOptions:
    """One call's overrides of its integration's policy, and what else to retry."""

    timeout_ms: int | None = None
    attempt_timeout_ms: int | None = None
    max_retries: int | None = None
    retry_if_result: Callable[[Any], bool] | None = None
    retry_if_error: Callable[[Any], bool] | None = None
    hedge: bool = True  # False: no hedged attempt for this call (a request a second copy must not repeat)

    def __post_init__(self) -> None:
        errors = {name: problem for name in _OVERRIDABLE
                  if getattr(self, name) is not None and (problem := _KNOBS[name].problem(getattr(self, name)))}
        if not isinstance(self.hedge, bool):
            errors["hedge"] = f"Expected true or false, got {self.hedge!r}."
        for name in ("retry_if_result", "retry_if_error"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                errors[name] = f"Expected a callable, got {value!r}."
        if errors:
            raise InvalidPolicy("call_options", errors)

    def applied_to(self, policy: Policy) -> Policy:
        """``policy`` with this call's overrides (the same policy when there are none).

        The overrides were checked against their knobs when the options were made: the copy is
        not validated again (a Policy's validation of every knob would cost more than the call).
        """
        changes = tuple((name, getattr(self, name)) for name in _OVERRIDABLE if getattr(self, name) is not None)
        if not changes:
            return policy
        key = (id(policy), changes)
        cached = _APPLIED.get(key)
        if cached is not None and cached[0] is policy:
            return cached[1]
        applied = copy.copy(policy)
        for name, value in changes:
            object.__setattr__(applied, name, value)
        if len(_APPLIED) >= _APPLIED_MAX:
            _APPLIED.clear()  # policies are reloaded now and then: old entries must not pile up
        _APPLIED[key] = (policy, applied)
        return applied


def call_options(value) -> CallOptions | None:
    """``value`` checked: a CallOptions or None, else a TypeError that says what to pass."""
    if value is None or isinstance(value, CallOptions):
        return value
    raise TypeError(f"call_options must be integrations.resilience.CallOptions(...), got {value!r}")


@contextlib.contextmanager
def deadline(seconds: float):
    """Every guarded call made in the block ends within ``seconds`` from now (or an earlier deadline)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds != seconds:
        raise TypeError(f"deadline() takes seconds as a number, got {seconds!r}")
    ends = time.monotonic() + seconds
    current = _deadline.get()
    token = _deadline.set(ends if current is None else min(current, ends))
    try:
        yield
    finally:
        _deadline.reset(token)


def time_left() -> float | None:
    """Seconds left before the current context's deadline (negative once past), or None without one."""
    ends = _deadline.get()
    return None if ends is None else ends - time.monotonic()

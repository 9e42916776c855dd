"""Retry: which failures are retried, and how long to wait before each retry.

Delay before retry n = min(base_delay_ms x backoff_multiplier^(n-1),
max_delay_ms), with full jitter (a uniform draw in [0, delay]) when the policy
asks for it (backoff.py, the formula the dead letter queue's redrives use too). A Retry-After from the upstream replaces the computed delay,
capped at max_delay_ms. No retry is started whose delay would end at or past
the call's deadline. The retry budget is checked by the state store.
"""

from __future__ import annotations

import email.utils
import random
import time

from ..errors import ResilienceError
from .backoff import FULL_JITTER, NO_JITTER, jittered
from .policy import Policy


def retry_delay_s(policy: Policy, retry_number: int, error: ResilienceError | None, rng: random.Random) -> float:
    """Seconds to wait before retry ``retry_number`` (1-based) after ``error`` (None: a value to retry)."""
    if error is not None and error.retry_after is not None:
        return min(max(error.retry_after, 0.0), policy.max_delay_ms / 1000)
    return jittered(policy.backoff_ms(retry_number), rng, FULL_JITTER if policy.jitter else NO_JITTER) / 1000


def should_retry(policy: Policy, retry_number: int, error: ResilienceError) -> bool:
    """Whether the failure is of a kind the policy retries (``retry_on``), at a count that allows a retry."""
    return retry_number <= policy.max_retries and policy.retries(error.category)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # an unreadable header is ignored: the policy's backoff applies
    if when is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)

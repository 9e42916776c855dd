"""Exponential backoff with jitter: the one formula the engine's retries and the dead letter
queue's redrives both use.

    delay(n) = min(base x multiplier^(n-1), ceiling)       n = 1, 2, ...

then jittered: FULL draws uniformly in [0, delay] (the engine's retries: callers in a burst
spread out the most), EQUAL in [delay/2, delay] (the redrives: spread out, yet never back at once).
Each caller decides what a Retry-After from the upstream does (retry.py replaces the delay with
it, the redrive takes it as a floor).
"""

from __future__ import annotations

import random

FULL_JITTER = "full"
EQUAL_JITTER = "equal"
NO_JITTER = "none"


def exponential(n: int, base: float, multiplier: float, ceiling: float) -> float:
    """The un-jittered delay before attempt ``n`` + 1 (``n`` >= 1), in the units of ``base``."""
    return min(base * multiplier ** max(n - 1, 0), ceiling)


def jittered(delay: float, rng: random.Random, jitter: str) -> float:
    """``delay`` drawn according to ``jitter`` (FULL_JITTER, EQUAL_JITTER or NO_JITTER)."""
    if jitter == FULL_JITTER:
        return rng.uniform(0.0, delay)
    if jitter == EQUAL_JITTER:
        return rng.uniform(delay / 2, delay)
    if jitter == NO_JITTER:
        return delay
    raise ValueError(f"unknown jitter {jitter!r}; expected {FULL_JITTER}, {EQUAL_JITTER} or {NO_JITTER}")

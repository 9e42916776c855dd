"""Circuit breaker: the state machine of one integration.

CLOSED -> OPEN after ``failure_threshold`` consecutive failures, or when the
failure rate (or slow-call rate) over the window reaches its threshold once
``minimum_calls`` were made in it. The window is the last ``window_size``
calls, or with ``window_type="time"`` the calls of the last
``window_duration_s`` seconds (resilience4j's TIME_BASED window: per-bucket
partial counts, at most MAX_BUCKETS of them, see time_buckets). OPEN refuses calls until
``reset_timeout_s`` has passed, then HALF_OPEN admits at most
``half_open_max_calls`` trial calls at once; ``success_threshold`` consecutive
successes close it, any failure reopens it. Metrics are reset on every
transition, as resilience4j does.

The cell is not thread-safe by itself: the state store holds a lock around it.
The retry budget lives here because it is measured over the breaker's window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .policy import MODE_FORCED_CLOSED, MODE_FORCED_OPEN, MODE_METRICS_ONLY, WINDOW_TIME, Policy

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
STATES = (CLOSED, OPEN, HALF_OPEN)

# What admit() decided.
REFUSED = 0
ADMITTED = 1
TRIAL = 2  # admitted as one of the half-open trial calls: holds a slot

# What a finished attempt was, for the breaker.
SUCCESS = "success"
FAILURE = "failure"
IGNORED = "ignored"  # the caller's fault (client error, validation): counts as neither

# A time window is kept in at most this many buckets: one a second up to a minute, a longer window in
# wider ones, so what a call costs does not grow with the window (state.lua keeps the same buckets).
MAX_BUCKETS = 60


def time_buckets(duration_s: int) -> tuple[int, float]:
    """A time window's (number of buckets, bucket width in seconds).

    A call is counted in the bucket of when it was recorded, numbered floor(t / width), and
    leaves the window once its bucket is that many buckets old: between duration - width and
    duration seconds later.
    """
    count = min(duration_s, MAX_BUCKETS)
    return count, duration_s / count


def bucket_number(duration_s: int, t: float) -> int:
    """The number of the bucket a call recorded at ``t`` counts in, in a time window of ``duration_s``."""
    return math.floor(t / time_buckets(duration_s)[1])


def effective_state(mode: str, own_state: str) -> str:
    """The state callers meet: a forced mode overrides the breaker's own."""
    return OPEN if mode == MODE_FORCED_OPEN else CLOSED if mode == MODE_FORCED_CLOSED else own_state

@dataclass(frozen=True, slots=True)
class Transition:
    integration: str
    from_state: str
    to_state: str
    reason: str
    at: float
    by: str | None = None  # the operator, for manual transitions


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    integration: str
    state: str
    mode: str
    opened_at: float | None
    changed_at: float | None
    consecutive_failures: int
    consecutive_successes: int
    half_open_in_flight: int
    window_calls: int
    window_failures: int
    window_slow: int
    window_retries: int
    extra: dict = field(default_factory=dict)

    @property
    def failure_rate(self) -> float | None:
        return 100.0 * self.window_failures / self.window_calls if self.window_calls else None


class BreakerCell:
    __slots__ = (
        "integration",
        "state",
        "opened_at",
        "changed_at",
        "consecutive_failures",
        "consecutive_successes",
        "half_open_in_flight",
        "retries_in_flight",
        "_ring",
        "_pos",
        "_duration",
        "_width",
        "_head",
        "count",
        "failures",
        "slows",
        "retries",
        "_fitted",
    )

    # A count window's ring slot packs one attempt: bit 0 failed, bit 1 slow, bit 2 retry. A time
    # window's ring holds one bucket a slot, [calls, failures, slow, retries], bucket number _head
    # (the newest) in slot _head % len(_ring); _duration is 0 for a count window.
    def __init__(self, integration: str, window_size: int, window_duration_s: int = 0) -> None:
        self.integration = integration
        self.state = CLOSED
        self.opened_at: float | None = None
        self.changed_at: float | None = None
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.half_open_in_flight = 0
        self.retries_in_flight = 0  # admitted retries not yet recorded: they count against the budget now
        self._fitted: Policy | None = None  # the policy the window was last made to fit
        self._reset_window(window_size, window_duration_s)

    # -- decisions -----------------------------------------------------------

    def admit(self, policy: Policy, now: float) -> tuple[int, Transition | None]:
        mode = policy.mode
        if mode == MODE_FORCED_OPEN:
            return REFUSED, None
        if mode == MODE_FORCED_CLOSED:
            return ADMITTED, None
        transition = None
        if self.state == OPEN:
            if now - self.opened_at < policy.reset_timeout_s:
                return (ADMITTED if mode == MODE_METRICS_ONLY else REFUSED), None
            transition = self._move(HALF_OPEN, "reset timeout elapsed", now)
        if self.state == HALF_OPEN:
            if self.half_open_in_flight >= policy.half_open_max_calls:
                return (ADMITTED if mode == MODE_METRICS_ONLY else REFUSED), transition
            self.half_open_in_flight += 1
            return TRIAL, transition
        return ADMITTED, transition

    def retry_allowed(self, policy: Policy, now: float) -> bool:
        """Whether one more retry stays within the retry budget.

        Retries admitted but not yet recorded count too: retries admitted at
        the same moment (a fleet retrying at once) must not all be judged
        against the same count.
        """
        budget = policy.retry_budget_percent
        if budget is None:
            return True
        if self._fit_window(policy):
            self._advance(now)
        if self.count < policy.minimum_calls:
            return True
        calls = self.count + self.retries_in_flight + 1
        if not self._duration:  # a count window holds no more than its size
            calls = min(calls, len(self._ring))
        return (self.retries + self.retries_in_flight + 1) * 100 <= budget * calls

    def record(
        self, policy: Policy, now: float, outcome: str, slow: bool, trial: bool, is_retry: bool
    ) -> Transition | None:
        if trial and self.half_open_in_flight > 0:
            self.half_open_in_flight -= 1
        if is_retry and self.retries_in_flight > 0:
            self.retries_in_flight -= 1
        timed = self._fit_window(policy)
        if outcome == IGNORED:
            return None
        failed = outcome == FAILURE
        if timed:
            self._advance(now)
            self._count_in_bucket(failed, slow, is_retry)
        else:
            self._push(failed, slow, is_retry)
        if failed:
            self.consecutive_failures += 1
            self.consecutive_successes = 0
        else:
            self.consecutive_failures = 0
            self.consecutive_successes += 1
        if policy.mode in (MODE_FORCED_OPEN, MODE_FORCED_CLOSED):
            return None
        if self.state == HALF_OPEN:
            if not (trial or policy.mode == MODE_METRICS_ONLY):
                return None  # a straggler admitted before the trip says nothing of recovery
            if failed:
                return self._trip("trial call failed in half-open", now)
            if self.consecutive_successes >= policy.success_threshold:
                return self._move(CLOSED, f"{self.consecutive_successes} consecutive successes in half-open", now)
            return None
        if self.state == CLOSED:
            return self._closed_verdict(policy, now)
        return None

    def _closed_verdict(self, policy: Policy, now: float) -> Transition | None:
        if self.consecutive_failures >= policy.failure_threshold:
            return self._trip(f"{self.consecutive_failures} consecutive failures", now)
        if self.count < policy.minimum_calls:
            return None
        rate = policy.failure_rate_threshold
        if rate and self.failures * 100 >= rate * self.count:
            return self._trip(f"failure rate {100 * self.failures / self.count:.0f}% >= {rate:g}% over "
                              f"{self._calls_text()}", now)
        slow_rate = policy.slow_call_rate_threshold
        if slow_rate and self.slows * 100 >= slow_rate * self.count:
            return self._trip(f"slow call rate {100 * self.slows / self.count:.0f}% >= {slow_rate:g}% over "
                              f"{self._calls_text()}", now)
        return None

    def _calls_text(self) -> str:
        """The window a rate was measured over, for a transition's reason (state.lua says the same)."""
        if self._duration:
            return f"{self.count} calls in the last {self._duration} s"
        return f"{self.count} calls"

    # -- operator actions ----------------------------------------------------

    def reset(self, now: float, by: str | None, reason: str = "manual reset") -> Transition | None:
        self.half_open_in_flight = 0
        transition = self._move(CLOSED, reason, now, by)
        return transition if transition.from_state != CLOSED else None

    def snapshot(self, policy: Policy, now: float) -> BreakerSnapshot:
        """The state and the window's counts as of ``now`` (a time window's old buckets aged out)."""
        if self._fit_window(policy):
            self._advance(now)
        return BreakerSnapshot(
            integration=self.integration, state=self.state, mode=policy.mode,
            opened_at=self.opened_at, changed_at=self.changed_at,
            consecutive_failures=self.consecutive_failures, consecutive_successes=self.consecutive_successes,
            half_open_in_flight=self.half_open_in_flight,
            window_calls=self.count, window_failures=self.failures, window_slow=self.slows,
            window_retries=self.retries)

    # -- internals -----------------------------------------------------------

    def _trip(self, reason: str, now: float) -> Transition:
        self.opened_at = now
        return self._move(OPEN, reason, now)

    def _move(self, to_state: str, reason: str, now: float, by: str | None = None) -> Transition:
        transition = Transition(self.integration, self.state, to_state, reason, now, by)
        self.state = to_state
        self.changed_at = now
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.retries_in_flight = 0
        if to_state != OPEN:
            self.opened_at = self.opened_at if to_state == HALF_OPEN else None
        self._reset_window(len(self._ring), self._duration)
        return transition

    def _fit_window(self, policy: Policy) -> bool:
        """Make the window the policy's (a saved policy may change it: the counts start again);
        True for a time window."""
        if policy is self._fitted:  # the same policy as the last call's: the window fits it
            return policy.window_type == WINDOW_TIME
        self._fitted = policy
        if policy.window_type == WINDOW_TIME:
            if self._duration != policy.window_duration_s:
                self._reset_window(policy.window_size, policy.window_duration_s)
            return True
        if self._duration or len(self._ring) != policy.window_size:
            self._reset_window(policy.window_size)
        return False

    def _reset_window(self, size: int, duration: int = 0) -> None:
        self._duration = duration
        if duration:
            buckets, self._width = time_buckets(duration)
            self._ring = [[0, 0, 0, 0] for _ in range(buckets)]
        else:
            self._width = 0.0
            self._ring = [0] * max(size, 1)
        self._head = None  # a time window's newest bucket number: none yet
        self._pos = 0
        self.count = 0
        self.failures = 0
        self.slows = 0
        self.retries = 0

    def _advance(self, now: float) -> None:
        """Move a time window on to ``now``'s bucket: the buckets it passes are emptied, their
        calls leave the counts. A clock that stepped back counts in the newest bucket."""
        number = math.floor(now / self._width)
        head = self._head
        if head is None:
            self._head = number
            return
        if number <= head:
            return
        ring = self._ring
        size = len(ring)
        for passed in range(max(head + 1, number - size + 1), number + 1):
            bucket = ring[passed % size]
            if bucket[0]:
                self.count -= bucket[0]
                self.failures -= bucket[1]
                self.slows -= bucket[2]
                self.retries -= bucket[3]
                bucket[:] = (0, 0, 0, 0)
        self._head = number

    def _count_in_bucket(self, failed: bool, slow: bool, is_retry: bool) -> None:
        bucket = self._ring[self._head % len(self._ring)]
        bucket[0] += 1
        bucket[1] += failed
        bucket[2] += slow
        bucket[3] += is_retry
        self.count += 1
        self.failures += failed
        self.slows += slow
        self.retries += is_retry

    def _push(self, failed: bool, slow: bool, is_retry: bool) -> None:
        ring, pos = self._ring, self._pos
        bits = failed | (slow << 1) | (is_retry << 2)
        if self.count == len(ring):  # full: the attempt replaces the oldest, whose flags leave the counts
            old = ring[pos]
            if old != bits:  # (the same flags in and out, as success after success: the counts stay)
                self.failures += failed - (old & 1)
                self.slows += slow - ((old >> 1) & 1)
                self.retries += is_retry - ((old >> 2) & 1)
        else:
            self.count += 1
            self.failures += failed
            self.slows += slow
            self.retries += is_retry
        ring[pos] = bits
        pos += 1
        self._pos = 0 if pos == len(ring) else pos

"""An integration's policy: the immutable configuration the engine runs on.

The ORM model (``integrations.models.Integration``) stores the knobs and turns
them into a :class:`Policy`; the engine only ever sees policies, never rows.
The presets per kind live here so the model and the engine share one source.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODE_NORMAL = "normal"
MODE_METRICS_ONLY = "metrics_only"
MODE_FORCED_OPEN = "forced_open"
MODE_FORCED_CLOSED = "forced_closed"
MODES = (MODE_NORMAL, MODE_METRICS_ONLY, MODE_FORCED_OPEN, MODE_FORCED_CLOSED)

# How a sync operation's timeout is enforced.
# "thread": the operation runs in a worker thread and the caller stops waiting
#   at the timeout (the caller is never kept waiting; costs a thread hand-off).
# "inline": the operation runs in the caller's thread; for operations that
#   enforce their own timeouts (httpx, a database statement_timeout). An
#   attempt that overruns still counts as TIMEOUT and its value is discarded.
TIMEOUT_THREAD = "thread"
TIMEOUT_INLINE = "inline"
TIMEOUT_ENFORCEMENTS = (TIMEOUT_THREAD, TIMEOUT_INLINE)

KINDS = ("database", "ai_service", "market_data", "cache", "external_api")


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    kind: str = "external_api"
    # Circuit breaker
    mode: str = MODE_NORMAL
    failure_threshold: int = 5
    failure_rate_threshold: float = 50.0  # percent; 0 disables the rule
    slow_call_rate_threshold: float = 100.0  # percent; 0 disables the rule
    slow_call_ms: int = 5_000
    window_size: int = 20
    minimum_calls: int = 10
    reset_timeout_s: float = 30.0
    half_open_max_calls: int = 1
    success_threshold: int = 2
    # Retry
    max_retries: int = 3
    base_delay_ms: int = 500
    max_delay_ms: int = 10_000
    backoff_multiplier: float = 2.0
    jitter: bool = True
    retry_budget_percent: float | None = 20.0  # None: no budget
    # Timeouts
    attempt_timeout_ms: int = 5_000
    timeout_ms: int = 30_000
    timeout_enforcement: str = TIMEOUT_THREAD
    # Bulkhead
    max_concurrent: int = 20
    bulkhead_wait_ms: int = 0
    # Quota (None: no limit)
    hourly_limit: int | None = None
    daily_limit: int | None = None
    # Cache
    cache_ttl_s: int = 0
    cache_version: int = 0  # bumped to clear the integration's cache without scanning keys
    revision: float = 0.0  # when the policy was last saved: a shared store tells processes holding an older one
    # Fault injection for game days (set from an active FaultInjection; applied only when
    # RESILIENCE_FAULT_INJECTION is on): until when, errors in what % of attempts, added latency.
    fault_until: float = 0.0
    fault_error_percent: float = 0.0
    fault_latency_ms: int = 0
    # Degraded mode: share of calls let through, in (0, 1]
    capacity: float = 1.0

    @property
    def attempts(self) -> int:
        return 1 + self.max_retries

    def backoff_ms(self, retry_number: int) -> float:
        """The un-jittered delay before retry ``retry_number`` (1-based)."""
        delay = self.base_delay_ms * self.backoff_multiplier ** (retry_number - 1)
        return min(delay, self.max_delay_ms)

    def worst_case_ms(self) -> float:
        """Longest a call can take if every attempt times out: used by checks."""
        backoff = sum(self.backoff_ms(n) for n in range(1, self.max_retries + 1))
        return self.attempts * self.attempt_timeout_ms + backoff

    def replace(self, **changes) -> Policy:
        return dataclasses.replace(self, **changes)


NOT_KNOBS = ("name", "kind", "cache_version", "revision", "fault_until", "fault_error_percent", "fault_latency_ms")
KNOB_NAMES = tuple(f.name for f in dataclasses.fields(Policy) if f.name not in NOT_KNOBS)

_BASE = {name: Policy.__dataclass_fields__[name].default for name in KNOB_NAMES}

# The defaults a new integration of each kind starts from.
KIND_PRESETS: dict[str, dict] = {
    "external_api": dict(_BASE),
    "database": {
        **_BASE,
        "max_retries": 3,
        "base_delay_ms": 200,
        "backoff_multiplier": 2.0,
        "max_delay_ms": 2_000,
        "jitter": True,
        "failure_threshold": 5,
        "success_threshold": 2,
        "attempt_timeout_ms": 5_000,
        "timeout_ms": 30_000,
        "slow_call_ms": 1_000,
    },
    "ai_service": {
        **_BASE,
        "max_retries": 3,
        "base_delay_ms": 1_000,
        "backoff_multiplier": 1.5,
        "max_delay_ms": 10_000,
        "failure_threshold": 3,
        "success_threshold": 2,
        "attempt_timeout_ms": 12_000,
        "timeout_ms": 60_000,
        "slow_call_ms": 20_000,
        "reset_timeout_s": 60.0,
        "max_concurrent": 10,
    },
    "market_data": {
        **_BASE,
        "max_retries": 2,
        "base_delay_ms": 200,
        "backoff_multiplier": 2.0,
        "max_delay_ms": 2_000,
        "failure_threshold": 10,
        "success_threshold": 5,
        "attempt_timeout_ms": 3_000,
        "timeout_ms": 10_000,
        "slow_call_ms": 1_000,
        "window_size": 50,
        "minimum_calls": 20,
    },
    "cache": {
        **_BASE,
        "max_retries": 1,
        "base_delay_ms": 50,
        "backoff_multiplier": 2.0,
        "max_delay_ms": 500,
        "failure_threshold": 20,
        "success_threshold": 10,
        "attempt_timeout_ms": 1_000,
        "timeout_ms": 5_000,
        "slow_call_ms": 100,
        "window_size": 100,
        "minimum_calls": 50,
        "reset_timeout_s": 10.0,
        "max_concurrent": 50,
    },
}


def preset(kind: str) -> dict:
    """A copy of the knob defaults for ``kind``."""
    try:
        return dict(KIND_PRESETS[kind])
    except KeyError:
        raise ValueError(f"unknown integration kind {kind!r}; expected one of {', '.join(KINDS)}") from None

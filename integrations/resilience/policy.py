"""An integration's policy: the immutable configuration the engine runs on.

The ORM model (``integrations.models.Integration``) stores the knobs and turns
them into a :class:`Policy`; the engine only ever sees policies, never rows.
The knobs are declared once, on the Policy's fields (``knob(default, group, bounds...)``): the
model's fields, the admin's fieldsets, the checks of the import command and the API, and the
Policy's own validation are built from them. The presets per kind live here too, so the model
and the engine share one source.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field

from ..errors import ErrorCategory
from .backoff import exponential

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

# How the bulkhead's limit is set: max_concurrent, or following the upstream's latency (bulkhead.AdaptiveLimit).
BULKHEAD_FIXED = "fixed"
BULKHEAD_ADAPTIVE = "adaptive"

# What the breaker's failure and slow-call rates are measured over: the last window_size calls, or the calls of
# the last window_duration_s seconds (resilience4j's COUNT_BASED and TIME_BASED sliding windows).
WINDOW_COUNT = "count"
WINDOW_TIME = "time"

KINDS = ("database", "ai_service", "market_data", "cache", "external_api")


# The knob groups, in the order the admin shows them.
BREAKER, RETRY, TIMEOUTS, BULKHEAD, QUOTA, RATE_LIMIT, CACHE, DEGRADED = (
    "Circuit breaker", "Retry", "Timeouts", "Bulkhead", "Quota", "Rate limit", "Cache", "Degraded mode")
KNOB_GROUPS = (BREAKER, RETRY, TIMEOUTS, BULKHEAD, QUOTA, RATE_LIMIT, CACHE, DEGRADED)


@dataclass(frozen=True)
class Knob:
    """What one tunable field of a Policy accepts: declared once, on the Policy field itself.

    The Integration model's fields, the admin's fieldsets, the import command's and the API's
    checks (through the model) and Policy's own validation are all built from these.
    """

    group: str
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound
    maximum: float | None = None  # inclusive
    choices: tuple[tuple[str, str], ...] = ()  # (value, label)
    many: bool = False  # a comma-separated set of the choices (at least one)
    help: str = ""
    message: str = ""  # what an out-of-bounds value is told (default: from the bounds)
    name: str = ""  # set from the Policy field
    type: type = object  # int, float, bool or str, set from the Policy field's annotation
    optional: bool = False  # None is allowed (``int | None``): no limit, no budget

    @property
    def bounds_message(self) -> str:
        if self.message:
            return self.message
        low = f"greater than {self.above:g}" if self.above is not None else (
            f"at least {self.minimum:g}" if self.minimum is not None else "")
        if low and self.maximum is not None:
            if self.minimum is not None:
                return f"Must be between {self.minimum:g} and {self.maximum:g}."
            return f"Must be {low} and at most {self.maximum:g}."
        return f"Must be {low}." if low else f"Must be at most {self.maximum:g}."

    def problem(self, value) -> str | None:
        """Why ``value`` does not fit this knob, or None."""
        if value is None:
            return None if self.optional else "This field cannot be null."
        if self.type is bool:
            fits, expected = isinstance(value, bool), "true or false"
        elif self.type is int:
            fits, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif self.type is float:
            fits = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            expected = "a finite number"
        else:
            fits, expected = isinstance(value, str), "a string"
        if not fits:
            return f"Expected {expected}, got {value!r}."
        if self.many:
            return self._set_problem(value)
        if self.choices and value not in (choice for choice, _ in self.choices):
            return f"Unknown value {value!r}; expected one of {', '.join(choice for choice, _ in self.choices)}."
        if self.type in (int, float) and ((self.minimum is not None and value < self.minimum)
                                          or (self.above is not None and value <= self.above)
                                          or (self.maximum is not None and value > self.maximum)):
            return self.bounds_message
        return None


    def _set_problem(self, value: str) -> str | None:
        names = [name.strip() for name in value.split(",") if name.strip()]
        allowed = [choice for choice, _ in self.choices]
        unknown = [name for name in names if name not in allowed]
        if unknown:
            return f"Unknown value {', '.join(map(repr, unknown))}; expected some of {', '.join(allowed)}."
        if not names:
            return self.message or f"Name at least one of {', '.join(allowed)}."
        return None


@functools.lru_cache(maxsize=256)
def name_set(value: str) -> frozenset[str]:
    """A ``many`` knob's value as a set of names."""
    return frozenset(name.strip() for name in value.split(",") if name.strip())


def knob(default, group: str, **spec):
    """A Policy field that operators tune (see Knob)."""
    return field(default=default, metadata={"knob": Knob(group, **spec)})


_PERCENT = {"minimum": 0, "maximum": 100}

# The failures a retry may be asked for: what an attempt that reached (or tried to reach) the upstream
# can end with. VALIDATION is the caller's, and the pipeline's refusals are never retried.
RETRIABLE_CATEGORIES = (ErrorCategory.TIMEOUT, ErrorCategory.RATE_LIMIT, ErrorCategory.NETWORK,
                        ErrorCategory.SERVER_ERROR, ErrorCategory.CLIENT_ERROR, ErrorCategory.UNKNOWN)
RETRY_BY_DEFAULT = frozenset(category for category in RETRIABLE_CATEGORIES if category.retryable)


class InvalidPolicy(ValueError):
    """A Policy built with values its knobs do not accept; ``errors`` maps each field to why."""

    def __init__(self, name: str, errors: dict[str, str]) -> None:
        self.errors = errors
        super().__init__(f"invalid policy {name!r}: " + "; ".join(f"{key}: {message}" for key, message in errors.items()))


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    kind: str = "external_api"
    # Circuit breaker
    mode: str = knob(MODE_NORMAL, BREAKER, choices=tuple((mode, mode.replace("_", " ")) for mode in MODES))
    failure_threshold: int = knob(5, BREAKER, minimum=1, help="Consecutive failures that open the breaker.")
    failure_rate_threshold: float = knob(50.0, BREAKER, **_PERCENT,
                                         help="Failure rate (%) over the window that opens it; 0: off.")
    slow_call_rate_threshold: float = knob(100.0, BREAKER, **_PERCENT,
                                           help="Slow-call rate (%) over the window that opens it; 0: off.")
    slow_call_ms: int = knob(5_000, BREAKER, minimum=1, help="A call slower than this is slow.")
    window_type: str = knob(WINDOW_COUNT, BREAKER, choices=(
        (WINDOW_COUNT, "count: the last window size calls"),
        (WINDOW_TIME, "time: the calls of the last window duration seconds")),
        help="What the rates are measured over; time: a low-traffic integration is not judged by old calls.")
    window_size: int = knob(20, BREAKER, minimum=1, help="Calls the rates are measured over (count window).")
    window_duration_s: int | None = knob(None, BREAKER, minimum=1, maximum=86_400,
                                         help="Seconds the rates are measured over with a time window "
                                              "(required there; a count window leaves it unused).")
    minimum_calls: int = knob(10, BREAKER, minimum=1, help="Calls needed in the window before the rates count.")
    reset_timeout_s: float = knob(30.0, BREAKER, above=0, help="Seconds open before half-open.")
    half_open_max_calls: int = knob(1, BREAKER, minimum=1, help="Trial calls let through at once when half-open.")
    success_threshold: int = knob(2, BREAKER, minimum=1, help="Consecutive half-open successes that close it.")
    # Retry
    max_retries: int = knob(3, RETRY, minimum=0, maximum=20, help="Retries after the first attempt.")
    base_delay_ms: int = knob(500, RETRY, minimum=0, help="The delay before the first retry.")
    max_delay_ms: int = knob(10_000, RETRY, minimum=0, help="No delay between retries is longer.")
    backoff_multiplier: float = knob(2.0, RETRY, minimum=1, help="Each retry's delay is the last one's times this.")
    jitter: bool = knob(True, RETRY, help="Full jitter: each delay is drawn uniformly in [0, delay].")
    retry_on: str = knob(",".join(sorted(category.value for category in RETRY_BY_DEFAULT)), RETRY, many=True,
                         choices=tuple((category.value, category.value) for category in RETRIABLE_CATEGORIES),
                         help="The failures that are retried: categories, comma-separated.",
                         message="Name at least one category; to retry nothing, set max retries to 0.")
    retry_budget_percent: float | None = knob(20.0, RETRY, **_PERCENT,
                                              help="Retries allowed as a share (%) of calls; blank: no budget.")
    # Hedging (Polly v8): an attempt still running after the delay gets a second, concurrent one
    hedge_delay_ms: int | None = knob(None, RETRY, minimum=1,
                                      help="Idempotent reads: a second attempt starts when the first has run this long "
                                           "(the first success wins; it counts against the retry budget); blank: off.")
    hedge_after_p95: bool = knob(False, RETRY, help="Hedge after this process's observed p95 attempt latency "
                                                    "instead (hedge delay until 20 attempts were seen).")
    # Timeouts
    attempt_timeout_ms: int = knob(5_000, TIMEOUTS, minimum=1, help="One attempt.")
    timeout_ms: int = knob(30_000, TIMEOUTS, minimum=1, help="The whole call, retries included.")
    timeout_enforcement: str = knob(TIMEOUT_THREAD, TIMEOUTS, choices=(
        (TIMEOUT_THREAD, "thread: the caller never waits past the timeout"),
        (TIMEOUT_INLINE, "inline: the operation enforces its own timeout")))
    # the http Clients' phases, each within the attempt's timeout (None: the attempt's time left)
    connect_timeout_ms: int | None = knob(None, TIMEOUTS, minimum=1,
                                          help="http Client: connecting; blank: the attempt's time left.")
    read_timeout_ms: int | None = knob(None, TIMEOUTS, minimum=1,
                                       help="http Client: each read of the response; blank: the attempt's time left.")
    write_timeout_ms: int | None = knob(None, TIMEOUTS, minimum=1,
                                        help="http Client: each write of the request; blank: the attempt's time left.")
    # Bulkhead
    max_concurrent: int = knob(20, BULKHEAD, minimum=1, help="Calls in flight per process.")
    bulkhead_mode: str = knob(BULKHEAD_FIXED, BULKHEAD, choices=(
        (BULKHEAD_FIXED, "fixed: at most max concurrent"),
        (BULKHEAD_ADAPTIVE, "adaptive: the limit follows latency, up to max concurrent")),
        help="adaptive: a slow attempt (over slow call ms) or a timeout lowers the limit by 10 %, a fast one under "
             "load raises it by 1 (AIMD).")
    bulkhead_wait_ms: int = knob(0, BULKHEAD, minimum=0, help="How long a call waits for a free slot; 0: not at all.")
    # Quota (None: no limit)
    hourly_limit: int | None = knob(None, QUOTA, minimum=1, help="Upstream attempts per hour; blank: no limit.")
    daily_limit: int | None = knob(None, QUOTA, minimum=1, help="Upstream attempts per day; blank: no limit.")
    # Outbound rate limit: at most rate_limit_permits attempts in any rate_limit_period_s, fleet-wide
    rate_limit_permits: int | None = knob(None, RATE_LIMIT, minimum=1,
                                          help="Upstream attempts per period, fleet-wide; blank: no rate limit.")
    rate_limit_period_s: float = knob(1.0, RATE_LIMIT, above=0, maximum=86_400,
                                      help="The period the permits are counted over (a sliding window), in seconds.")
    rate_limit_wait_ms: int = knob(0, RATE_LIMIT, minimum=0,
                                   help="How long an attempt waits for a permit (never past the call's deadline); "
                                        "0: not at all.")
    # Cache
    cache_ttl_s: int = knob(0, CACHE, minimum=0, help="0: responses are not cached.")
    cache_soft_ttl_s: int | None = knob(None, CACHE, minimum=1,
                                        help="Past this age (below the TTL) a cached response is still served and "
                                             "fetched again once in the background; blank: no background refresh.")
    cache_version: int = 0  # bumped to clear the integration's cache without scanning keys
    revision: float = 0.0  # when the policy was last saved: a shared store tells processes holding an older one
    # Fault injection for game days (set from an active FaultInjection; applied only when
    # RESILIENCE_FAULT_INJECTION is on): until when, errors in what % of attempts, added latency.
    fault_until: float = 0.0
    fault_error_percent: float = 0.0
    fault_latency_ms: int = 0
    # Degraded mode: share of calls let through, in (0, 1]
    capacity: float = knob(1.0, DEGRADED, above=0, maximum=1, help="Share of calls let through, in (0, 1].",
                           message="Capacity must be in (0, 1]: a share of calls, 1 meaning all of them.")

    def __post_init__(self) -> None:
        errors = {knob.name: problem for knob in KNOBS if (problem := knob.problem(getattr(self, knob.name)))}
        if self.kind not in KINDS:
            errors["kind"] = f"Unknown kind {self.kind!r}; expected one of {', '.join(KINDS)}."
        if "window_type" not in errors and "window_duration_s" not in errors and \
                (problem := window_duration_problem(self.window_type, self.window_duration_s)):
            errors["window_duration_s"] = problem  # a time window without a duration cannot run
        if errors:
            raise InvalidPolicy(self.name, errors)

    @property
    def attempts(self) -> int:
        return 1 + self.max_retries

    @property
    def time_window_s(self) -> int:
        """The breaker's time window in seconds; 0 for a count window."""
        return self.window_duration_s if self.window_type == WINDOW_TIME else 0

    def retries(self, category: ErrorCategory) -> bool:
        """Whether a failure of ``category`` is retried (``retry_on``)."""
        return category.value in name_set(self.retry_on)

    def backoff_ms(self, retry_number: int) -> float:
        """The un-jittered delay before retry ``retry_number`` (1-based)."""
        return exponential(retry_number, self.base_delay_ms, self.backoff_multiplier, self.max_delay_ms)

    def worst_case_ms(self) -> float:
        """Longest a call can take if every attempt times out: used by checks."""
        backoff = sum(self.backoff_ms(n) for n in range(1, self.max_retries + 1))
        return self.attempts * self.attempt_timeout_ms + backoff

    def replace(self, **changes) -> Policy:
        return dataclasses.replace(self, **changes)


def _declared_knobs() -> tuple[Knob, ...]:
    hints = typing.get_type_hints(Policy)
    knobs = []
    for policy_field in dataclasses.fields(Policy):
        if "knob" in policy_field.metadata:
            args = typing.get_args(hints[policy_field.name])
            optional = type(None) in args
            kind = next(arg for arg in args if arg is not type(None)) if optional else hints[policy_field.name]
            knobs.append(dataclasses.replace(policy_field.metadata["knob"], name=policy_field.name, type=kind,
                                             optional=optional))
    return tuple(knobs)


KNOBS: tuple[Knob, ...] = _declared_knobs()
KNOB_NAMES = tuple(knob.name for knob in KNOBS)
KNOBS_BY_GROUP = {group: tuple(knob.name for knob in KNOBS if knob.group == group) for group in KNOB_GROUPS}


def knob_problems(values: dict) -> dict[str, str]:
    """The rules between knobs (each knob's own bounds are Knob.problem): field -> why.

    The model's clean() reports them to forms, the API and the import command. A Policy built
    in code with such values still runs (each rule only caps or idles a knob), so Policy()
    itself does not refuse them; but a time window without a duration cannot run at all, so
    Policy() refuses that one too (window_duration_problem).
    """
    errors = {}
    base, most = values.get("base_delay_ms"), values.get("max_delay_ms")
    if base is not None and most is not None and base > most:
        errors["base_delay_ms"] = f"Base delay ({base} ms) must not exceed max delay ({most} ms)."
    attempt, whole = values.get("attempt_timeout_ms"), values.get("timeout_ms")
    if attempt is not None and whole is not None and attempt > whole:
        errors["attempt_timeout_ms"] = (f"Attempt timeout ({attempt} ms) must not exceed the overall timeout "
                                        f"({whole} ms).")
    for phase in ("connect_timeout_ms", "read_timeout_ms", "write_timeout_ms"):
        value = values.get(phase)
        if value is not None and attempt is not None and value > attempt:
            errors[phase] = (f"{phase.split('_')[0].capitalize()} timeout ({value} ms) must not exceed the attempt "
                             f"timeout ({attempt} ms), which ends the attempt first.")
    if problem := window_duration_problem(values.get("window_type"), values.get("window_duration_s")):
        errors["window_duration_s"] = problem
    minimum, window = values.get("minimum_calls"), values.get("window_size")
    if minimum is not None and window is not None and minimum > window and values.get("window_type") != WINDOW_TIME:
        errors["minimum_calls"] = (f"Minimum calls ({minimum}) must not exceed the window size ({window}): the "
                                   f"rates would never be evaluated.")
    soft, ttl = values.get("cache_soft_ttl_s"), values.get("cache_ttl_s")
    if soft is not None and ttl is not None and soft >= ttl:
        errors["cache_soft_ttl_s"] = (f"Cache soft TTL ({soft} s) must be below the cache TTL ({ttl} s): past the TTL "
                                      f"a response is not served at all." if ttl else
                                      f"Cache soft TTL ({soft} s) needs a cache TTL: responses are not cached "
                                      f"(cache TTL 0).")
    return errors


def window_duration_problem(window_type, duration) -> str | None:
    """Why a breaker window of ``window_type`` cannot have ``duration`` seconds, or None."""
    if window_type == WINDOW_TIME and duration is None:
        return ("A time window needs its duration: the seconds the rates are measured over (or choose the "
                "count window).")
    return None


_BASE = {knob.name: Policy.__dataclass_fields__[knob.name].default for knob in KNOBS}

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

"""The guarded-call pipeline.

THE ORDER (written down once; docs/pipeline.md explains each step):

    1. policy      the integration's cached policy (no query)
    2. cache       a fresh cached response is served without the upstream
    3. degraded    below full capacity, the excess share is shed (DEGRADED)
    4. deadline    the overall timeout (timeout_ms) starts
    5. attempts, each:
         a. bulkhead    wait for a slot up to bulkhead_wait_ms (BULKHEAD_FULL)
         b. state       breaker permission, retry budget and quota, in one
                        atomic store operation (CIRCUIT_OPEN, QUOTA_EXCEEDED)
         c. timeout     the operation runs for at most its attempt timeout,
                        trimmed to the deadline (with any game-day fault
                        injected into it: faults.py)
         d. record      the outcome feeds the breaker
         e. retry       a retryable failure is retried after backoff, unless
                        the delay would end past the deadline
    6. fallbacks   on failure or refusal, tried in order
    7. dead letter a failed call's work is handed to the dead letter queue
    8. events      CallFinished (and every StateTransition) to subscribers

``_Call`` holds one call's state and makes every decision; ``Engine.execute``
and ``Engine.aexecute`` are the two thin loops that run it, so the async
twin mirrors the sync one instead of forking its logic.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import random
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from typing import Any, Callable

from ..errors import ErrorCategory, ResilienceError, classify
from . import breaker as br
from . import fallback as fb
from . import faults
from .bulkhead import AdaptiveLimit, Bulkhead
from .cache import Lookup, ResponseCache, key_material
from .clock import SystemClock
from .degraded import Shedder
from .events import CallFinished, DeadLetterRequested, EventBus, StateTransition
from .events import bus as default_bus
from .options import CallOptions, call_options as checked_options
from .options import time_left as deadline_left
from .policy import BULKHEAD_ADAPTIVE, TIMEOUT_INLINE, Policy
from .registry import PolicyRegistry
from .retry import retry_delay_s, should_retry
from .state import RETRY_BUDGET, LocalStore, StateStore
from .timeouts import AttemptTimeout, abandon, run_async, run_in_thread, run_inline, submit

logger = logging.getLogger("integrations.engine")

LIVE = "live"
HEDGE_SAMPLES = 200  # hedge_after_p95: the attempts the p95 is taken over
HEDGE_MIN_SAMPLES = 20  # fewer seen: the fixed hedge delay
CACHE = "cache"
FALLBACK = "fallback"


class CallResult:
    """The outcome of a guarded call; ``execute`` returns it instead of raising."""

    __slots__ = ("integration", "ok", "value", "error", "source", "fallback_used", "attempts", "latency_ms", "age_s")

    def __init__(self, integration, ok, value, error, source, fallback_used, attempts, latency_ms, age_s=None):
        self.integration = integration
        self.ok = ok
        self.value = value
        self.error = error
        self.source = source
        self.fallback_used = fallback_used  # None | "cache" | "last_known" | "value" | "call"
        self.attempts = attempts
        self.latency_ms = latency_ms
        self.age_s = age_s  # how old a cached or fallback value is; None for live values

    def __repr__(self) -> str:
        what = f"value={self.value!r}" if self.ok else f"error={self.error!r}"
        return (f"CallResult({self.integration!r}, ok={self.ok}, {what}, source={self.source!r}, "
                f"fallback_used={self.fallback_used!r}, attempts={self.attempts}, latency_ms={self.latency_ms:.2f})")

    def unwrap(self) -> Any:
        """The value, or raise the error: what ``@resilient`` returns."""
        if self.ok:
            return self.value
        raise self.error


class _Local:
    """What one process keeps per integration whatever the store: bulkhead, shedder, pool, cache counts."""

    __slots__ = ("bulkhead", "shedder", "_executor", "_executor_size", "lock", "cache_hits", "cache_misses",
                 "adaptive", "latencies", "fitted")

    def __init__(self, policy: Policy) -> None:
        self.bulkhead = Bulkhead(policy.max_concurrent)
        self.adaptive: AdaptiveLimit | None = None  # bulkhead_mode="adaptive": the limit it sets
        self.latencies: deque[float] = deque(maxlen=HEDGE_SAMPLES)  # hedge_after_p95: recent attempts, s
        self.shedder = Shedder()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_size = 0
        self.lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0
        self.fitted: Policy | None = None  # the policy the bulkhead's limit was last set for

    def executor(self, policy: Policy) -> ThreadPoolExecutor:
        executor = self._executor
        if executor is not None and self._executor_size == policy.max_concurrent:
            return executor
        with self.lock:
            if self._executor is None or self._executor_size != policy.max_concurrent:
                old = self._executor
                self._executor = ThreadPoolExecutor(policy.max_concurrent, thread_name_prefix=f"guarded-{policy.name}")
                self._executor_size = policy.max_concurrent
                if old is not None:
                    old.shutdown(wait=False)
            return self._executor

    def count_cache(self, hit: bool) -> None:
        with self.lock:
            if hit:
                self.cache_hits += 1
            else:
                self.cache_misses += 1


class _Call:
    """One guarded call's state and decisions, shared by the sync and async loops."""

    __slots__ = ("engine", "policy", "local", "fn", "args", "kwargs", "fallbacks", "dead_letter", "material",
                 "lookup",
                 "cache_state", "started", "deadline", "attempts", "durations", "error", "value", "ok", "source",
                 "fallback_used", "age_s", "stopped_by", "trace", "enforces_deadline", "options", "budgeted", "unwanted",
                 "rate_wait_until", "span", "attempt_started", "timeout_s")

    def __init__(self, engine: Engine, policy: Policy, fn, args, kwargs, fallbacks, dead_letter, cache_key,
                 trace=None, options: CallOptions | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"execute({policy.name!r}, ...) needs a callable operation, got {fn!r}")
        if dead_letter is not None and not (hasattr(dead_letter, "handler") and hasattr(dead_letter, "payload")):
            raise TypeError(f"dead_letter must be integrations.dlq.DeadLetter(handler_name, payload), "
                            f"got {dead_letter!r}")
        self.engine = engine
        self.options = options
        self.unwanted = False  # the value is one the call's retry_if_result asked to retry
        self.rate_wait_until = None  # while an attempt waits for a rate-limit permit: until when it may
        self.trace = trace  # the call's span (tracing.CallSpan) when tracing is on
        self.span = None  # the attempt's span while one runs with tracing on
        self.attempt_started = 0.0  # when the attempt running began (monotonic)
        self.timeout_s = 0.0  # the attempt's own timeout
        self.enforces_deadline = False  # the operation ends by its attempt's deadline itself: run it inline
        self.policy = policy
        self.local = engine._local(policy)
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.fallbacks = fb.check_fallbacks(fallbacks) if fallbacks else ()
        self.dead_letter = dead_letter
        self.started = engine.clock.monotonic()
        self.deadline = self.started + policy.timeout_ms / 1000
        budget = deadline_left()  # the context's deadline (an inbound request's budget): the call ends by it
        self.budgeted = budget is not None and budget < policy.timeout_ms / 1000
        if self.budgeted:
            self.deadline = self.started + budget
        self.attempts, self.ok, self.source = 0, False, LIVE
        self.durations: list[float] = []  # each attempt's, ms
        self.error: ResilienceError | None = None
        # set as the call goes: its value, the fallback that served it, a cached value's age, what stopped it
        self.value = self.fallback_used = self.age_s = self.stopped_by = self.cache_state = None
        self.lookup = None  # what the cache step found (cache.Lookup): a hit, this call's fill, a wait
        self.material = None
        fallbacks = self.fallbacks
        if policy.cache_ttl_s > 0 or (fallbacks and any(f.kind in (fb.CACHE, fb.LAST_KNOWN) for f in fallbacks)):
            self.material = key_material(fn, args, kwargs, cache_key)
        if policy.fault_until and engine.faults_enabled and faults.fault_active(policy, engine.clock.time()):
            self.fn = (faults.with_async_fault(fn, policy, engine.rng, engine.clock.asleep)
                       if fb.is_async_callable(fn) else faults.with_fault(fn, policy, engine.rng, engine.clock.sleep))

    # -- steps 2 and 3: before any attempt -----------------------------------

    def short_circuit(self) -> bool:
        """Serve a fresh cache hit or shed the call; True when no attempt is to be made."""
        policy, engine = self.policy, self.engine
        if self.material is not None and policy.cache_ttl_s > 0 and self.lookup is None and self.cached(
                engine.cache.consult(policy, self.material, engine.clock.time(), self.time_left())):
            return True
        if policy.capacity < 1.0 and not self.local.shedder.admit(policy.capacity):
            if self.lookup is not None:
                engine.cache.settle(self.lookup)  # a shed call fills nothing: those waiting look again
            self.refuse(ErrorCategory.DEGRADED, f"degraded mode: running at {policy.capacity:.0%} capacity")
            return True
        return False

    @property
    def waiting(self) -> bool:
        """Another call fills this call's cache key: the loop waits for it, then calls cached()."""
        return self.lookup is not None and self.lookup.waiting is not None

    def cached(self, found) -> bool:
        """Take the cache step's Lookup; True when it answered the call (no attempt to make)."""
        self.lookup = found
        if found.waiting is not None:
            return False
        self.local.count_cache(found.hit is not None)
        self.cache_state = "miss" if found.hit is None else "hit"
        if found.hit is not None:
            self.ok, self.source, (self.value, stored_at) = True, CACHE, found.hit
            self.age_s = max(self.engine.clock.time() - stored_at, 0.0)
            if found.refresh:
                self.engine.refresh_in_background(self)
            return True
        if found.error is not None:  # the call that filled the key failed: this one shares its failure
            self.error = coalesced(found.error)
            return True
        if found.fill is None:
            self.refuse(ErrorCategory.TIMEOUT, "the deadline came while another call fetched the same cache key")
            return True
        return False

    # -- step 5: the attempts ------------------------------------------------

    def time_left(self) -> float:
        return self.deadline - self.engine.clock.monotonic()

    def bulkhead_wait(self, left: float) -> float:
        wait = self.policy.bulkhead_wait_ms
        return 0.0 if wait == 0 or left <= 0 else min(wait / 1000, left)

    def bulkhead_full(self) -> None:
        self.refuse(ErrorCategory.BULKHEAD_FULL,
                    f"{self.policy.max_concurrent} calls already in flight (waited {self.policy.bulkhead_wait_ms} ms)")

    def permit(self, left: float):
        """Ask the store for this attempt; None means stop (the reason is recorded)."""
        if left <= 0:
            self.stop(ErrorCategory.TIMEOUT, "the deadline of the request this call serves has passed" if self.budgeted
                      else f"overall timeout of {self.policy.timeout_ms} ms reached")
            return None
        is_retry = self.attempts > 0
        permit = self.engine.store.acquire(self.policy, is_retry)
        for transition in permit.transitions:
            self.engine.publish_transition(transition)
        if permit.allowed:
            return permit
        if permit.reason == RETRY_BUDGET:
            self.stopped_by = "retry_budget"
        elif is_retry:
            self.stopped_by = permit.category.value  # the breaker opened or the quota ran out mid-call
        else:
            self.refuse(permit.category, permit.reason)
        return None

    def rate_limit_wait(self) -> float | None:
        """An outbound rate-limit permit for the next attempt: 0.0 when taken, else how long to wait
        before asking again, or None when none comes within rate_limit_wait_ms and the deadline
        (the call is refused with RATE_LIMIT, or a retry stopped; the bulkhead slot is released)."""
        policy, engine = self.policy, self.engine
        verdict = engine.store.rate_limiter.hit(f"integration.{policy.name}", policy.rate_limit_permits,
                                                policy.rate_limit_period_s)
        if verdict.allowed:
            return 0.0
        now = engine.clock.monotonic()
        if self.rate_wait_until is None:
            self.rate_wait_until = min(now + policy.rate_limit_wait_ms / 1000, self.deadline)
        wait = max(verdict.reset_at - engine.clock.time(), 0.001)
        if now + wait <= self.rate_wait_until:
            return wait
        self.rate_wait_until = None
        self.local.bulkhead.release()
        if self.attempts:
            self.stopped_by = ErrorCategory.RATE_LIMIT.value
        else:
            self.error = ResilienceError(
                ErrorCategory.RATE_LIMIT, f"outbound rate limit of {policy.rate_limit_permits} per "
                f"{policy.rate_limit_period_s:g} s reached", integration=policy.name, code="outbound_rate_limited",
                retry_after=round(wait, 3))
        return None

    # -- hedging (hedge_delay_ms): a second attempt alongside a slow first one --

    def hedging(self) -> bool:
        return self.policy.hedge_delay_ms is not None and (self.options is None or self.options.hedge)

    def hedge_delay_s(self) -> float:
        """When the hedge starts: the fixed delay, or this process's p95 of recent attempts."""
        samples = self.local.latencies
        if self.policy.hedge_after_p95 and len(samples) >= HEDGE_MIN_SAMPLES:
            return sorted(samples)[int(len(samples) * 0.95) - 1]
        return self.policy.hedge_delay_ms / 1000

    def take_hedge(self, deadline: float):
        """A free bulkhead slot, at once, and the store's permit for a hedge, counted as a retry (the
        retry budget); None without either (the first attempt runs on alone)."""
        bulkhead = self.local.bulkhead
        if time.monotonic() >= deadline or not bulkhead.try_acquire():
            return None
        permit = self.engine.store.acquire(self.policy, True)
        for transition in permit.transitions:
            self.engine.publish_transition(transition)
        if permit.allowed:
            return permit
        bulkhead.release()
        return None

    def hedge_dropped(self, permit) -> None:
        """An attempt that lost the race (still running, abandoned): it was made, it decides nothing."""
        self.attempts += 1
        self.engine.store.record(self.policy, permit, br.IGNORED, False, True)

    def hedge_failed(self, permit, exc: BaseException, duration: float) -> None:
        """One of two racing attempts failed while the other runs on: recorded, no retry decided."""
        self.attempts += 1
        self.durations.append(duration * 1000)
        error = classify(exc, self.policy.name)
        self._record(permit, br.FAILURE if error.category.counts_as_failure else br.IGNORED, duration,
                     timed_out=error.category is ErrorCategory.TIMEOUT)

    def next_attempt(self, rate_limited: float | None):
        """Once the attempt holds its bulkhead slot, given the outbound rate limit's last answer
        (rate_limit_wait(): 0.0 a permit, None refused; 0.0 without a rate limit): ``[permit]``, the
        store's permit in a list whose one entry names the attempt whose outcome is recorded (a hedge
        may replace it), with the attempt's timeout, span and start set; None means stop (the slot is
        released)."""
        if rate_limited is None:
            return None  # rate_limit_wait() recorded why and released the slot
        engine = self.engine
        left = self.time_left()  # the waits for a slot and a permit came out of it
        permit = self.permit(left)
        if permit is None:
            self.local.bulkhead.release()
            return None
        self.timeout_s = min(self.policy.attempt_timeout_ms / 1000, left)
        if self.trace is not None:
            self.span = engine.tracing.start_attempt(self.trace, self.policy.name, self.attempts + 1, permit.trial)
        self.attempt_started = engine.clock.monotonic()
        return [permit]

    def _end_span(self, exc: BaseException | None) -> None:
        span, self.span = self.span, None
        self.engine.tracing.end_attempt(span, exc, self.policy.name)

    def succeeded(self, permit, value) -> float | None:
        """Record a successful attempt; returns the delay before a retry its value asks for, or None."""
        if self.span is not None:
            self._end_span(None)
        duration = self.engine.clock.monotonic() - self.attempt_started
        self.attempts += 1
        self.durations.append(duration * 1000)
        options = self.options
        unwanted = options is not None and options.retry_if_result is not None and options.retry_if_result(value)
        # a value the caller does not want yet says nothing about the upstream's health
        self._record(permit, br.IGNORED if unwanted else br.SUCCESS, duration)
        # the latest outcome is the call's: this value, unless a retry it asks for ends otherwise
        self.ok, self.value, self.error, self.unwanted = True, value, None, unwanted
        if self.policy.hedge_after_p95:
            self.local.latencies.append(duration)
        if not unwanted or self.attempts > self.policy.max_retries:
            return None
        return self._delay_before_retry(None)

    def failed(self, permit, exc: BaseException) -> float | None:
        """Record a failed attempt; returns the delay before a retry, or None to stop."""
        if self.span is not None:
            self._end_span(exc)
        duration = self.engine.clock.monotonic() - self.attempt_started
        self.attempts += 1
        self.durations.append(duration * 1000)
        error = classify(exc, self.policy.name)
        self.ok, self.value, self.error, self.unwanted = False, None, error, False
        self._record(permit, br.FAILURE if error.category.counts_as_failure else br.IGNORED, duration,
                     timed_out=error.category is ErrorCategory.TIMEOUT)
        if not should_retry(self.policy, self.attempts, error) or (
                self.options is not None and self.options.retry_if_error is not None
                and not self.options.retry_if_error(error)):
            return None
        return self._delay_before_retry(error)

    def _delay_before_retry(self, error: ResilienceError | None) -> float | None:
        """The backoff before the next attempt (after ``error``, or a value to retry); None when the
        wait would end past the deadline."""
        delay = retry_delay_s(self.policy, self.attempts, error, self.engine.rng)
        if delay >= self.time_left():
            self.stopped_by = "deadline"
            return None
        return delay

    def raised(self, permit, exc: BaseException) -> float | None:
        """An attempt that raised: a failure (``failed``), or the caller going away (``abandoned``,
        then raised on)."""
        if isinstance(exc, Exception):
            return self.failed(permit, exc)
        self.abandoned(permit, exc)
        raise exc

    def abandoned(self, permit, exc: BaseException) -> None:
        """The caller went away mid-attempt (KeyboardInterrupt, cancellation): free the permit."""
        if self.span is not None:
            self._end_span(exc)
        self.engine.store.record(self.policy, permit, br.IGNORED, False, self.attempts > 0)
        if self.lookup is not None:
            self.engine.cache.settle(self.lookup)  # those waiting for this call's fill look again

    def _record(self, permit, outcome: str, duration: float, timed_out: bool = False) -> None:
        slow = duration * 1000 > self.policy.slow_call_ms
        adaptive = self.local.adaptive
        if adaptive is not None:
            adaptive.sample(slow or timed_out, self.local.bulkhead.in_flight)
            self.local.bulkhead.limit = adaptive.limit
        for transition in self.engine.store.record(self.policy, permit, outcome, slow, self.attempts > 1):
            self.engine.publish_transition(transition)

    def refuse(self, category: ErrorCategory, reason: str) -> None:
        self.error = ResilienceError(category, reason, integration=self.policy.name)

    def stop(self, category: ErrorCategory, reason: str) -> None:
        if self.ok:  # a value is in hand (one retry_if_result wanted retried): it stays the call's
            self.stopped_by = category.value
        elif self.error is None:
            self.refuse(category, reason)
        else:
            self.stopped_by = category.value

    # -- step 6: fallbacks ---------------------------------------------------

    def fallback_value(self, fallback: fb.Fallback):
        """(True, value, age) when a non-call fallback yields, else (False, None, None)."""
        engine, policy = self.engine, self.policy
        if fallback.kind == fb.VALUE:
            return True, fallback.payload, None
        if self.material is None:
            return False, None, None
        now = engine.clock.time()
        found = (engine.cache.stale(policy, self.material, now) if fallback.kind == fb.CACHE
                 else engine.cache.last_known(policy, self.material, now))
        if found is None:
            return False, None, None
        return True, found[0], found[1]

    def serve_stored(self, fallback: fb.Fallback) -> bool:
        """Serve a value, cache or last-known fallback if it yields; False for Fallback.call."""
        if fallback.kind == fb.CALL:
            return False
        found, value, age = self.fallback_value(fallback)
        if found:
            self.serve_fallback(fallback, value, age)
        return found

    def served_by_call(self, fallback: fb.Fallback, outcome: tuple | None) -> bool:
        """Serve what a Fallback.call returned: ``outcome`` is (value,), or None when it raised."""
        if outcome is None:
            return False
        self.serve_fallback(fallback, outcome[0], None)
        return True

    def serve_fallback(self, fallback: fb.Fallback, value, age) -> None:
        self.ok, self.value, self.source, self.fallback_used, self.age_s = True, value, FALLBACK, fallback.kind, age

    def fallback_failed(self, fallback: fb.Fallback) -> None:
        logger.warning("fallback %r of %s raised; trying the next one", fallback, self.policy.name, exc_info=True)

    # -- steps 7 and 8 -------------------------------------------------------

    def finish(self) -> CallResult:
        engine, policy = self.engine, self.policy
        live_failed = self.error is not None
        if self.material is not None and self.ok and self.source == LIVE and not self.unwanted:
            keep_last_known = policy.cache_ttl_s > 0 or any(f.kind == fb.LAST_KNOWN for f in self.fallbacks)
            stored = engine.cache.store(policy, self.material, self.value, engine.clock.time(),
                                        response=policy.cache_ttl_s > 0, last_known=keep_last_known)
        else:
            stored = None
        if self.lookup is not None:  # what this call's fill ends with: the value stored, else its error
            engine.cache.settle(self.lookup, stored, self.error)
        if self.error is not None and self.stopped_by is not None:
            self.error.details.setdefault("stopped_by", self.stopped_by)
        latency_ms = (engine.clock.monotonic() - self.started) * 1000
        if live_failed and self.dead_letter is not None:
            engine.request_dead_letter(self)
        if engine.bus.has_subscribers(CallFinished):
            engine.bus.publish(CallFinished(
                integration=policy.name, ok=self.ok, source=self.source,
                category=self.error.category.value if self.error is not None else None,
                attempts=self.attempts, retries=max(self.attempts - 1, 0), latency_ms=latency_ms,
                attempt_latencies_ms=tuple(self.durations), fallback_used=self.fallback_used,
                cache=self.cache_state, at=engine.clock.time(),
            ))
        return CallResult(policy.name, self.ok, self.value, self.error, self.source, self.fallback_used,
                          self.attempts, latency_ms, self.age_s)


def coalesced(error: ResilienceError) -> ResilienceError:
    """The failure of the call that filled a cache key, as one of the calls that waited for it gets it
    (its own object: the caller may add to its details)."""
    shared = ResilienceError(error.category, error.message, code=error.code, integration=error.integration,
                             retry_after=error.retry_after, **{**error.details, "coalesced": True})
    shared.timestamp = error.timestamp
    shared.__cause__ = error.__cause__
    return shared


class Engine:
    def __init__(
        self,
        registry: PolicyRegistry | None = None,
        store: StateStore | None = None,
        cache: ResponseCache | None = None,
        clock=None,
        rng: random.Random | None = None,
        bus: EventBus | None = None,
        faults_enabled: bool = False,
        tracing=None,
    ) -> None:
        self.clock = clock or SystemClock()
        self.tracing = tracing  # a tracing.Tracing when RESILIENCE_TRACING is on, else None
        self.faults_enabled = faults_enabled  # RESILIENCE_FAULT_INJECTION: game-day faults are applied
        self.registry = registry or PolicyRegistry()
        self.store = store or LocalStore(self.clock)
        self.cache = cache or ResponseCache()
        self.rng = rng or random.Random()
        self.bus = bus or default_bus
        self.store.on_stale_policy = self.registry.invalidate
        self._locals: dict[str, _Local] = {}
        self._refreshes: set = set()  # background refreshes of async operations in progress
        self._locals_lock = threading.Lock()

    def _local(self, policy: Policy) -> _Local:
        local = self._locals.get(policy.name)
        if local is None:
            with self._locals_lock:
                local = self._locals.setdefault(policy.name, _Local(policy))
        if local.fitted is policy:  # the same policy as the last call's: its limit is set (and kept by _record)
            return local
        limit = policy.max_concurrent
        if policy.bulkhead_mode == BULKHEAD_ADAPTIVE:
            adaptive = local.adaptive
            if adaptive is None:
                adaptive = local.adaptive = AdaptiveLimit(limit)
            elif adaptive.maximum != limit:
                adaptive.cap(limit)
            limit = adaptive.limit
        elif local.adaptive is not None:
            local.adaptive = None
        if local.bulkhead.limit != limit:
            local.bulkhead.limit = limit
        local.fitted = policy
        return local

    def _fail_fast(self, policy: Policy, fallbacks, dead_letter) -> CallResult | None:
        """A call that a known-open breaker refuses, answered before any per-call work.

        Only for calls with nothing else to do on refusal: no fallbacks, no
        dead letter, no cache to serve from, no degraded share to apply.
        """
        if fallbacks or dead_letter is not None or policy.cache_ttl_s or policy.capacity < 1.0:
            return None
        reason = self.store.refusal(policy)
        if reason is None:
            return None
        error = ResilienceError(ErrorCategory.CIRCUIT_OPEN, reason, integration=policy.name)
        if self.bus.has_subscribers(CallFinished):
            self.bus.publish(CallFinished(policy.name, False, LIVE, error.category.value, 0, 0, 0.0, (), None, None,
                                          error.timestamp))
        return CallResult(policy.name, False, None, error, LIVE, None, 0, 0.0)

    # -- the sync loop -------------------------------------------------------

    def execute(self, name: str, fn: Callable, *args, cache_key=None, fallbacks=(), dead_letter=None,
                call_options: CallOptions | None = None, **kwargs):
        return self.call(name, fn, args, kwargs, cache_key=cache_key, fallbacks=fallbacks, dead_letter=dead_letter,
                         call_options=call_options)

    def call(self, name: str, fn: Callable, args: tuple = (), kwargs: dict | None = None, *, cache_key=None,
             fallbacks=(), dead_letter=None, enforces_deadline: bool = False,
             call_options: CallOptions | None = None, policy: Policy | None = None) -> CallResult:
        """``execute`` with the operation's arguments passed explicitly.

        ``enforces_deadline``: the operation ends by its attempt's deadline on its own (it reads
        ``attempt_time_left()``, as the http Client's transport does), so its attempts run in the
        caller's thread whatever the integration's ``timeout_enforcement``: no thread hand-off.
        ``call_options``: this call's overrides of the policy and what else to retry (options.py).
        ``policy``: ``registry.get(name)``, read by the caller already (the http Client reads it for
        its timeouts), so the call runs under the same one.
        """
        if policy is None:
            policy = self.registry.get(name)
        elif policy.name != name:
            raise ValueError(f"call({name!r}, ...) was given the policy of {policy.name!r}")
        if call_options is not None:
            policy = checked_options(call_options).applied_to(policy)
        if self.tracing is None:
            return self._call(policy, fn, args, kwargs, cache_key, fallbacks, dead_letter, None, enforces_deadline,
                              call_options)
        trace = self.tracing.start_call(name)
        try:
            result = self._call(policy, fn, args, kwargs, cache_key, fallbacks, dead_letter, trace, enforces_deadline,
                                call_options)
        except BaseException as exc:
            self.tracing.abandon_call(trace, exc)
            raise
        return self.tracing.end_call(trace, result)

    def _call(self, policy: Policy, fn: Callable, args: tuple, kwargs: dict | None, cache_key, fallbacks, dead_letter,
              trace=None, enforces_deadline: bool = False, options: CallOptions | None = None) -> CallResult:
        refused = self._fail_fast(policy, fallbacks, dead_letter)
        if refused is not None:
            return refused
        if fb.is_async_callable(fn):
            raise TypeError(f"{fn!r} is a coroutine function: use aexecute({policy.name!r}, ...)")
        call = _Call(self, policy, fn, args, kwargs or {}, fallbacks, dead_letter, cache_key, trace, options)
        call.enforces_deadline = enforces_deadline
        if not call.short_circuit() and not (
                call.waiting and call.cached(self.cache.wait(call.lookup, call.time_left, self.clock.time))):
            self._attempts(call)
        if not call.ok:
            for fallback in call.fallbacks:
                if call.serve_stored(fallback) or call.served_by_call(fallback, self._call_fallback(call, fallback)):
                    break
        return call.finish()

    @staticmethod
    def _call_fallback(call: _Call, fallback: fb.Fallback):
        if fallback.kind != fb.CALL:
            return None
        try:
            return (fallback.fn(*call.args, **call.kwargs),)
        except Exception:  # noqa: BLE001 - a failing fallback hands over to the next one (logged)
            call.fallback_failed(fallback)
            return None

    def _attempts(self, call: _Call) -> None:
        policy, local, clock = call.policy, call.local, self.clock
        hedging = call.hedging()  # two attempts at once: both in worker threads
        inline = not hedging and (call.enforces_deadline or policy.timeout_enforcement == TIMEOUT_INLINE)
        bulkhead, delay = local.bulkhead, 0.0
        while delay is not None:  # the backoff a retry waits for (none before the first attempt)
            if delay:
                clock.sleep(delay)
            # a free slot at once, else a wait for one (bulkhead_wait_ms, within the deadline)
            if not (bulkhead.try_acquire() or bulkhead.acquire(call.bulkhead_wait(call.time_left()))):
                call.bulkhead_full()
                return
            wait = 0.0 if policy.rate_limit_permits is None else call.rate_limit_wait()
            while wait:
                clock.sleep(wait)
                wait = call.rate_limit_wait()
            owner = call.next_attempt(wait)
            if owner is None:
                return
            try:
                if hedging:
                    value = self._hedged(call, owner, call.timeout_s)
                elif inline:
                    value = run_inline(call.fn, call.args, call.kwargs, call.timeout_s, bulkhead.release,
                                       call.attempt_started, clock.monotonic)
                else:
                    value = run_in_thread(local.executor(policy), call.fn, call.args, call.kwargs, call.timeout_s,
                                          bulkhead.release)
            except BaseException as exc:  # noqa: BLE001 - every failure is classified and decided on
                delay = call.raised(owner[0], exc)
            else:
                delay = call.succeeded(owner[0], value)

    def _hedged(self, call: _Call, owner: list, timeout: float):
        """One attempt, and a second one alongside it if the first runs past the hedge delay: the first
        success wins and the other is abandoned (it runs on in its thread, holding its bulkhead slot).

        The hedge needs a free bulkhead slot at once and a store permit as a retry (the retry
        budget); without them the first attempt runs on alone. ``owner[0]`` is set to the permit
        of the attempt whose outcome is returned (or raised).
        """
        local, release = call.local, call.local.bulkhead.release
        executor = local.executor(call.policy)
        deadline = time.monotonic() + timeout
        first = submit(executor, call.fn, call.args, call.kwargs, deadline, release)
        done, _ = futures_wait([first], timeout=min(call.hedge_delay_s(), timeout))
        hedge = None if done else call.take_hedge(deadline)
        if hedge is None:
            try:
                return first.result(max(deadline - time.monotonic(), 0))
            except FutureTimeout:
                abandon(first, release)
                raise AttemptTimeout(timeout) from None
        second = submit(executor, call.fn, call.args, call.kwargs, deadline, release)
        started = {first: deadline - timeout, second: time.monotonic()}
        pending = {first: owner[0], second: hedge}
        while True:
            done, _ = futures_wait(pending, timeout=max(deadline - time.monotonic(), 0), return_when=FIRST_COMPLETED)
            if not done:  # neither ended in time: the earliest attempt running takes the TIMEOUT
                timed_out = first if first in pending else second
                owner[0] = pending[timed_out]
                for future, permit in pending.items():
                    abandon(future, release)
                    if future is not timed_out:  # (permits may be one shared object: futures tell them apart)
                        call.hedge_dropped(permit)
                raise AttemptTimeout(timeout)
            for future in done:
                permit = pending.pop(future)
                error = future.exception()
                if error is not None and pending:  # the other may still succeed
                    call.hedge_failed(permit, error, time.monotonic() - started[future])
                    continue
                owner[0] = permit
                for other, other_permit in pending.items():
                    abandon(other, release)
                    call.hedge_dropped(other_permit)
                pending.clear()
                return future.result()

    # -- the async loop: the same steps, awaited ------------------------------

    async def aexecute(self, name: str, fn: Callable, *args, cache_key=None, fallbacks=(), dead_letter=None,
                       call_options: CallOptions | None = None, **kwargs):
        if not self.registry.is_fresh(name):
            from asgiref.sync import sync_to_async

            await sync_to_async(self.registry.get, thread_sensitive=True)(name)
        policy = self.registry.get(name)
        if call_options is not None:
            policy = checked_options(call_options).applied_to(policy)
        if self.tracing is None:
            return await self._acall(policy, fn, args, kwargs, cache_key, fallbacks, dead_letter, None, call_options)
        trace = self.tracing.start_call(name)
        try:
            result = await self._acall(policy, fn, args, kwargs, cache_key, fallbacks, dead_letter, trace,
                                       call_options)
        except BaseException as exc:
            self.tracing.abandon_call(trace, exc)
            raise
        return self.tracing.end_call(trace, result)

    async def _acall(self, policy: Policy, fn: Callable, args: tuple, kwargs: dict, cache_key, fallbacks, dead_letter,
                     trace=None, options: CallOptions | None = None) -> CallResult:
        refused = self._fail_fast(policy, fallbacks, dead_letter)
        if refused is not None:
            return refused
        call = _Call(self, policy, fn, args, kwargs, fallbacks, dead_letter, cache_key, trace, options)
        if not call.short_circuit() and not (
                call.waiting and call.cached(await self.cache.await_(call.lookup, call.time_left, self.clock.time))):
            await self._aattempts(call)
        if not call.ok:
            for fallback in call.fallbacks:
                if call.serve_stored(fallback) or call.served_by_call(fallback,
                                                                     await self._acall_fallback(call, fallback)):
                    break
        return call.finish()

    @staticmethod
    async def _acall_fallback(call: _Call, fallback: fb.Fallback):
        if fallback.kind != fb.CALL:
            return None
        try:
            value = fallback.fn(*call.args, **call.kwargs)
            return (await value,) if hasattr(value, "__await__") else (value,)
        except Exception:  # noqa: BLE001 - a failing fallback hands over to the next one (logged)
            call.fallback_failed(fallback)
            return None

    async def _aattempts(self, call: _Call) -> None:
        policy, local, clock = call.policy, call.local, self.clock
        is_coroutine = fb.is_async_callable(call.fn)
        hedging = call.hedging()
        bulkhead, delay = local.bulkhead, 0.0
        while delay is not None:
            if delay:
                await clock.asleep(delay)
            if not (bulkhead.try_acquire() or await bulkhead.aacquire(call.bulkhead_wait(call.time_left()))):
                call.bulkhead_full()
                return
            wait = 0.0 if policy.rate_limit_permits is None else call.rate_limit_wait()
            while wait:
                await clock.asleep(wait)
                wait = call.rate_limit_wait()
            owner = call.next_attempt(wait)
            if owner is None:
                return
            try:
                if not hedging:
                    value = await run_async(local.executor(policy), call.fn, call.args, call.kwargs, call.timeout_s,
                                            bulkhead.release, is_coroutine)
                else:
                    value = await self._ahedged(call, owner, call.timeout_s, is_coroutine)
            except BaseException as exc:  # noqa: BLE001 - every failure is classified and decided on
                delay = call.raised(owner[0], exc)
            else:
                delay = call.succeeded(owner[0], value)

    async def _ahedged(self, call: _Call, owner: list, timeout: float, is_coroutine: bool):
        """``_hedged`` for aexecute: the attempts are tasks (a sync operation's in worker threads), each
        ending by the same deadline; the first success wins and the other task is cancelled."""
        local = call.local
        release, executor = local.bulkhead.release, local.executor(call.policy)
        deadline = time.monotonic() + timeout

        def start() -> asyncio.Task:
            return asyncio.ensure_future(run_async(executor, call.fn, call.args, call.kwargs,
                                                   max(deadline - time.monotonic(), 0), release, is_coroutine))

        first = start()
        done, _ = await asyncio.wait({first}, timeout=min(call.hedge_delay_s(), timeout))
        hedge = None if done else call.take_hedge(deadline)
        if hedge is None:
            return await first
        second = start()
        started = {first: deadline - timeout, second: time.monotonic()}
        pending = {first: owner[0], second: hedge}
        try:
            while True:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in (t for t in (first, second) if t in done):  # the earlier attempt first
                    permit = pending.pop(task)
                    error = task.exception()
                    if isinstance(error, AttemptTimeout):  # the deadline came: the other ends now too, unheard
                        owner[0] = permit
                        for other_permit in pending.values():
                            call.hedge_dropped(other_permit)
                        raise error
                    if error is not None and pending:  # the other may still succeed
                        call.hedge_failed(permit, error, time.monotonic() - started[task])
                        continue
                    owner[0] = permit
                    for other_permit in pending.values():
                        call.hedge_dropped(other_permit)
                    return task.result()
        finally:
            for task in pending:  # the loser, or both when the caller is cancelled: each gives its slot back
                task.cancel()

    # -- operator views and actions -------------------------------------------

    def publish_transition(self, transition) -> None:
        level = logging.WARNING if transition.to_state == br.OPEN else logging.INFO
        logger.log(level, "breaker %s: %s -> %s (%s)", transition.integration, transition.from_state,
                   transition.to_state, transition.reason)
        self.bus.publish(StateTransition(transition))

    def request_dead_letter(self, call: _Call) -> None:
        dead_letter = call.dead_letter
        event = DeadLetterRequested(
            integration=call.policy.name, handler=dead_letter.handler, payload=dead_letter.payload,
            error=call.error.as_dict(), attempts=call.attempts, extra=dict(getattr(dead_letter, "extra", None) or {}),
        )
        if not self.bus.has_subscribers(DeadLetterRequested):
            logger.error("dead letter for %s (handler %s) not stored: no dead letter queue is installed",
                         event.integration, event.handler)
            return
        self.bus.publish(event)

    def breaker(self, name: str):
        return self.store.snapshot(self.registry.get(name))

    def quota(self, name: str):
        return self.store.quota_usage(self.registry.get(name))

    def cache_stats(self, name: str) -> dict:
        local = self._locals.get(name)
        hits, misses = (local.cache_hits, local.cache_misses) if local else (0, 0)
        total = hits + misses
        return {"integration": name, "hits": hits, "misses": misses, "hit_ratio": hits / total if total else None,
                **self.cache.local_stats(name, self.clock.time())}

    # -- the cache's own calls: background refresh and warming ----------------

    def refresh(self, name: str, fn: Callable, *args, cache_key=None, **kwargs) -> CallResult:
        """A live call through the pipeline (no cache lookup) whose value replaces the cached one:
        what cache warming runs. Raises ValueError when the call cannot be cached."""
        policy = self.registry.get(name)
        call = _Call(self, policy, fn, args, kwargs, (), None, cache_key)
        if call.material is None or policy.cache_ttl_s <= 0:
            raise ValueError(f"{name}: this call is not cached (cache_ttl_s is {policy.cache_ttl_s}; a cache_key "
                             f"or plain-data arguments of a named function are needed)")
        call.lookup = Lookup(policy, call.material)
        self._attempts(call)
        return call.finish()

    def refresh_in_background(self, call: _Call) -> None:
        """A hit past its soft TTL was served: fetch it again once, in the background."""
        if fb.is_async_callable(call.fn):
            task = asyncio.get_running_loop().create_task(self._arefresh(call), context=contextvars.Context())
            self._refreshes.add(task)  # a task nothing refers to may be collected before it ends
            task.add_done_callback(self._refreshes.discard)
        else:
            self.cache.in_background(functools.partial(self._refresh, call))

    def _refresh_call(self, call: _Call) -> _Call | None:
        fill = self.cache.claim_refresh(call.policy, call.material, self.clock.time())
        if fill is None:
            return None  # another process refreshes it, or has already
        again = _Call(self, call.policy, call.fn, call.args, call.kwargs, (), None, False, None, call.options)
        again.material, again.fn = call.material, call.fn
        again.lookup = Lookup(call.policy, call.material, fill=fill)
        return again

    def _refresh(self, call: _Call) -> None:
        try:
            again = self._refresh_call(call)
            if again is not None:
                self._attempts(again)
                again.finish()
        except Exception:  # noqa: BLE001 - the refresh thread outlives a failure; the entry stays as it is
            logger.exception("background refresh of a cached response of %s failed", call.policy.name)

    async def _arefresh(self, call: _Call) -> None:
        try:
            again = self._refresh_call(call)
            if again is not None:
                await self._aattempts(again)
                again.finish()
        except Exception:  # noqa: BLE001 - as _refresh
            logger.exception("background refresh of a cached response of %s failed", call.policy.name)

    def reset_breaker(self, policy: Policy, by: str | None = None, reason: str = "manual reset"):
        transition = self.store.reset(policy, by, reason)
        if transition is not None:
            self.publish_transition(transition)
        return transition

    def in_flight(self, name: str) -> int:
        local = self._locals.get(name)
        return local.bulkhead.in_flight if local else 0

    def concurrency_limit(self, name: str) -> int | None:
        """This process's bulkhead limit for ``name`` now (adaptive or fixed); None before its first call."""
        local = self._locals.get(name)
        return local.bulkhead.limit if local else None

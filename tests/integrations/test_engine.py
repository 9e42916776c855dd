"""The pipeline through execute / aexecute / @resilient, as docs/reference.md describes it."""

import asyncio
import dataclasses
import hashlib
import threading
import time

import pytest
from django.core.exceptions import ImproperlyConfigured

from integrations.errors import ErrorCategory, ResilienceError
from integrations.resilience import Fallback, aexecute, execute, resilient
from integrations.resilience.cache import hashed_key, key_material
from integrations.resilience.events import CallFinished
from integrations.resilience.quota import CRITICAL, HEALTHY, WARNING

# -- the result -----------------------------------------------------------------

# every engine test runs on the per-process store and on the shared Redis store
STORE_KINDS = ["local", "redis"]


def test_a_live_success_reports_its_value_and_source(make_engine):
    make_engine()
    result = execute("svc", lambda a, b=0: a + b, 40, b=2)
    assert (result.ok, result.value, result.error, result.source, result.fallback_used, result.attempts) == (
        True, 42, None, "live", None, 1)
    assert result.latency_ms >= 0


def test_execute_never_raises_for_the_integrations_failure(make_engine):
    make_engine(max_retries=0)

    def broken():
        raise RuntimeError("kaboom")

    result = execute("svc", broken)
    assert not result.ok
    assert result.error.category is ErrorCategory.UNKNOWN
    assert result.error.integration == "svc"
    assert isinstance(result.error.__cause__, RuntimeError)
    assert result.error.details["exception"] == "builtins.RuntimeError"


def test_an_unknown_integration_is_a_clear_programming_error(make_engine):
    make_engine()
    with pytest.raises(ImproperlyConfigured, match="'nope'"):
        execute("nope", lambda: 1)


def test_execute_refuses_a_coroutine_function(make_engine):
    make_engine()

    async def coro():
        return 1

    with pytest.raises(TypeError, match="aexecute"):
        execute("svc", coro)


def test_call_runs_under_the_policy_its_caller_read_and_refuses_another_integrations(make_engine):
    engine = make_engine(max_retries=0)
    policy = engine.registry.get("svc")
    tighter = dataclasses.replace(policy, max_retries=2)  # as if saved since: the caller's copy is the one used
    attempts = []

    def flaky():
        attempts.append(1)
        raise ResilienceError(ErrorCategory.SERVER_ERROR, "503")

    assert engine.call("svc", flaky, policy=tighter).attempts == 3
    with pytest.raises(ValueError, match="'svc'.*'other'"):
        engine.call("svc", flaky, policy=dataclasses.replace(policy, name="other"))
    assert len(attempts) == 3


# -- timeouts --------------------------------------------------------------------


def test_a_sync_attempt_that_hangs_is_abandoned_at_its_timeout(real_time_engine):
    real_time_engine(timeout_enforcement="thread", attempt_timeout_ms=100, max_retries=0)
    release = threading.Event()
    started = time.monotonic()
    result = execute("svc", release.wait, 10)
    waited = time.monotonic() - started
    release.set()
    assert result.error.category is ErrorCategory.TIMEOUT
    assert waited < 5  # the operation would have held the caller for 10 s


@pytest.fixture
def real_time_engine(make_engine):
    """An engine on the system clock, for timeouts that must really fire."""
    from integrations.resilience.clock import SystemClock

    def build(**knobs):
        engine = make_engine(**knobs)
        engine.clock = SystemClock()
        for store in (engine.store, getattr(engine.store, "local", None)):
            if store is not None:
                store.clock = engine.clock
        return engine

    return build


def test_the_overall_timeout_bounds_the_whole_call_across_retries(real_time_engine):
    real_time_engine(timeout_enforcement="thread", attempt_timeout_ms=150, timeout_ms=400, max_retries=10,
                     base_delay_ms=1, jitter=False, failure_threshold=100)
    release = threading.Event()
    started = time.monotonic()
    result = execute("svc", release.wait, 10)
    waited = time.monotonic() - started
    release.set()
    assert result.error.category is ErrorCategory.TIMEOUT
    assert result.attempts <= 3
    assert waited < 5


def test_an_inline_attempt_that_overruns_counts_as_a_timeout(make_engine, clock, upstream):
    make_engine(timeout_enforcement="inline", attempt_timeout_ms=100, max_retries=0)
    op = upstream("too late", clock=clock, takes=0.2)
    result = execute("svc", op)
    assert result.error.category is ErrorCategory.TIMEOUT
    assert "overran" in result.error.message


def test_an_operation_can_read_its_attempt_budget(make_engine):
    from integrations.resilience.timeouts import attempt_time_left

    make_engine(timeout_enforcement="thread", attempt_timeout_ms=2000)
    result = execute("svc", attempt_time_left)
    assert 0 < result.value <= 2.0
    assert attempt_time_left() is None


# -- bulkhead --------------------------------------------------------------------


def test_the_bulkhead_sheds_calls_beyond_max_concurrent(make_engine, upstream):
    make_engine(max_concurrent=2, bulkhead_wait_ms=0, timeout_enforcement="thread", attempt_timeout_ms=5000)
    release = threading.Event()
    entered = threading.Semaphore(0)

    def busy():
        entered.release()
        release.wait(5)
        return "done"

    threads = [threading.Thread(target=execute, args=("svc", busy)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert entered.acquire(timeout=5)
    op = upstream("never")
    result = execute("svc", op)
    release.set()
    for thread in threads:
        thread.join(5)
    assert result.error.category is ErrorCategory.BULKHEAD_FULL
    assert result.attempts == 0
    assert op.calls == 0


def test_a_call_waits_for_a_bulkhead_slot_up_to_bulkhead_wait_ms(real_time_engine):
    engine = real_time_engine(max_concurrent=1, bulkhead_wait_ms=3000, timeout_enforcement="thread",
                              attempt_timeout_ms=5000)
    entered = threading.Event()

    def short():
        entered.set()
        time.sleep(0.1)
        return "first"

    thread = threading.Thread(target=execute, args=("svc", short))
    thread.start()
    assert entered.wait(5)
    result = execute("svc", lambda: "second")
    thread.join(5)
    assert result.ok and result.value == "second"
    assert engine.in_flight("svc") == 0


def test_an_abandoned_attempt_keeps_its_slot_until_its_thread_ends(real_time_engine):
    engine = real_time_engine(max_concurrent=1, timeout_enforcement="thread", attempt_timeout_ms=50,
                              max_retries=0)
    release = threading.Event()
    assert execute("svc", release.wait, 10).error.category is ErrorCategory.TIMEOUT
    assert engine.in_flight("svc") == 1
    assert execute("svc", lambda: 1).error.category is ErrorCategory.BULKHEAD_FULL
    release.set()
    for _ in range(100):
        if engine.in_flight("svc") == 0:
            break
        time.sleep(0.01)
    assert execute("svc", lambda: 1).ok


# -- quota -----------------------------------------------------------------------


def test_calls_beyond_the_hourly_limit_are_refused_before_the_upstream(make_engine, upstream):
    make_engine(hourly_limit=3)
    op = upstream("ok")
    results = [execute("svc", op) for _ in range(5)]
    assert [r.ok for r in results] == [True, True, True, False, False]
    assert results[-1].error.category is ErrorCategory.QUOTA_EXCEEDED
    assert "hourly" in results[-1].error.message
    assert op.calls == 3


def test_the_hourly_window_resets_on_the_hour_but_the_daily_one_does_not(make_engine, clock, upstream):
    clock.advance(-(clock.time() % 86400))  # midnight UTC
    make_engine(hourly_limit=2, daily_limit=3)
    op = upstream("ok")
    assert [execute("svc", op).ok for _ in range(3)] == [True, True, False]
    clock.advance(3600)
    assert [execute("svc", op).ok for _ in range(2)] == [True, False]
    result = execute("svc", op)
    assert "daily" in result.error.message
    clock.advance(86400)
    assert execute("svc", op).ok


def test_each_retry_consumes_quota_because_it_reaches_the_upstream(make_engine, upstream):
    engine = make_engine(hourly_limit=10, max_retries=2, base_delay_ms=1, failure_threshold=100)
    execute("svc", upstream(ConnectionError()))
    assert engine.quota("svc").hourly_used == 3


@pytest.mark.parametrize("used, level", [(0, HEALTHY), (79, HEALTHY), (80, WARNING), (94, WARNING),
                                         (95, CRITICAL), (100, CRITICAL)])
def test_quota_usage_levels(make_engine, used, level):
    engine = make_engine(hourly_limit=100)
    for _ in range(used):
        execute("svc", lambda: 1)
    usage = engine.quota("svc")
    assert usage.hourly_used == used
    assert usage.level == level


def test_the_level_is_that_of_the_fullest_window(make_engine):
    engine = make_engine(hourly_limit=1000, daily_limit=10)
    for _ in range(9):
        execute("svc", lambda: 1)
    usage = engine.quota("svc")
    assert (usage.hourly_ratio, usage.daily_ratio, usage.level) == (0.009, 0.9, WARNING)


def test_calls_refused_by_an_open_breaker_consume_no_quota(make_engine, upstream):
    engine = make_engine(hourly_limit=100, failure_threshold=1, max_retries=0)
    execute("svc", upstream(ConnectionError()))
    for _ in range(5):
        execute("svc", lambda: 1)
    assert engine.quota("svc").hourly_used == 1


# -- cache -----------------------------------------------------------------------


def test_a_fresh_cache_hit_skips_the_upstream(make_engine, upstream, clock):
    engine = make_engine(cache_ttl_s=60)
    op = upstream({"price": 10})
    first = execute("svc", op, "AAPL")
    clock.advance(30)
    second = execute("svc", op, "AAPL")
    assert op.calls == 1
    assert (second.ok, second.value, second.source, second.attempts) == (True, {"price": 10}, "cache", 0)
    assert second.age_s == pytest.approx(30)
    assert first.source == "live"
    assert engine.cache_stats("svc") == {"integration": "svc", "hits": 1, "misses": 1, "hit_ratio": 0.5,
                                         "entries": 1, "average_age_s": pytest.approx(30)}


def test_a_cache_entry_older_than_the_ttl_is_not_served_fresh(make_engine, upstream, clock):
    make_engine(cache_ttl_s=60)
    op = upstream("v")
    execute("svc", op, "k")
    clock.advance(60)
    assert execute("svc", op, "k").source == "live"
    assert op.calls == 2


def test_different_parameters_are_cached_apart(make_engine, upstream):
    make_engine(cache_ttl_s=60)
    op = upstream("v")
    execute("svc", op, "AAPL")
    execute("svc", op, "MSFT")
    execute("svc", op, symbol="AAPL")
    assert op.calls == 3


def test_an_explicit_cache_key_identifies_the_call(make_engine, upstream):
    make_engine(cache_ttl_s=60)
    op = upstream("v")
    execute("svc", op, object(), cache_key="report-42")
    result = execute("svc", op, object(), cache_key="report-42")
    assert result.source == "cache"
    assert op.calls == 1


def test_calls_whose_arguments_are_not_plain_data_are_not_cached(make_engine, upstream):
    engine = make_engine(cache_ttl_s=60)
    op = upstream("v")
    execute("svc", op, object())
    execute("svc", op, object())
    assert op.calls == 2
    assert engine.cache_stats("svc")["misses"] == 0


def test_cache_keys_are_sha256_of_the_integration_and_the_parameters(make_engine):
    engine = make_engine(cache_ttl_s=60)
    policy = engine.registry.get("svc")
    material = key_material(None, (), {}, {"b": 1, "a": 2})
    assert material == '{"a":2,"b":1}'
    digest = hashlib.sha256(("svc\x00" + material).encode()).hexdigest()
    assert hashed_key("rc", policy, material).endswith(digest)


def test_a_failed_call_is_not_cached(make_engine, upstream):
    make_engine(cache_ttl_s=60, max_retries=0)
    op = upstream(ConnectionError(), "v")
    execute("svc", op, "k")
    assert execute("svc", op, "k").source == "live"


def test_a_cache_key_that_is_not_json_is_a_programming_error(make_engine):
    make_engine(cache_ttl_s=60)
    with pytest.raises(TypeError, match="cache_key"):
        execute("svc", lambda: 1, cache_key=object())


# -- fallbacks -------------------------------------------------------------------


def test_a_fallback_value_serves_a_failed_call_and_keeps_the_error(make_engine, upstream):
    make_engine(max_retries=0)
    result = execute("svc", upstream(ConnectionError("down")), fallbacks=(Fallback.value(None),))
    assert (result.ok, result.value, result.source, result.fallback_used) == (True, None, "fallback", "value")
    assert result.error.category is ErrorCategory.NETWORK
    assert result.attempts == 1


def test_fallbacks_are_tried_in_order_and_the_first_that_yields_wins(make_engine, upstream):
    make_engine(max_retries=0)
    calls = []

    def broken_fallback(*args):
        calls.append("broken")
        raise RuntimeError("fallback down too")

    def good_fallback(symbol):
        calls.append("good")
        return f"estimate for {symbol}"

    result = execute("svc", upstream(ConnectionError()), "AAPL", fallbacks=(
        Fallback.cache(), Fallback.last_known(), Fallback.call(broken_fallback), Fallback.call(good_fallback),
        Fallback.value("never reached")))
    assert result.value == "estimate for AAPL"
    assert result.fallback_used == "call"
    assert calls == ["broken", "good"]


def test_fallbacks_also_serve_refused_calls(make_engine):
    make_engine(mode="forced_open")
    result = execute("svc", lambda: 1, fallbacks=(Fallback.value("offline"),))
    assert (result.ok, result.value, result.attempts) == (True, "offline", 0)
    assert result.error.category is ErrorCategory.CIRCUIT_OPEN


def test_the_cache_fallback_serves_a_stale_entry_and_says_how_old(make_engine, upstream, clock):
    make_engine(cache_ttl_s=60, max_retries=0)
    op = upstream("cached", ConnectionError())
    execute("svc", op, "k")
    clock.advance(600)
    result = execute("svc", op, "k", fallbacks=(Fallback.cache(),))
    assert (result.ok, result.value, result.source, result.fallback_used) == (True, "cached", "fallback", "cache")
    assert result.age_s == pytest.approx(600)


def test_the_last_known_fallback_serves_the_last_good_value_without_a_cache_ttl(make_engine, upstream, clock):
    make_engine(cache_ttl_s=0, max_retries=0)
    op = upstream(1, 2, ConnectionError())
    fallbacks = (Fallback.last_known(),)
    execute("svc", op, "k", fallbacks=fallbacks)
    clock.advance(5)
    execute("svc", op, "k", fallbacks=fallbacks)
    clock.advance(100)
    result = execute("svc", op, "k", fallbacks=fallbacks)
    assert (result.value, result.fallback_used, result.age_s) == (2, "last_known", pytest.approx(100))


def test_cache_and_last_known_yield_nothing_when_nothing_was_stored(make_engine):
    make_engine(max_retries=0)
    result = execute("svc", lambda: (_ for _ in ()).throw(ConnectionError()),
                     fallbacks=(Fallback.cache(), Fallback.last_known()))
    assert not result.ok
    assert result.fallback_used is None


def test_fallbacks_must_be_fallback_objects(make_engine):
    make_engine()
    with pytest.raises(TypeError, match="Fallback"):
        execute("svc", lambda: 1, fallbacks=("default",))


# -- degraded mode ---------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0.1, 0.25, 0.5, 0.9])
def test_degraded_mode_lets_through_its_capacity_share_of_calls(make_engine, upstream, capacity):
    make_engine(capacity=capacity)
    op = upstream("ok")
    results = [execute("svc", op) for _ in range(1000)]
    shed = [r for r in results if not r.ok]
    assert abs(op.calls - 1000 * capacity) <= 1
    assert all(r.error.category is ErrorCategory.DEGRADED and r.attempts == 0 for r in shed)


def test_full_capacity_sheds_nothing(make_engine, upstream):
    make_engine(capacity=1.0)
    assert all(execute("svc", lambda: 1).ok for _ in range(100))


# -- events ----------------------------------------------------------------------


def test_every_call_publishes_what_happened(make_engine, upstream, bus):
    make_engine(max_retries=2, base_delay_ms=1, cache_ttl_s=60)
    seen = []
    bus.subscribe(CallFinished, seen.append)
    execute("svc", upstream(TimeoutError(), "v"), "k")
    execute("svc", upstream("v"), "k")
    live, cached = seen
    assert (live.ok, live.source, live.attempts, live.retries, live.cache, len(live.attempt_latencies_ms)) == (
        True, "live", 2, 1, "miss", 2)
    assert (cached.source, cached.cache, cached.attempts) == ("cache", "hit", 0)


def test_a_failing_subscriber_does_not_fail_the_call(make_engine, bus, caplog):
    make_engine()
    bus.subscribe(CallFinished, lambda event: 1 / 0)
    assert execute("svc", lambda: "fine").ok
    assert "subscriber" in caplog.text


# -- @resilient ------------------------------------------------------------------


def test_resilient_returns_the_value_or_raises_the_error(make_engine):
    make_engine(max_retries=0)

    @resilient("svc")
    def lookup(siren):
        if siren == "bad":
            raise ConnectionError("down")
        return {"siren": siren}

    assert lookup("123") == {"siren": "123"}
    assert lookup.__name__ == "lookup"
    with pytest.raises(ResilienceError) as caught:
        lookup("bad")
    assert caught.value.category is ErrorCategory.NETWORK


def test_resilient_serves_its_fallbacks(make_engine):
    make_engine(max_retries=0)

    @resilient("svc", fallbacks=(Fallback.value(None),))
    def lookup(siren):
        raise ConnectionError("down")

    assert lookup("123") is None


def test_resilient_takes_a_cache_key_function(make_engine, upstream):
    make_engine(cache_ttl_s=60)
    op = upstream("v")

    @resilient("svc", cache_key=lambda user, request_id: user)
    def profile(user, request_id):
        return op()

    profile("ann", 1)
    profile("ann", 2)
    assert op.calls == 1


# -- the async twins -------------------------------------------------------------


def test_aexecute_retries_then_succeeds(make_engine, clock):
    make_engine(max_retries=2, jitter=False, base_delay_ms=100)
    attempts = []

    async def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("down")
        return "ok"

    result = asyncio.run(aexecute("svc", flaky))
    assert (result.ok, result.value, result.attempts) == (True, "ok", 3)
    assert clock.sleeps == [0.1, 0.2]


def test_aexecute_cancels_a_coroutine_at_its_timeout(real_time_engine):
    real_time_engine(attempt_timeout_ms=100, max_retries=0)
    finished = []

    async def hang():
        await asyncio.sleep(10)
        finished.append(True)

    started = time.monotonic()
    result = asyncio.run(aexecute("svc", hang))
    assert result.error.category is ErrorCategory.TIMEOUT
    assert time.monotonic() - started < 5
    assert finished == []


def test_aexecute_runs_a_sync_operation_off_the_event_loop(real_time_engine):
    real_time_engine(attempt_timeout_ms=100, max_retries=0)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        result = await aexecute("svc", time.sleep, 0.5)
        task.cancel()
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result.error.category is ErrorCategory.TIMEOUT
    assert ticks > 0  # the loop kept running while the sync operation slept


def test_aexecute_serves_fallbacks_including_async_ones(make_engine):
    make_engine(max_retries=0)

    async def down():
        raise ConnectionError("down")

    async def fallback():
        return "from async fallback"

    result = asyncio.run(aexecute("svc", down, fallbacks=(Fallback.call(fallback),)))
    assert (result.value, result.fallback_used) == ("from async fallback", "call")


def test_aexecute_serves_fresh_cache_hits(make_engine, clock):
    make_engine(cache_ttl_s=60)
    calls = []

    async def price(symbol):
        calls.append(symbol)
        return 10

    asyncio.run(aexecute("svc", price, "AAPL"))
    result = asyncio.run(aexecute("svc", price, "AAPL"))
    assert (result.source, calls) == ("cache", ["AAPL"])


def test_async_calls_share_the_bulkhead(make_engine):
    make_engine(max_concurrent=2, bulkhead_wait_ms=0, attempt_timeout_ms=5000)

    async def main():
        gate = asyncio.Event()

        async def busy():
            await gate.wait()
            return "done"

        first = [asyncio.create_task(aexecute("svc", busy)) for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = await aexecute("svc", busy)
        gate.set()
        return refused, await asyncio.gather(*first)

    refused, done = asyncio.run(main())
    assert refused.error.category is ErrorCategory.BULKHEAD_FULL
    assert [r.ok for r in done] == [True, True]


def test_an_async_call_waits_for_a_bulkhead_slot(make_engine):
    make_engine(max_concurrent=1, bulkhead_wait_ms=2000, attempt_timeout_ms=5000)

    async def main():
        async def short():
            await asyncio.sleep(0.05)
            return "first"

        first = asyncio.create_task(aexecute("svc", short))
        await asyncio.sleep(0.01)
        second = await aexecute("svc", short)
        return await first, second

    first, second = asyncio.run(main())
    assert first.ok and second.ok


def test_resilient_guards_coroutines_too(make_engine):
    make_engine(max_retries=0)

    @resilient("svc", fallbacks=(Fallback.value("fallback"),))
    async def fetch(fail):
        if fail:
            raise TimeoutError()
        return "live"

    assert asyncio.run(fetch(False)) == "live"
    assert asyncio.run(fetch(True)) == "fallback"


def test_lambdas_and_unnamed_callables_are_not_cached_by_arguments(make_engine):
    engine = make_engine(cache_ttl_s=60)
    execute("svc", lambda x: x, 1)
    execute("svc", lambda x: -x, 1)  # same qualname as the first lambda: must not be served its value
    assert engine.cache_stats("svc")["hits"] == 0


def test_a_partial_is_keyed_on_its_function_and_all_its_arguments(make_engine, upstream):
    import functools

    make_engine(cache_ttl_s=60)
    op = upstream("v")
    execute("svc", functools.partial(op, "AAPL"))
    assert execute("svc", functools.partial(op, "AAPL")).source == "cache"
    assert execute("svc", functools.partial(op, "MSFT")).source == "live"

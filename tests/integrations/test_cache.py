"""The response cache (integrations/resilience/cache.py): one fill per key, stale-while-revalidate,
the in-process L1 and invalidation that reaches every process.

Runs on the embedded cache (local memory) and, with REDIS_URL, on the site's Redis cache, where
the fill lock and the invalidation record are shared by OS processes.
"""

import asyncio
import threading
import time

import pytest
import redis
from django.core.cache import caches

from conftest import Upstream, count_round_trips, redis_url
from integrations.errors import ErrorCategory
from integrations.resilience import Engine, Policy, execute
from integrations.resilience.cache import ResponseCache, fill_key
from integrations.resilience.clock import SystemClock
from integrations.resilience.events import EventBus
from integrations.resilience.options import CallOptions
from integrations.resilience.registry import PolicyRegistry
from integrations.resilience.state import LocalStore

needs_redis = pytest.mark.skipif(not redis_url(), reason="needs Redis: set REDIS_URL (the second run of .ci/run does)")


def real_engine(cache=None, **knobs):
    """An engine on the real clock: these tests run calls in threads at once."""
    knobs.setdefault("timeout_enforcement", "inline")
    knobs.setdefault("cache_ttl_s", 60)
    registry = PolicyRegistry()
    registry.put(Policy(name="svc", **knobs))
    clock = SystemClock()
    return Engine(registry=registry, store=LocalStore(clock), cache=cache or ResponseCache(), clock=clock,
                  bus=EventBus())


class Gate:
    """An upstream that answers only when released, counting its calls."""

    def __init__(self, value="v", error=None):
        # named as a function would be (an instance's class attribute __qualname__ is not seen), so that
        # its calls are cached by their arguments
        self.__qualname__, self.__module__ = "Gate", "tests"
        self.value, self.error = value, error
        self.calls = 0
        self.entered = threading.Event()
        self.released = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, *args):
        with self._lock:
            self.calls += 1
        self.entered.set()
        assert self.released.wait(10), "the test never released the upstream"
        if self.error is not None:
            raise self.error
        return self.value


def at_once(count, fn):
    """``fn()`` in ``count`` threads started together; their results in order."""
    barrier = threading.Barrier(count)
    results = [None] * count

    def run(index):
        barrier.wait()
        results[index] = fn()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads, results


def joined(threads, results):
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    return results


def wait_until(condition, seconds=5.0):
    give_up = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < give_up, "the condition never held"
        time.sleep(0.005)


# -- one fill per key ----------------------------------------------------------------------------


def test_ten_concurrent_misses_for_one_key_make_one_upstream_call():
    engine = real_engine()
    upstream = Gate({"price": 10})
    threads, results = at_once(10, lambda: engine.execute("svc", upstream, "AAPL"))
    assert upstream.entered.wait(5)
    time.sleep(0.05)  # the other nine reach the cache step and wait
    upstream.released.set()
    results = joined(threads, results)

    assert upstream.calls == 1
    assert all(result.ok and result.value == {"price": 10} for result in results)
    assert sorted(result.source for result in results) == ["cache"] * 9 + ["live"]
    assert results[0].value is not results[1].value or results[0].source == results[1].source == "live"


def test_calls_waiting_for_a_fill_share_its_failure_without_calling_the_upstream():
    engine = real_engine(max_retries=0)
    upstream = Gate(error=ConnectionError("down"))
    threads, results = at_once(5, lambda: engine.execute("svc", upstream, "AAPL"))
    assert upstream.entered.wait(5)
    time.sleep(0.05)
    upstream.released.set()
    results = joined(threads, results)

    assert upstream.calls == 1
    assert {result.error.category for result in results} == {ErrorCategory.NETWORK}
    assert sorted(bool(result.error.details.get("coalesced")) for result in results) == [False] + [True] * 4
    assert sum(result.attempts for result in results) == 1


def test_a_call_finding_its_key_being_filled_serves_the_stale_entry_at_once(make_engine, clock):
    engine = make_engine(cache_ttl_s=60)
    assert execute("svc", Upstream("old"), cache_key="AAPL").source == "live"
    clock.advance(61)  # past the TTL, within RESILIENCE_CACHE_STALE_S
    upstream = Gate("new")
    filler = threading.Thread(target=engine.execute, args=("svc", upstream), kwargs={"cache_key": "AAPL"})
    filler.start()
    assert upstream.entered.wait(5)

    meanwhile = engine.execute("svc", upstream, cache_key="AAPL")

    upstream.released.set()
    filler.join(10)
    assert (meanwhile.value, meanwhile.source, meanwhile.age_s) == ("old", "cache", 61)
    assert upstream.calls == 1
    assert engine.execute("svc", upstream, cache_key="AAPL").value == "new"


def test_a_call_waiting_for_a_fill_stops_at_its_own_deadline():
    engine = real_engine()
    upstream = Gate()
    filler = threading.Thread(target=engine.execute, args=("svc", upstream, "AAPL"))
    filler.start()
    assert upstream.entered.wait(5)

    started = time.monotonic()
    waiter = engine.execute("svc", upstream, "AAPL", call_options=CallOptions(timeout_ms=200))
    waited = time.monotonic() - started
    still_filling = filler.is_alive()  # the waiter returned at its deadline, not when the fill ended

    upstream.released.set()
    filler.join(10)
    assert (waiter.ok, waiter.error.category, waiter.attempts) == (False, ErrorCategory.TIMEOUT, 0)
    assert "another call fetched the same cache key" in waiter.error.message
    assert still_filling
    assert waited >= 0.2  # it waited for the fill up to its deadline (a lower bound: no race)
    assert upstream.calls == 1


def test_a_fill_that_times_out_does_not_keep_its_waiters_past_its_own_deadline():
    engine = real_engine(max_retries=0, timeout_ms=300, attempt_timeout_ms=300, timeout_enforcement="thread")
    upstream = Gate()  # never answers within the filler's 300 ms
    filler = threading.Thread(target=engine.execute, args=("svc", upstream, "AAPL"))
    filler.start()
    assert upstream.entered.wait(5)
    # a waiter with a longer deadline than the filler's: it gets the filler's TIMEOUT once the filler
    # gives up, or fills the key itself, never hangs on a fill that is over
    waiter = engine.execute("svc", upstream, "AAPL", call_options=CallOptions(timeout_ms=5_000,
                                                                              attempt_timeout_ms=5_000))
    filler.join(10)
    upstream.released.set()
    assert waiter.error is not None and waiter.error.category is ErrorCategory.TIMEOUT
    assert waiter.error.details.get("coalesced") is True
    assert upstream.calls == 1
    upstream.value, upstream.released = "later", threading.Event()
    upstream.released.set()
    assert engine.execute("svc", upstream, "AAPL").value == "later"  # the key fills again once asked


def test_a_waiter_gets_a_value_of_its_own_not_the_fillers_object():
    engine = real_engine()
    upstream = Gate({"prices": [1, 2]})
    threads, results = at_once(3, lambda: engine.execute("svc", upstream, "AAPL"))
    assert upstream.entered.wait(5)
    time.sleep(0.05)
    upstream.released.set()
    results = joined(threads, results)
    results[0].value["prices"].append(3)  # a caller changing its value changes nobody else's
    assert [result.value for result in results[1:]] == [{"prices": [1, 2]}] * 2
    assert engine.execute("svc", upstream, "AAPL").value == {"prices": [1, 2]}


def test_a_filler_that_went_away_lets_the_next_call_fill(make_engine):
    engine = make_engine(cache_ttl_s=60)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.execute("svc", interrupted, cache_key="k")
    result = engine.execute("svc", Upstream("v"), cache_key="k")
    assert (result.ok, result.source) == (True, "live")


def test_async_calls_wait_for_one_fill():
    engine = real_engine()
    calls = []

    async def fetch(symbol):
        calls.append(symbol)
        await asyncio.sleep(0.1)
        return symbol.lower()

    async def main():
        return await asyncio.gather(*(engine.aexecute("svc", fetch, "AAPL") for _ in range(8)))

    results = asyncio.run(main())
    assert calls == ["AAPL"]
    assert [result.value for result in results] == ["aapl"] * 8


# -- stale-while-revalidate --------------------------------------------------------------------


def test_past_the_soft_ttl_the_entry_is_served_and_refreshed_once_in_the_background(make_engine, clock):
    engine = make_engine(cache_ttl_s=60, cache_soft_ttl_s=30)
    values = iter(["first", "second", "third"])
    upstream = Upstream(None)
    upstream.steps = []
    refreshed = threading.Event()

    def fetch(symbol):
        upstream.calls += 1
        value = next(values)
        if upstream.calls == 2:
            refreshed.wait(5)  # the refresh waits until every stale hit was served
        return value

    fetch.__qualname__ = "fetch"
    assert execute("svc", fetch, "AAPL").value == "first"
    clock.advance(40)
    served = [execute("svc", fetch, "AAPL") for _ in range(5)]
    refreshed.set()

    assert [(r.value, r.source, r.age_s) for r in served] == [("first", "cache", 40)] * 5
    wait_until(lambda: execute("svc", fetch, "AAPL").value == "second")
    assert upstream.calls == 2
    assert execute("svc", fetch, "AAPL").age_s < 1


def test_concurrent_hits_past_the_soft_ttl_make_one_background_call(make_engine, clock):
    make_engine(cache_ttl_s=60, cache_soft_ttl_s=30)
    upstream = Gate("second")
    execute("svc", Upstream("first"), cache_key="AAPL")
    clock.advance(40)
    threads, results = at_once(10, lambda: execute("svc", upstream, cache_key="AAPL"))
    results = joined(threads, results)  # every caller is answered while the refresh is still held
    assert [(r.value, r.source, r.age_s) for r in results] == [("first", "cache", 40)] * 10
    assert upstream.entered.wait(5)
    upstream.released.set()
    wait_until(lambda: execute("svc", upstream, cache_key="AAPL").value == "second")
    assert upstream.calls == 1


def test_an_async_operation_past_the_soft_ttl_is_refreshed_by_a_task(make_engine, clock):
    engine = make_engine(cache_ttl_s=60, cache_soft_ttl_s=30)
    calls = []

    async def quote(symbol):
        calls.append(symbol)
        return f"{symbol}-{len(calls)}"

    async def main():
        first = await engine.aexecute("svc", quote, "AAPL")
        clock.advance(40)
        served = [await engine.aexecute("svc", quote, "AAPL") for _ in range(3)]
        while len(calls) < 2:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)
        return first, served, await engine.aexecute("svc", quote, "AAPL")

    first, served, after = asyncio.run(main())
    assert first.value == "AAPL-1"
    assert [(r.value, r.source) for r in served] == [("AAPL-1", "cache")] * 3
    assert (after.value, after.source, calls) == ("AAPL-2", "cache", ["AAPL", "AAPL"])


@pytest.mark.django_db
@pytest.mark.parametrize("knobs", [
    {"cache_ttl_s": 60, "cache_soft_ttl_s": 60},
    {"cache_ttl_s": 60, "cache_soft_ttl_s": 90},
    {"cache_ttl_s": 0, "cache_soft_ttl_s": 10},
    {"cache_ttl_s": 60, "cache_soft_ttl_s": 0},
    {"cache_ttl_s": 60, "cache_soft_ttl_s": -5},
])
def test_a_soft_ttl_not_below_the_ttl_or_not_positive_is_refused_naming_the_field(knobs):
    from django.core.exceptions import ValidationError

    from integrations.models import Integration

    with pytest.raises(ValidationError) as caught:
        Integration(name="svc", **knobs).full_clean()
    assert list(caught.value.message_dict) == ["cache_soft_ttl_s"], caught.value.message_dict
    if knobs["cache_soft_ttl_s"] < 1:
        from integrations.resilience.policy import InvalidPolicy

        with pytest.raises(InvalidPolicy, match="cache_soft_ttl_s"):
            Policy(name="svc", **knobs)


@pytest.mark.django_db
def test_a_soft_ttl_below_the_ttl_is_valid():
    from integrations.models import Integration

    Integration(name="svc", cache_ttl_s=60, cache_soft_ttl_s=59).full_clean()


def test_a_soft_ttl_refresh_that_fails_keeps_the_entry(make_engine, clock):
    engine = make_engine(cache_ttl_s=60, cache_soft_ttl_s=30, max_retries=0)
    upstream = Upstream("v", ConnectionError("down"))
    execute("svc", upstream, "AAPL")
    clock.advance(40)
    assert execute("svc", upstream, "AAPL").value == "v"
    wait_until(lambda: upstream.calls == 2)
    time.sleep(0.05)
    clock.advance(5)
    assert (execute("svc", upstream, "AAPL").value, engine.cache_stats("svc")["entries"]) == ("v", 1)


def test_two_processes_past_the_soft_ttl_refresh_once_between_them():
    """Two engines with a ResponseCache each (an L1, refresh marks and Flights of their own, as two
    processes have) on the one shared backend: the fleet's fill lock lets one refresh through."""
    engines = [real_engine(ResponseCache(), cache_ttl_s=60, cache_soft_ttl_s=1) for _ in range(2)]
    upstream = Gate("second")
    engines[0].execute("svc", Upstream("first"), cache_key="AAPL")
    for engine in engines:
        assert engine.execute("svc", upstream, cache_key="AAPL").value == "first"  # both hold it in their L1
    time.sleep(1.05)  # past the soft TTL on the real clock
    for engine in engines:
        assert engine.execute("svc", upstream, cache_key="AAPL").source == "cache"
    assert upstream.entered.wait(5)
    time.sleep(0.1)  # the other engine's refresh meets the fill lock meanwhile (or, if later, the new entry)
    upstream.released.set()
    wait_until(lambda: all(engine.execute("svc", upstream, cache_key="AAPL").value == "second"
                           for engine in engines))
    assert upstream.calls == 1


# -- two levels and clearing -------------------------------------------------------------------


def test_clearing_a_key_a_prefix_or_everything_hides_only_those_entries(make_engine):
    engine = make_engine(cache_ttl_s=60)
    upstream = Upstream("v")
    keys = ["quotes/EUR", "quotes/USD", "orders/1", ["list", 1]]
    for key in keys:
        execute("svc", upstream, cache_key=key)

    def sources():
        return [execute("svc", upstream, cache_key=key).source for key in keys]

    assert sources() == ["cache"] * 4
    engine.cache.clear("svc", key="quotes/EUR", policy=engine.registry.get("svc"))
    assert sources() == ["live", "cache", "cache", "cache"]
    engine.cache.clear("svc", prefix="quotes/")
    assert sources() == ["live", "live", "cache", "cache"]
    engine.cache.clear("svc")
    assert sources() == ["live"] * 4
    assert sources() == ["cache"] * 4  # what is stored after a clear is served


def test_clear_refuses_a_key_and_a_prefix_together(make_engine):
    engine = make_engine(cache_ttl_s=60)
    with pytest.raises(ValueError, match="a key or a prefix, not both"):
        engine.cache.clear("svc", key="a", prefix="b")
    with pytest.raises(TypeError, match="prefix must be a string"):
        engine.cache.clear("svc", prefix=3)


def test_a_clear_hides_a_value_fetched_before_it_even_if_stored_after(make_engine):
    engine = make_engine(cache_ttl_s=60)
    upstream = Gate("before the clear")
    filler = threading.Thread(target=engine.execute, args=("svc", upstream, "AAPL"))
    filler.start()
    assert upstream.entered.wait(5)
    engine.cache.clear("svc")
    upstream.released.set()
    filler.join(10)
    assert execute("svc", Upstream("after"), "AAPL").value == "after"


def test_the_statistics_count_this_processs_entries_and_their_average_age(make_engine, clock):
    engine = make_engine(cache_ttl_s=60)
    assert engine.cache_stats("svc")["entries"] == 0
    assert engine.cache_stats("svc")["average_age_s"] is None
    execute("svc", Upstream("a"), "A")
    clock.advance(10)
    execute("svc", Upstream("b"), "B")
    stats = engine.cache_stats("svc")
    assert (stats["entries"], stats["average_age_s"]) == (2, pytest.approx(5))


@pytest.mark.django_db
def test_a_cache_hit_makes_no_query_and_an_l1_hit_no_redis_round_trip(make_engine, django_assert_num_queries,
                                                                      monkeypatch):
    engine = make_engine(cache_ttl_s=60)
    upstream = Upstream("v")
    execute("svc", upstream, "AAPL")
    other = ResponseCache()  # another process: nothing in its L1
    sent = count_round_trips(monkeypatch)
    with django_assert_num_queries(0):
        shared_hit = other.consult(engine.registry.get("svc"), material(), engine.clock.time(), 1.0)
        shared_trips = len(sent)
        l1_hit = other.consult(engine.registry.get("svc"), material(), engine.clock.time(), 1.0)
    assert shared_hit.hit[0] == l1_hit.hit[0] == "v"
    if redis_url():
        assert shared_trips == 1
    assert len(sent) == shared_trips  # the L1 hit: none


def material(fn=None):
    """The key material of ``fn("AAPL")`` (by default an Upstream's)."""
    from integrations.resilience.cache import key_material

    return key_material(fn or Upstream("v"), ("AAPL",), {}, None)


@needs_redis
def test_the_fill_lock_lives_no_longer_than_the_fillers_deadline():
    engine = real_engine(timeout_ms=400, attempt_timeout_ms=400)
    upstream = Gate()
    filler = threading.Thread(target=engine.execute, args=("svc", upstream, "AAPL"))
    filler.start()
    assert upstream.entered.wait(5)
    backend = caches["default"]
    key = backend.client.make_key(fill_key(engine.registry.get("svc"), material(upstream)))
    ttl_ms = backend.client.get_client(write=True).pttl(key)
    upstream.released.set()
    filler.join(10)
    assert 0 < ttl_ms <= 400
    assert backend.client.get_client(write=True).exists(key) == 0  # released once the fill is stored


@needs_redis
def test_a_key_another_process_fills_is_waited_for_until_its_lock_expires_then_filled_here():
    engine = real_engine()
    policy = engine.registry.get("svc")
    upstream = Upstream("here")
    # another process took the fleet's fill lock and vanished (killed mid-fill): no entry will land
    assert caches["default"].add(fill_key(policy, material(upstream)), "a vanished process", 0.4)

    short = engine.execute("svc", upstream, "AAPL", call_options=CallOptions(timeout_ms=150))
    assert (short.ok, short.error.category, short.attempts, upstream.calls) == (False, ErrorCategory.TIMEOUT, 0, 0)

    patient = engine.execute("svc", upstream, "AAPL", call_options=CallOptions(timeout_ms=5_000))
    assert (patient.ok, patient.value, patient.source, upstream.calls) == (True, "here", "live", 1)


@needs_redis
def test_a_key_another_process_fills_serves_the_stale_entry_meanwhile(make_engine, clock):
    engine = make_engine(cache_ttl_s=60)
    upstream = Upstream("old", "new")
    execute("svc", upstream, "AAPL")
    clock.advance(61)
    assert caches["default"].add(fill_key(engine.registry.get("svc"), material(upstream)), "another process", 5)
    other_process = ResponseCache()  # nothing in its L1: it reads the shared entry
    engine.cache = other_process
    stale = execute("svc", upstream, "AAPL")
    assert (stale.value, stale.source, stale.age_s, upstream.calls) == ("old", "cache", 61, 1)


# -- across OS processes ----------------------------------------------------------------------


def _miss_together(index, barrier, results, counter_key):
    engine = real_engine()
    client = redis.Redis.from_url(redis_url())

    def fetch(symbol):
        client.incr(counter_key)
        time.sleep(0.3)
        return symbol.lower()

    fetch.__qualname__ = "fetch"
    barrier.wait()
    threads, values = at_once(5, lambda: engine.execute("svc", fetch, "AAPL").value)
    results.put(joined(threads, values))


@needs_redis
def test_concurrent_misses_in_several_processes_make_one_upstream_call():
    from fleet_support import run_processes

    counter_key = f"test-cache-calls-{time.time_ns()}"
    client = redis.Redis.from_url(redis_url())
    try:
        results = run_processes(_miss_together, counter_key, count=4)
        assert int(client.get(counter_key)) == 1
    finally:
        client.delete(counter_key)
    assert [value for values in results for value in values] == ["aapl"] * 20


KEYS = ("quotes/EUR", "quotes/USD", "orders/1")
# each phase: what the parent clears, the key that stops being served, the keys still served
PHASES = (({"key": "quotes/EUR"}, "quotes/EUR", ("quotes/USD", "orders/1")),
          ({"prefix": "quotes/"}, "quotes/USD", ("orders/1",)),
          ({}, "orders/1", ()))


def _serve_until_cleared(index, barrier, results, phase):
    """A process serving KEYS from its L1; in each phase it polls until the cleared key stops being
    served (the parent's clear reached it), and checks the others still are."""
    engine = real_engine()
    new = Upstream("new")

    def read(key):
        return engine.execute("svc", new, cache_key=key)

    assert [read(key).value for key in KEYS] == ["old"] * 3
    assert [read(key).source for key in KEYS] == ["cache"] * 3  # now in this process's L1
    barrier.wait()
    for number, (_, cleared, kept) in enumerate(PHASES, start=1):
        wait_until(lambda: phase.value >= number, 30)
        started = time.monotonic()
        while read(cleared).value == "old":
            assert time.monotonic() - started < 10, f"process {index} still serves {cleared} 10 s after its clear"
            time.sleep(0.002)
        still = [(read(key).value, read(key).source) for key in kept]
        results.put((index, number, time.monotonic() - started, still))


@needs_redis
def test_a_clear_of_a_key_a_prefix_or_everything_reaches_every_process():
    from fleet_support import FORK, connections

    engine = real_engine()
    for key in KEYS:
        engine.execute("svc", Upstream("old"), cache_key=key)
    connections.close_all()  # a forked child must open its own database connection
    count = 3
    barrier, results, phase = FORK.Barrier(count + 1), FORK.Queue(), FORK.Value("i", 0)
    processes = [FORK.Process(target=_serve_until_cleared, args=(i, barrier, results, phase)) for i in range(count)]
    for process in processes:
        process.start()
    try:
        barrier.wait(30)  # every process holds the three entries in its L1
        for number, (clear, _, kept) in enumerate(PHASES, start=1):
            engine.cache.clear("svc", **clear, policy=engine.registry.get("svc"))
            phase.value = number
            reports = sorted(results.get(timeout=60) for _ in processes)
            assert [(index, seen) for index, seen, _, _ in reports] == [(i, number) for i in range(count)]
            assert all(still == [("old", "cache")] * len(kept) for _, _, _, still in reports), reports
    finally:
        for process in processes:
            process.join(30)
    assert [process.exitcode for process in processes] == [0] * count


def test_an_l1_hit_trusts_its_view_of_the_clears_for_view_s_then_reads_it_again(make_engine, clock):
    """The bound a clear reaches another process within: its L1 serves an entry cleared elsewhere for
    at most ``view_s`` (0.5 s) after it last read the invalidation record, then reads it again."""
    make_engine(cache_ttl_s=60)
    execute("svc", Upstream("old"), cache_key="k")
    seconds = [1000.0]
    other = ResponseCache(view_s=0.5, monotonic=lambda: seconds[0])  # another process, on its own clock
    policy, material_k = Policy(name="svc", cache_ttl_s=60), '"k"'
    assert other.consult(policy, material_k, clock.time(), 1.0).hit[0] == "old"  # read shared, kept in its L1

    ResponseCache().clear("svc")  # cleared by a third process
    seconds[0] += 0.49
    assert other.consult(policy, material_k, clock.time(), 1.0).hit[0] == "old"  # its view is 0.49 s old
    seconds[0] += 0.01
    after = other.consult(policy, material_k, clock.time(), 1.0)
    assert (after.hit, after.fill is not None) == (None, True)  # the record read again: gone, to be filled
    other.settle(after)



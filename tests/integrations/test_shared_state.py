"""Shared state across OS processes, on the real Redis (and PostgreSQL for stored events).

Each process builds its own engine and RedisStore, as a gunicorn worker
would; nothing is shared but Redis (and the database). The fleet-wide checks
(tests/fleet_support.py) run on Cluster and Sentinel too, in tests/integrations/test_redis_topologies.py.
"""

import shutil
import time
import uuid

import pytest
from django.db import connection, connections

from integrations.errors import ErrorCategory
from integrations.models import BreakerEvent, Integration
from integrations.resilience import Engine, Policy, execute
from integrations.resilience.clock import FakeClock
from integrations.resilience.events import EventBus, SharedStateChanged
from integrations.resilience.leases import LEASE_MAX
from integrations.resilience.registry import PolicyRegistry
from integrations.resilience.redis_store import RedisStore

from conftest import redis_url
from fleet_support import (FORK, OwnRedis, check_a_trip_is_seen_by_another_store,
                           check_fleet_makes_exactly_the_hourly_limit_of_calls,
                           check_half_open_admits_exactly_half_open_max_calls, check_one_trip_per_fleet, down,
                           engine_on, run_processes, seen_within_one_second)

pytestmark = pytest.mark.skipif(not redis_url(), reason="needs Redis: set REDIS_URL (the second run of .ci/run does)")

# -- the breaker trips once for the whole fleet ------------------------------------


def test_processes_open_the_breaker_exactly_once_per_trip():
    check_one_trip_per_fleet(redis_url())


# -- half-open admits exactly half_open_max_calls across the fleet ------------------------


def test_half_open_admits_exactly_half_open_max_calls_across_processes():
    check_half_open_admits_exactly_half_open_max_calls(redis_url())


# -- a quota is one quota for the fleet ---------------------------------------------------


def test_processes_share_an_hourly_limit_exactly():
    check_fleet_makes_exactly_the_hourly_limit_of_calls(redis_url())


def test_a_busy_process_leases_quota_and_a_refusal_elsewhere_comes_early_by_at_most_its_unspent_lease(
        two_processes_view):
    policy = Policy(name="leased", hourly_limit=400, daily_limit=10_000, timeout_enforcement="inline")
    busy, other = two_processes_view(policy)
    spent = 0
    while spent < 150:  # until the busy process holds units taken ahead and not spent yet
        assert busy.execute("leased", lambda: 1).ok
        spent += 1
        if spent > 20 and other.store.quota_usage(policy).hourly_used > spent:
            break
    # another process sees the units leased ahead as used; the busy one, what it spent
    assert 0 < other.store.quota_usage(policy).hourly_used - spent <= LEASE_MAX
    assert busy.store.quota_usage(policy).hourly_used == spent
    spent_elsewhere = 0
    while other.execute("leased", lambda: 1).ok:
        spent_elsewhere += 1
    assert 0 <= 400 - (spent + spent_elsewhere) <= LEASE_MAX  # refused early by at most the unspent lease
    busy.store.settle_quota_leases(everything=True)  # (the flusher does it once the lease is past its time)
    while other.execute("leased", lambda: 1).ok:
        spent_elsewhere += 1
    assert spent + spent_elsewhere == 400  # every unit given back was spent: the limit, exactly
    usage = other.store.quota_usage(policy)
    assert (usage.hourly_used, usage.daily_used) == (400, 400)


# -- a time window is one window for the fleet ---------------------------------------------

TIME_WINDOW = Policy(name="timed", window_type="time", window_duration_s=60, failure_threshold=100,
                     failure_rate_threshold=50, minimum_calls=4, max_retries=0, timeout_enforcement="inline")


@pytest.fixture
def two_processes_on_one_clock():
    """Two engines with their own stores and clients on one Redis, whose stores read one FakeClock."""
    prefix, clock = f"test-{uuid.uuid4().hex[:12]}", FakeClock()
    return clock, [engine_on(redis_url(), prefix, TIME_WINDOW, clock=clock) for _ in range(2)]


def test_a_time_window_sums_every_process_calls_of_the_last_seconds_only(two_processes_on_one_clock):
    clock, (first, second) = two_processes_on_one_clock
    for _ in range(2):
        first.execute("timed", down)
        assert second.execute("timed", lambda: 1).ok  # fast successes: deferred by this process
    clock.advance(61)
    second.execute("timed", down)  # carries the successes of a minute ago: counted then, gone now
    first.execute("timed", down)
    first.execute("timed", down)
    snapshot = second.store.snapshot(TIME_WINDOW)
    assert (snapshot.state, snapshot.window_calls, snapshot.window_failures) == ("closed", 3, 3)
    first.execute("timed", down)  # 4 of 4 in the last minute, from two processes
    assert first.store.snapshot(TIME_WINDOW).state == "open"
    result = seen_within_one_second(lambda: second.execute("timed", lambda: 1), lambda r: not r.ok)
    assert result.error.category is ErrorCategory.CIRCUIT_OPEN


def test_deferred_successes_are_counted_in_the_second_they_happened(two_processes_on_one_clock):
    clock, (first, second) = two_processes_on_one_clock
    assert first.execute("timed", lambda: 1).ok  # deferred
    clock.advance(1)
    assert first.execute("timed", lambda: 1).ok  # a later second: sent at once, with the first
    assert second.store.snapshot(TIME_WINDOW).window_calls == 2  # without waiting for a flush
    clock.advance(59.5)
    assert second.store.snapshot(TIME_WINDOW).window_calls == 1  # the first left the window, not the second


# -- changes made by one process are seen by the others within 1 s -------------------------


@pytest.fixture
def two_processes_view():
    """Two engines with their own stores and clients: what two workers see of one Redis."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"

    def build(policy):
        return engine_on(redis_url(), prefix, policy), engine_on(redis_url(), prefix, policy)

    return build


def test_a_trip_in_one_process_refuses_calls_in_another(two_processes_view):
    first, second = two_processes_view(Policy(name="p", failure_threshold=2, max_retries=0,
                                              timeout_enforcement="inline"))
    assert second.execute("p", lambda: "ok").ok
    for _ in range(2):
        first.execute("p", down)
    result = seen_within_one_second(lambda: second.execute("p", lambda: "never"), lambda r: not r.ok)
    assert result.error.category is ErrorCategory.CIRCUIT_OPEN
    assert result.attempts == 0


def test_an_operator_reset_in_one_process_closes_the_breaker_for_the_others(two_processes_view):
    policy = Policy(name="p", failure_threshold=1, max_retries=0, reset_timeout_s=3600, timeout_enforcement="inline")
    first, second = two_processes_view(policy)
    second.execute("p", down)
    assert first.execute("p", lambda: 1).error.category is ErrorCategory.CIRCUIT_OPEN
    second.reset_breaker(policy, by="alice")
    seen_within_one_second(lambda: first.execute("p", lambda: 1), lambda r: r.ok)


def test_a_mode_saved_in_one_process_applies_in_the_others_at_their_next_call(two_processes_view):
    policy = Policy(name="p", timeout_enforcement="inline", revision=1.0)
    first, second = two_processes_view(policy)
    assert first.execute("p", lambda: 1).ok
    forced = policy.replace(mode="forced_open", revision=2.0)
    second.store.publish_policy(forced)
    result = seen_within_one_second(lambda: first.execute("p", lambda: 1), lambda r: not r.ok)
    assert result.error.category is ErrorCategory.CIRCUIT_OPEN  # though first still holds the old policy
    assert not first.registry.is_fresh("p")  # and knows to reload it


@pytest.mark.django_db(transaction=True)
def test_a_fleet_trip_is_stored_once_in_the_database():
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: set DATABASE_URL (the second run of .ci/run does)")
    Integration.objects.create(name="stored", failure_threshold=3, max_retries=0, reset_timeout_s=3600,
                               timeout_enforcement="inline")
    run_processes(_hammer_default_engine, "stored")
    assert BreakerEvent.objects.filter(integration__name="stored", to_state="open").count() == 1


def _hammer_default_engine(index, barrier, results, name):
    barrier.wait()
    for _ in range(10):
        execute(name, down)
    connections.close_all()
    results.put(index)


# -- Redis killed and restarted under calls -----------------------------------------------


@pytest.fixture
def own_redis():
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed")
    server = OwnRedis()
    server.start()
    yield server
    if server.process.poll() is None:
        server.kill()


def _call_through_an_outage(index, barrier, results, url, policy, seconds):
    bus = EventBus()
    changes = []
    bus.subscribe(SharedStateChanged, lambda e: changes.append(e.shared))
    engine = Engine(registry=PolicyRegistry(), store=RedisStore(url, prefix="outage", bus=bus,
                                                                retry_interval_s=0.2), bus=bus)
    engine.registry.put(policy)
    barrier.wait()
    raised, ok, deadline = [], 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ok += engine.execute(policy.name, lambda: "fine").ok
        except Exception as exc:  # noqa: BLE001 - the test counts what would have reached a caller
            raised.append(repr(exc))
        time.sleep(0.005)
    results.put((raised, ok, changes, engine.store.available))


def test_callers_see_no_exception_while_redis_is_killed_and_restarted(own_redis):
    policy = Policy(name="steady", timeout_enforcement="inline", hourly_limit=10**6)
    connections.close_all()
    barrier = FORK.Barrier(3)
    results = FORK.Queue()
    workers = [FORK.Process(target=_call_through_an_outage, args=(i, barrier, results, own_redis.url, policy, 4.0))
               for i in range(2)]
    for worker in workers:
        worker.start()
    barrier.wait()
    time.sleep(1.0)
    own_redis.kill()
    time.sleep(1.0)
    own_redis.start()
    reports = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(10)
    for raised, ok, changes, available in reports:
        assert raised == []
        assert ok > 50
        assert changes == [False, True]  # one outage, seen and recovered from, once each
        assert available
    # and the state is shared again: a trip by one store is seen by another
    check_a_trip_is_seen_by_another_store(own_redis.url, "after")


def test_an_outage_is_logged_once_and_calls_run_on_per_process_state(own_redis, caplog):
    bus = EventBus()
    engine = Engine(registry=PolicyRegistry(), store=RedisStore(own_redis.url, prefix="p", bus=bus,
                                                                retry_interval_s=60), bus=bus)
    engine.registry.put(Policy(name="p", failure_threshold=2, max_retries=0, timeout_enforcement="inline"))
    own_redis.kill()
    for _ in range(5):
        engine.execute("p", down)
    assert engine.breaker("p").state == "open"  # the per-process breaker took over
    warnings = [r for r in caplog.records if r.name == "integrations.shared_state" and r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "per process" in warnings[0].getMessage()

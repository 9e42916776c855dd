"""Shared state across OS processes, on the real Redis (and PostgreSQL for stored events).

Each process builds its own engine and RedisStore, as a gunicorn worker
would; nothing is shared but Redis (and the database).
"""

import multiprocessing
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest
import redis
from django.db import connection, connections

from integrations.errors import ErrorCategory
from integrations.models import BreakerEvent, Integration
from integrations.resilience import Engine, Policy, execute
from integrations.resilience.events import EventBus, SharedStateChanged, StateTransition
from integrations.resilience.leases import LEASE_MAX, LEASE_TTL_S
from integrations.resilience.registry import PolicyRegistry
from integrations.resilience.redis_store import RedisStore

from conftest import redis_url

pytestmark = pytest.mark.skipif(not redis_url(), reason="needs Redis: set REDIS_URL (the second run of .ci/run does)")

FORK = multiprocessing.get_context("fork")
PROCESSES = 4


def engine_on(url, prefix, policy, bus=None):
    registry = PolicyRegistry()
    registry.put(policy)
    bus = bus or EventBus()
    return Engine(registry=registry, store=RedisStore(url, prefix=prefix, bus=bus), bus=bus)


def run_processes(target, *args, count=PROCESSES):
    """Start ``count`` processes on ``target(index, barrier, results, *args)``; return their results."""
    connections.close_all()  # a forked child must open its own database connection
    barrier = FORK.Barrier(count)
    results = FORK.Queue()
    processes = [FORK.Process(target=target, args=(i, barrier, results, *args)) for i in range(count)]
    for process in processes:
        process.start()
    collected = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    return collected


def down():
    raise ConnectionError("upstream down")


# -- the breaker trips once for the whole fleet ------------------------------------


def _hammer_failing(index, barrier, results, url, prefix, policy):
    bus = EventBus()
    opened = []
    bus.subscribe(StateTransition, lambda e: opened.append(e) if e.transition.to_state == "open" else None)
    engine = engine_on(url, prefix, policy, bus)
    barrier.wait()
    outcomes = [engine.execute(policy.name, down).error.category.value for _ in range(25)]
    results.put((len(opened), outcomes))


def test_processes_open_the_breaker_exactly_once_per_trip():
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    policy = Policy(name="fleet", failure_threshold=5, max_retries=0, reset_timeout_s=3600,
                    timeout_enforcement="inline")
    results = run_processes(_hammer_failing, redis_url(), prefix, policy)
    assert sum(opened for opened, _ in results) == 1
    network = sum(outcomes.count("network") for _, outcomes in results)
    refused = sum(outcomes.count("circuit_open") for _, outcomes in results)
    assert network >= policy.failure_threshold
    assert network + refused == PROCESSES * 25
    assert network < PROCESSES * 25 / 2  # the fleet stopped calling once it tripped


# -- half-open admits exactly half_open_max_calls across the fleet ------------------------


def _try_a_trial(index, barrier, results, url, prefix, policy):
    engine = engine_on(url, prefix, policy)

    def trial():
        time.sleep(1.0)  # hold the probe lease while the others try
        return "trial"

    barrier.wait()
    result = engine.execute(policy.name, trial)
    results.put(result.ok)


def test_half_open_admits_exactly_half_open_max_calls_across_processes():
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    policy = Policy(name="fleet", failure_threshold=1, max_retries=0, reset_timeout_s=0.2, half_open_max_calls=2,
                    success_threshold=10, timeout_enforcement="inline", attempt_timeout_ms=5000)
    tripper = engine_on(redis_url(), prefix, policy)
    assert tripper.execute("fleet", down).error.category is ErrorCategory.NETWORK
    time.sleep(0.3)
    admitted = run_processes(_try_a_trial, redis_url(), prefix, policy, count=6)
    assert admitted.count(True) == 2
    assert admitted.count(False) == 4


# -- a quota is one quota for the fleet ---------------------------------------------------


def _spend_quota(index, barrier, results, url, prefix, policy):
    """Call until refused for longer than a lease lives: every leased unit is then spent or given back."""
    engine = engine_on(url, prefix, policy)
    invoked = []
    barrier.wait()
    refused, refused_since, give_up_at = 0, None, time.monotonic() + 30
    while time.monotonic() < give_up_at:
        result = engine.execute(policy.name, lambda: invoked.append(1))
        if result.error is None:
            refused_since = None
            continue
        assert result.error.category is ErrorCategory.QUOTA_EXCEEDED, result.error
        refused += 1
        refused_since = refused_since or time.monotonic()
        if time.monotonic() - refused_since > 3 * LEASE_TTL_S:
            break
        time.sleep(0.01)
    results.put((len(invoked), refused))


def test_processes_share_an_hourly_limit_exactly():
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    policy = Policy(name="metered", hourly_limit=75, timeout_enforcement="inline")
    results = run_processes(_spend_quota, redis_url(), prefix, policy)
    assert sum(invoked for invoked, _ in results) == 75
    assert all(refused for _, refused in results)


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


# -- changes made by one process are seen by the others within 1 s -------------------------


def seen_within_one_second(call, expected):
    """Call until ``expected(result)``; a process may trust its last view of a breaker for 0.5 s."""
    changed_at = time.monotonic()
    while True:
        result = call()
        if expected(result):
            return result
        assert time.monotonic() - changed_at < 1.0, f"the change was not seen within 1 s: {result!r}"
        time.sleep(0.01)



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


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OwnRedis:
    """A redis-server of the test's own, on its own port, that the test may kill."""

    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


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
    first = engine_on(own_redis.url, "after", Policy(name="p", failure_threshold=1, max_retries=0,
                                                     timeout_enforcement="inline"))
    second = engine_on(own_redis.url, "after", Policy(name="p", failure_threshold=1, max_retries=0,
                                                      timeout_enforcement="inline"))
    first.execute("p", down)
    seen_within_one_second(lambda: second.execute("p", lambda: 1), lambda r: not r.ok)


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

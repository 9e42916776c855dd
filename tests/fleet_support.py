"""A fleet of OS processes on one shared store, and the exactness it must keep on any Redis.

Each process builds its own engine and RedisStore from a URL, as a gunicorn worker would;
nothing is shared but Redis. The ``check_*`` functions are the fleet-wide promises (one trip
per fleet, exactly ``half_open_max_calls`` trials, exactly the hourly limit of upstream calls);
tests/integrations/test_shared_state.py runs them on the run's Redis, tests/integrations/test_redis_topologies.py on a
Cluster and a Sentinel service.
"""

import multiprocessing
import shutil
import signal
import socket
import subprocess
import time
import uuid

import redis
from django.db import connections

from integrations.errors import ErrorCategory
from integrations.resilience import Engine, Policy
from integrations.resilience.events import EventBus, StateTransition
from integrations.resilience.leases import LEASE_TTL_S
from integrations.resilience.redis_store import RedisStore
from integrations.resilience.registry import PolicyRegistry

FORK = multiprocessing.get_context("fork")
PROCESSES = 4


def engine_on(url, prefix, policy, bus=None, **store_options):
    registry = PolicyRegistry()
    registry.put(policy)
    bus = bus or EventBus()
    return Engine(registry=registry, store=RedisStore(url, prefix=prefix, bus=bus, **store_options), bus=bus)


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


def new_prefix():
    return f"test-{uuid.uuid4().hex[:12]}"


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


def check_one_trip_per_fleet(url):
    policy = Policy(name="fleet", failure_threshold=5, max_retries=0, reset_timeout_s=3600,
                    timeout_enforcement="inline")
    results = run_processes(_hammer_failing, url, new_prefix(), policy)
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


def check_half_open_admits_exactly_half_open_max_calls(url):
    prefix = new_prefix()
    policy = Policy(name="fleet", failure_threshold=1, max_retries=0, reset_timeout_s=0.2, half_open_max_calls=2,
                    success_threshold=10, timeout_enforcement="inline", attempt_timeout_ms=5000)
    tripper = engine_on(url, prefix, policy)
    assert tripper.execute("fleet", down).error.category is ErrorCategory.NETWORK
    time.sleep(0.3)
    admitted = run_processes(_try_a_trial, url, prefix, policy, count=6)
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


def check_fleet_makes_exactly_the_hourly_limit_of_calls(url):
    policy = Policy(name="metered", hourly_limit=75, timeout_enforcement="inline")
    results = run_processes(_spend_quota, url, new_prefix(), policy)
    assert sum(invoked for invoked, _ in results) == 75
    assert all(refused for _, refused in results)


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


def check_a_trip_is_seen_by_another_store(url, prefix):
    """The state is shared: a trip by one store refuses calls in another within 1 s."""
    policy = Policy(name="p", failure_threshold=1, max_retries=0, timeout_enforcement="inline")
    first, second = engine_on(url, prefix, policy), engine_on(url, prefix, policy)
    first.execute("p", down)
    seen_within_one_second(lambda: second.execute("p", lambda: 1), lambda r: not r.ok)


# -- a redis-server of a test's own -------------------------------------------------------


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
             "--appendonly", "no", "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

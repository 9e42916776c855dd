"""The shared store on the Redis topologies production runs: a Cluster, a Sentinel service, a slow server.

The servers are the ones ``.ci/redis-topologies start`` runs (and .ci/run starts): a 3-master
Cluster on 7000-7002, a primary on 6390 with replicas on 6391-6392 and sentinels on
26379-26381. Without them these tests skip, saying which is missing, unless
RESILIENCE_TESTS_REQUIRE_REDIS=1, where they fail.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from integrations.resilience import Policy, lua_api
from integrations.resilience.events import EventBus, SharedStateChanged
from integrations.resilience.redis_connect import (CLUSTER, SENTINEL, SINGLE, connect, from_explicit,
                                                   parse_url)

from fleet_support import (FORK, OwnRedis, check_a_trip_is_seen_by_another_store,
                           check_fleet_makes_exactly_the_hourly_limit_of_calls,
                           check_half_open_admits_exactly_half_open_max_calls, check_one_trip_per_fleet, down,
                           engine_on, new_prefix)

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGIES = ROOT / ".ci" / "redis-topologies"
CLUSTER_URL = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"
SENTINELS = [("127.0.0.1", 26379), ("127.0.0.1", 26380), ("127.0.0.1", 26381)]
SERVICE = "resilience"
SENTINEL_URL = f"redis+sentinel://{','.join(f'{h}:{p}' for h, p in SENTINELS)}/{SERVICE}/0"
URLS = {"cluster": CLUSTER_URL, "sentinel": SENTINEL_URL}


def missing(what):
    message = f"needs {what}: run .ci/redis-topologies start (.ci/run does)"
    if os.environ.get("RESILIENCE_TESTS_REQUIRE_REDIS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def cluster_up() -> bool:
    try:
        return redis.Redis(port=7000, socket_timeout=1).cluster("info").get("cluster_state") == "ok"
    except redis.exceptions.RedisError:
        return False


def sentinel_primary() -> tuple[str, int] | None:
    """The primary the sentinels name, if one of them answers and it answers as master."""
    for host, port in SENTINELS:
        try:
            address = redis.Redis(host=host, port=port, socket_timeout=1).sentinel_get_master_addr_by_name(SERVICE)
            if address and redis.Redis(host=address[0], port=int(address[1]), socket_timeout=1).role()[0] == b"master":
                return address[0], int(address[1])
        except redis.exceptions.RedisError:
            continue
    return None


@pytest.fixture(params=sorted(URLS))
def topology(request):
    """The URL of each topology, once it is up (the sentinel group whole again after a failover)."""
    if request.param == "cluster" and not cluster_up():
        missing("the Redis Cluster on 127.0.0.1:7000-7002")
    if request.param == "sentinel" and sentinel_primary() is None:
        missing(f"the Sentinel service {SERVICE!r} on 127.0.0.1:26379-26381")
    return URLS[request.param]


def restore_topologies():
    subprocess.run([str(TOPOLOGIES), "start"], check=True, capture_output=True, timeout=120)


# -- the forms, and one slot per script call -------------------------------------------------------


def test_each_url_form_names_its_topology():
    assert parse_url("redis://127.0.0.1:6379/2").form == SINGLE
    tls = parse_url("rediss://cache.example:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required")
    assert (tls.form, tls.tls, dict(tls.tls_options)) == (SINGLE, True, {"ssl_ca_certs": "/etc/ca.pem",
                                                                         "ssl_cert_reqs": "required"})
    sentinel = parse_url("rediss+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26379/mymaster/3?sentinel_password=x")
    assert (sentinel.form, sentinel.nodes, sentinel.service_name, sentinel.db, sentinel.password,
            sentinel.sentinel_password, sentinel.tls) == (
        SENTINEL, (("10.0.0.1", 26379), ("10.0.0.2", 26379)), "mymaster", 3, "s3cret", "x", True)
    cluster = parse_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7000")
    assert (cluster.form, cluster.nodes) == (CLUSTER, (("10.0.0.1", 7000), ("10.0.0.2", 7000)))
    assert "s3cret" not in sentinel.describe() and "s3cret" not in repr(sentinel)


@pytest.mark.parametrize("url, wanted", [
    ("memcached://x", "must start with redis://"),
    ("redis+sentinel://10.0.0.1:26379", "names no service"),
    ("redis+cluster://10.0.0.1:7000/2", "only database 0"),
    ("redis+cluster://10.0.0.1", "not host:port"),
    ("redis://127.0.0.1/0?ssl_ca_certs=/ca.pem", "TLS is rediss://"),
])
def test_a_bad_url_is_refused_saying_why(url, wanted):
    with pytest.raises(ValueError, match=wanted):
        parse_url(url)


def test_the_explicit_form_names_a_sentinel_service_or_a_cluster():
    target = from_explicit({"sentinels": ["10.0.0.1:26379"], "service_name": "mymaster", "db": 1,
                            "ca_certs": "/etc/ca.pem"})
    assert (target.form, target.nodes, target.db, target.tls) == (SENTINEL, (("10.0.0.1", 26379),), 1, True)
    assert from_explicit({"cluster_nodes": ["10.0.0.1:7000"]}).form == CLUSTER
    with pytest.raises(ValueError, match="service_name"):
        from_explicit({"sentinels": ["10.0.0.1:26379"]})
    with pytest.raises(ValueError, match="either"):
        from_explicit({"sentinels": ["a:1"], "service_name": "m", "cluster_nodes": ["b:2"]})
    with pytest.raises(ValueError, match="'hosts'"):
        from_explicit({"hosts": ["a:1"]})


@pytest.mark.parametrize("name", ["billing", "partner.notify", "a", "x-1_2.y", "9"])
def test_every_multi_key_script_call_is_in_one_cluster_slot(name):
    from redis.crc import key_slot

    now = time.time()
    for keys in (lua_api.state_keys("resilience", name, now), lua_api.quota_keys("resilience", name, now)):
        assert len({key_slot(key.encode()) for key in keys}) == 1, keys
    # the inbound limiter's script takes one key: one slot, whatever the client key holds
    assert len(lua_api.RATE_LIMIT_KEYS) == 1


def test_the_explicit_settings_choose_the_stores_redis_and_its_timeouts(settings):
    if sentinel_primary() is None:
        missing(f"the Sentinel service {SERVICE!r} on 127.0.0.1:26379-26381")
    from integrations.resilience import execute, get_engine

    settings.RESILIENCE_REDIS = {"sentinels": [f"{host}:{port}" for host, port in SENTINELS], "service_name": SERVICE}
    settings.RESILIENCE_REDIS_CONNECT_TIMEOUT_S = 0.2
    settings.RESILIENCE_REDIS_SOCKET_TIMEOUT_S = 0.3
    get_engine().registry.put(Policy(name="explicit", hourly_limit=5))
    assert execute("explicit", lambda: 1).ok
    store = get_engine().store
    pool = store.client.connection_pool
    assert type(pool).__name__ == "SentinelConnectionPool" and pool.service_name == SERVICE
    assert (pool.connection_kwargs["socket_connect_timeout"], pool.connection_kwargs["socket_timeout"]) == (0.2, 0.3)
    assert store.quota_usage(Policy(name="explicit", hourly_limit=5)).hourly_used == 1


# -- the fleet's promises on each topology ------------------------------------------------


def test_one_trip_per_fleet(topology):
    check_one_trip_per_fleet(topology)


def test_half_open_admits_exactly_half_open_max_calls(topology):
    check_half_open_admits_exactly_half_open_max_calls(topology)


def test_processes_make_exactly_the_hourly_limit_of_calls(topology):
    check_fleet_makes_exactly_the_hourly_limit_of_calls(topology)


def test_the_console_read_and_the_inbound_limiter_work_there(topology):
    policies = [Policy(name=f"page{i}", hourly_limit=10) for i in range(5)]
    engine = engine_on(topology, new_prefix(), policies[0])
    for policy in policies:
        engine.registry.put(policy)
        assert engine.execute(policy.name, lambda: 1).ok
    engine.store.settle_quota_leases(everything=True)
    reads = engine.store.read_many(policies)  # one pipeline over integrations in several slots
    assert [usage.hourly_used for _, usage in reads] == [1] * 5
    assert all(snapshot.extra["shared"] for snapshot, _ in reads)
    limiter = engine.store.rate_limiter
    assert [limiter.hit("client-{7}", 3, 60).allowed for _ in range(5)] == [True] * 3 + [False] * 2
    assert engine.store.available


# -- a Sentinel failover -------------------------------------------------------------------


def _call_through_a_failover(index, barrier, results, url, prefix, policy, seconds):
    bus = EventBus()
    changes = []
    bus.subscribe(SharedStateChanged, lambda e: changes.append((e.shared, time.monotonic())))
    engine = engine_on(url, prefix, policy, bus)
    barrier.wait()
    raised, invoked, local_calls = [], [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            engine.execute(policy.name, lambda: invoked.append(1))
        except Exception as exc:  # noqa: BLE001 - the test counts what would have reached a caller
            raised.append(repr(exc))
        local_calls += not engine.store.available
        time.sleep(0.004)
    engine.store.settle_quota_leases(everything=True)
    results.put((raised, len(invoked), local_calls, changes, engine.store.available))


def _named_primaries():
    """What each sentinel names as the primary now (None where one does not answer)."""
    named = []
    for host, port in SENTINELS:
        try:
            address = redis.Redis(host=host, port=port, socket_timeout=1).sentinel_get_master_addr_by_name(SERVICE)
            named.append((address[0], int(address[1])) if address else None)
        except redis.exceptions.RedisError:
            named.append(None)
    return named


def _unreplicated_units(primary, counter_key):
    """How many units of the hourly counter the primary holds that a replica has not got yet
    (what a failover right now could lose), the worst replica's."""
    def counter(client):
        return int(client.get(counter_key) or 0)

    on_primary = counter(redis.Redis(host=primary[0], port=primary[1]))
    replicas = redis.Redis(host=primary[0], port=primary[1]).role()[2]
    return max(on_primary - counter(redis.Redis(host=host, port=int(port))) for host, port, _ in replicas)


def test_a_sentinel_failover_reaches_no_caller_and_state_is_shared_again_soon_after_the_promotion():
    primary = sentinel_primary()
    if primary is None:
        missing(f"the Sentinel service {SERVICE!r} on 127.0.0.1:26379-26381")
    prefix, limit, processes = new_prefix(), 1500, 3
    policy = Policy(name="failover", hourly_limit=limit, timeout_enforcement="inline")
    barrier = FORK.Barrier(processes + 1)
    results = FORK.Queue()
    workers = [FORK.Process(target=_call_through_a_failover,
                            args=(i, barrier, results, SENTINEL_URL, prefix, policy, 14.0)) for i in range(processes)]
    for worker in workers:
        worker.start()
    try:
        barrier.wait()
        time.sleep(1.0)
        unreplicated = _unreplicated_units(primary, lua_api.quota_keys(prefix, policy.name, time.time())[0])
        os.kill(redis.Redis(host=primary[0], port=primary[1]).info("server")["process_id"], signal.SIGKILL)
        killed_at = time.monotonic()
        promoted_at = None
        while time.monotonic() - killed_at < 30 and promoted_at is None:
            if any(address not in (None, primary) for address in _named_primaries()):
                promoted_at = time.monotonic()
            time.sleep(0.02)
        reports = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(10)
    finally:
        restore_topologies()  # the killed server comes back as a replica of the new primary
    assert promoted_at is not None, "the sentinels promoted no replica within 30 s"
    invoked = sum(report[1] for report in reports)
    for raised, _, _, changes, available in reports:
        assert raised == []
        assert [shared for shared, _ in changes] == [False, True]
        assert changes[1][1] - promoted_at < 10.0
        assert available
    # the limit is one for the fleet again: the fleet stopped at it, with what the failover let through
    over_admitted = invoked - limit
    local_calls = sum(report[2] for report in reports)
    print(f"\nfailover: killed {primary}, promoted after {promoted_at - killed_at:.1f} s; shared again "
          f"{max(c[1][1] for *_, c, _ in reports) - promoted_at:.2f} s after the promotion (at worst); "
          f"{invoked} upstream calls against a limit of {limit}: over-admitted {over_admitted}, "
          f"{local_calls} calls on per-process state, {unreplicated} units not yet on a replica at the kill")
    assert over_admitted >= 0  # the fleet reached the limit: nothing counted twice
    check_a_trip_is_seen_by_another_store(SENTINEL_URL, prefix)


# -- a slow Redis: DEBUG SLEEP on the store's server --------------------------------------


def _store_server(url, prefix, name):
    """A client of the one server holding ``name``'s keys (under ``prefix``), to make it sleep."""
    target = parse_url(url)
    if target.form == SINGLE:
        return redis.Redis.from_url(url)
    if target.form == SENTINEL:
        host, port = sentinel_primary()
        return redis.Redis(host=host, port=port)
    cluster = connect(target).cluster
    node = cluster.get_node_from_key(lua_api.state_keys(prefix, name, time.time())[0])
    return redis.Redis(host=node.host, port=node.port)


def _calls_during_a_slow_episode(url, sleep_s=3.0, threads=4, seconds=5.0):
    """Callers in threads while the store's server sleeps ``sleep_s``: the worst call's latency,
    what reached a caller, the shared-state changes and whether the store is shared again."""
    prefix = new_prefix()
    bus = EventBus()
    changes = []
    bus.subscribe(SharedStateChanged, lambda e: changes.append(e.shared))
    # failures are recorded at once (a round trip each); the threshold is never reached
    policy = Policy(name="slow", hourly_limit=10**6, failure_threshold=10**6, failure_rate_threshold=100,
                    minimum_calls=10**6, max_retries=0, timeout_enforcement="inline", attempt_timeout_ms=1000,
                    timeout_ms=1500)
    engine = engine_on(url, prefix, policy, bus)
    assert engine.execute("slow", lambda: 1).ok
    server = _store_server(url, prefix, "slow")
    latencies, raised = [], []
    start = threading.Barrier(threads + 1)

    def caller(index):
        start.wait()
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            began = time.monotonic()
            try:
                engine.execute("slow", down if index % 2 else (lambda: 1))
            except Exception as exc:  # noqa: BLE001 - the test counts what would have reached a caller
                raised.append(repr(exc))
            latencies.append(time.monotonic() - began)
            time.sleep(0.005)

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    for thread in callers:
        thread.start()
    start.wait()
    time.sleep(0.3)
    sleeper = threading.Thread(target=lambda: server.execute_command("DEBUG", "SLEEP", sleep_s))
    sleeper.start()
    for thread in callers:
        thread.join(30)
    sleeper.join(30)
    engine.execute("slow", lambda: 1)
    return max(latencies), len(latencies), raised, changes, engine.store.available, policy


@pytest.fixture(params=["single", "cluster", "sentinel"])
def slow_topology(request):
    if request.param == "single":
        server = OwnRedis()
        server.start()
        yield server.url
        server.kill()
        return
    if request.param == "cluster" and not cluster_up():
        missing("the Redis Cluster on 127.0.0.1:7000-7002")
    if request.param == "sentinel" and sentinel_primary() is None:
        missing(f"the Sentinel service {SERVICE!r} on 127.0.0.1:26379-26381")
    yield URLS[request.param]
    # a cluster node asleep for longer than its peers' patience is marked failing: wait until it is back
    for _ in range(200):
        if (request.param == "cluster" and cluster_up()) or (request.param == "sentinel" and sentinel_primary()):
            break
        time.sleep(0.1)


def test_a_slow_redis_holds_no_caller_past_its_deadline_and_shared_state_resumes(slow_topology):
    worst, calls, raised, changes, available, policy = _calls_during_a_slow_episode(slow_topology)
    print(f"\nslow redis ({parse_url(slow_topology).form}): {calls} calls, worst latency {worst * 1000:.0f} ms")
    assert raised == []
    assert worst < policy.timeout_ms / 1000  # the call's deadline: 1.5 s, while Redis sleeps 3 s
    assert changes == [False, True]  # one episode, one warning, and shared again
    assert available


# -- the rest of the stack: the Django cache and django-q2's broker ---------------------------


def site_settings(env, code):
    """Run ``code`` in a fresh process on the site's settings with ``env``; its stdout as JSON (or the error)."""
    environment = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "DATABASE_URL")}
    environment.update(env, DJANGO_SETTINGS_MODULE="resilience_site.settings", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", "import django, json; django.setup()\n" + code], env=environment,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    return done.returncode, done.stdout, done.stderr


def test_on_sentinel_the_cache_and_the_broker_follow_the_service():
    if sentinel_primary() is None:
        missing(f"the Sentinel service {SERVICE!r} on 127.0.0.1:26379-26381")
    code, out, err = site_settings({"REDIS_URL": SENTINEL_URL}, """
from django.core.cache import caches
from django_q.brokers import get_broker
from integrations.resilience import get_engine
from integrations.conf import app_settings
cache = caches[app_settings.CACHE_ALIAS]
cache.set("topology-probe", {"v": 1}, 30)
broker = get_broker("topology-probe")
broker.enqueue("task")
task = broker.dequeue()
store = get_engine().store
pool = cache.client.get_client().connection_pool
print(json.dumps({"cache": cache.get("topology-probe"), "cache_pool": type(pool).__name__,
                  "task": task[0][1].decode(), "broker_pool": type(broker.connection.connection_pool).__name__,
                  "store_pool": type(store.client.connection_pool).__name__}))
cache.delete("topology-probe")
""")
    assert code == 0, err
    assert json.loads(out) == {"cache": {"v": 1}, "cache_pool": "SentinelConnectionPool", "task": "task",
                               "broker_pool": "SentinelConnectionPool", "store_pool": "SentinelConnectionPool"}


def test_on_cluster_the_store_uses_it_while_the_cache_and_broker_stay_off_it():
    if not cluster_up():
        missing("the Redis Cluster on 127.0.0.1:7000-7002")
    code, _, err = site_settings({"REDIS_URL": CLUSTER_URL}, "")
    assert code != 0 and "REDIS_URL names a Redis Cluster" in err and "RESILIENCE_REDIS_URL" in err
    code, out, err = site_settings({"RESILIENCE_REDIS_URL": CLUSTER_URL}, """
from django.conf import settings
from integrations.resilience import get_engine
store = get_engine().store
print(json.dumps({"cache": settings.CACHES["default"]["BACKEND"], "broker": settings.Q_CLUSTER.get("orm"),
                  "store": type(store.client.cluster).__name__}))
""")
    assert code == 0, err
    assert json.loads(out) == {"cache": "django.core.cache.backends.locmem.LocMemCache", "broker": "default",
                               "store": "RedisCluster"}

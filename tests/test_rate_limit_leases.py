"""Rate-limit leases in Redis: a busy client costs no round trip per request, and the limit stays exact.

On the real Redis; each test has its own key prefix. A "round trip" here is one call of the
store's rate-limit script (a wrapper counts them); what Redis holds is read back with ZCARD.
"""

import multiprocessing
import threading
import time
import uuid

import pytest

from integrations.resilience.events import EventBus
from integrations.resilience.redis_store import _LEASE_MAX, RedisStore

from conftest import redis_url

pytestmark = pytest.mark.skipif(not redis_url(), reason="needs Redis: set REDIS_URL (the second run of .ci/run does)")

FORK = multiprocessing.get_context("fork")
WINDOW_S = 60


class CountingStore(RedisStore):
    """A RedisStore that counts its rate-limit script calls (round trips, a pipeline's included)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.script_calls = 0
        script = self._rate_script

        def counted(*call_args, **call_kwargs):
            self.script_calls += 1
            return script(*call_args, **call_kwargs)

        self._rate_script = counted


@pytest.fixture
def prefix():
    prefix = f"test-lease-{uuid.uuid4().hex[:12]}"
    yield prefix
    cleaner = RedisStore(redis_url(), prefix=prefix, bus=EventBus())
    keys = list(cleaner.client.scan_iter(f"{prefix}:*"))
    if keys:
        cleaner.client.delete(*keys)


def make_store(prefix, **kwargs):
    return CountingStore(redis_url(), prefix=prefix, bus=EventBus(), **kwargs)


def counted_in_redis(store, key):
    return store.client.zcard(f"{store.prefix}:ratelimit:{key}")


def test_a_busy_client_is_counted_in_leases_and_every_request_ends_up_in_redis(prefix):
    store = make_store(prefix)
    verdicts = [store.hit("busy", 10**6, WINDOW_S) for _ in range(1000)]
    assert all(verdict.allowed for verdict in verdicts)
    # leases double from 2 up to _LEASE_MAX: a few dozen round trips, not a thousand
    assert store.script_calls < 1000 // _LEASE_MAX + 20
    store.flush()
    assert counted_in_redis(store, "busy") == 1000
    remaining = [verdict.remaining for verdict in verdicts]
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] == 10**6 - 1000


def test_threads_serving_one_busy_client_wait_for_one_renewal_instead_of_all_asking_redis(prefix):
    store = make_store(prefix)
    threads, each = 8, 250
    start = threading.Barrier(threads)
    admitted = []

    def serve():
        start.wait()
        admitted.extend(store.hit("threaded", 10**6, WINDOW_S).allowed for _ in range(each))

    workers = [threading.Thread(target=serve) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert admitted == [True] * threads * each
    # one renewal at a time: leases grow as with one thread (without it, most requests went to Redis)
    assert store.script_calls < threads * each // 10
    store.flush()
    assert counted_in_redis(store, "threaded") == threads * each


def test_a_client_seen_once_in_a_while_is_counted_request_by_request(prefix):
    store = make_store(prefix)
    for _ in range(3):
        assert store.hit("calm", 100, WINDOW_S).allowed
        store.flush()  # what the flusher does to a client not counted again for a second
    assert store.script_calls == 3
    assert counted_in_redis(store, "calm") == 3


def test_short_windows_are_counted_request_by_request(prefix):
    store = make_store(prefix)
    for _ in range(50):
        store.hit("short", 10**6, 2)
    assert store.script_calls == 50


def test_unspent_lease_is_given_back_when_settled(prefix):
    store = make_store(prefix)
    for _ in range(5):  # the 2nd request takes a lease of 2, the 5th one of 4: 3 requests unspent
        store.hit("lessee", 10**6, WINDOW_S)
    assert counted_in_redis(store, "lessee") == 9  # 5 requests and 4 leased ahead
    store.flush()
    assert counted_in_redis(store, "lessee") == 5


def test_near_the_limit_requests_are_counted_one_by_one_and_the_limit_is_exact(prefix):
    store = make_store(prefix)
    verdicts = [store.hit("edge", 40, WINDOW_S) for _ in range(45)]
    # a lease is at most 1/16 of what is left: below 32 left, none is granted
    assert [v.allowed for v in verdicts] == [True] * 40 + [False] * 5
    assert [v.remaining for v in verdicts[:40]] == list(range(39, -1, -1))
    store.flush()
    assert counted_in_redis(store, "edge") == 40


def test_settled_requests_are_counted_at_settlement_never_earlier_than_spent(prefix, clock):
    store = make_store(prefix, clock=clock)
    for _ in range(2):
        store.hit("late", 10**6, WINDOW_S)  # the 2nd is granted a lease of 2 at t
    clock.advance(0.3)
    store.hit("late", 10**6, WINDOW_S)  # spent at t + 0.3
    store.flush()
    scores = sorted(score for _, score in store.client.zrange(f"{prefix}:ratelimit:late", 0, -1, withscores=True))
    granted_at = clock.time() - 0.3
    # the two requests counted at once, and the spent lease member re-counted at settlement
    assert scores == [pytest.approx(granted_at, abs=1e-3)] * 2 + [pytest.approx(clock.time(), abs=1e-3)]


def hammer(index, barrier, results, prefix, requests, limit):
    store = RedisStore(redis_url(), prefix=prefix, bus=EventBus())
    barrier.wait()
    allowed = sum(store.hit("fleet", limit, WINDOW_S).allowed for _ in range(requests))
    store.flush()
    results.put(allowed)


def test_processes_spending_leases_together_never_pass_the_limit(prefix):
    limit, processes, requests = 2000, 4, 900
    barrier = FORK.Barrier(processes)
    results = FORK.Queue()
    workers = [FORK.Process(target=hammer, args=(i, barrier, results, prefix, requests, limit))
               for i in range(processes)]
    for worker in workers:
        worker.start()
    allowed = sum(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    store = make_store(prefix)
    assert allowed <= limit
    # settled: exactly the admitted requests are counted, none lost, no lease left over ...
    assert counted_in_redis(store, "fleet") == allowed
    # ... so what the fleet refused early while other processes held leases is still there to spend
    late = [store.hit("fleet", limit, WINDOW_S).allowed for _ in range(limit - allowed + 3)]
    assert late == [True] * (limit - allowed) + [False] * 3


def spend_after_fork(store, results):
    for _ in range(3):
        store.hit("forked", 10**6, WINDOW_S)
    store.flush()
    results.put(store.script_calls)


def test_a_forked_child_does_not_spend_its_parents_lease(prefix):
    store = make_store(prefix)
    for _ in range(5):  # the parent holds a lease of 4, unspent
        store.hit("forked", 10**6, WINDOW_S)
    results = FORK.Queue()
    child = FORK.Process(target=spend_after_fork, args=(store, results))
    child.start()
    calls_before = store.script_calls
    child_calls = results.get(timeout=30) - calls_before
    child.join(30)
    assert child.exitcode == 0
    for _ in range(3):
        store.hit("forked", 10**6, WINDOW_S)
    store.flush()
    assert child_calls >= 2  # the child counted its own (its first request went to Redis)
    # had the child spent the parent's lease, both would have settled the same members
    assert counted_in_redis(store, "forked") == 5 + 3 + 3


def test_a_lease_is_settled_by_the_flusher_within_about_a_second(prefix):
    store = make_store(prefix, flush_interval_s=0.2)
    for _ in range(5):
        store.hit("flushed", 10**6, WINDOW_S)
    assert counted_in_redis(store, "flushed") == 9
    deadline = time.monotonic() + 5
    while counted_in_redis(store, "flushed") != 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted_in_redis(store, "flushed") == 5

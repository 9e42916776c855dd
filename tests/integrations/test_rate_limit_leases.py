"""Rate-limit leases in Redis: a busy client costs no round trip per request, and the limit stays exact.

On the real Redis; each test has its own key prefix. A "round trip" here is one call of the
limiter's rate-limit script (a wrapper counts them); what Redis holds is read back with ZCARD.
"""

import multiprocessing
import threading
import time
import uuid

import pytest

from integrations.resilience.events import EventBus
from integrations.resilience.leases import LEASE_MAX
from integrations.resilience.redis_store import RedisStore

from conftest import redis_url

pytestmark = pytest.mark.skipif(not redis_url(), reason="needs Redis: set REDIS_URL (the second run of .ci/run does)")

FORK = multiprocessing.get_context("fork")
WINDOW_S = 60


def counting(limiter):
    """The Redis store's rate limiter, counting its script calls (round trips, a pipeline's included)."""
    limiter.script_calls = 0
    script = limiter._script

    def counted(*call_args, **call_kwargs):
        limiter.script_calls += 1
        return script(*call_args, **call_kwargs)

    limiter._script = counted
    return limiter


@pytest.fixture
def prefix():
    prefix = f"test-lease-{uuid.uuid4().hex[:12]}"
    yield prefix
    cleaner = RedisStore(redis_url(), prefix=prefix, bus=EventBus())
    keys = list(cleaner.client.scan_iter(f"{prefix}:*"))
    if keys:
        cleaner.client.delete(*keys)


def make_limiter(prefix, **kwargs):
    return counting(RedisStore(redis_url(), prefix=prefix, bus=EventBus(), **kwargs).rate_limiter)


def counted_in_redis(limiter, key):
    return limiter.link.client.zcard(f"{limiter.prefix}:ratelimit:{key}")


def test_a_busy_client_is_counted_in_leases_and_every_request_ends_up_in_redis(prefix):
    limiter = make_limiter(prefix)
    verdicts = [limiter.hit("busy", 10**6, WINDOW_S) for _ in range(1000)]
    assert all(verdict.allowed for verdict in verdicts)
    # leases double from 2 up to LEASE_MAX: a few dozen round trips, not a thousand
    assert limiter.script_calls < 1000 // LEASE_MAX + 20
    limiter.flush()
    assert counted_in_redis(limiter, "busy") == 1000
    remaining = [verdict.remaining for verdict in verdicts]
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] == 10**6 - 1000


def test_threads_serving_one_busy_client_wait_for_one_renewal_instead_of_all_asking_redis(prefix):
    limiter = make_limiter(prefix)
    threads, each = 8, 250
    start = threading.Barrier(threads)
    admitted = []

    def serve():
        start.wait()
        admitted.extend(limiter.hit("threaded", 10**6, WINDOW_S).allowed for _ in range(each))

    workers = [threading.Thread(target=serve) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert admitted == [True] * threads * each
    # one renewal at a time: leases grow as with one thread (without it, most requests went to Redis)
    assert limiter.script_calls < threads * each // 10
    limiter.flush()
    assert counted_in_redis(limiter, "threaded") == threads * each


def test_a_client_seen_once_in_a_while_is_counted_request_by_request(prefix):
    limiter = make_limiter(prefix)
    for _ in range(3):
        assert limiter.hit("calm", 100, WINDOW_S).allowed
        limiter.flush()  # what the flusher does to a client not counted again for a second
    assert limiter.script_calls == 3
    assert counted_in_redis(limiter, "calm") == 3


def test_short_windows_are_counted_request_by_request(prefix):
    limiter = make_limiter(prefix)
    for _ in range(50):
        limiter.hit("short", 10**6, 2)
    assert limiter.script_calls == 50


def test_unspent_lease_is_given_back_when_settled(prefix):
    limiter = make_limiter(prefix)
    for _ in range(5):  # the 2nd request takes a lease of 2, the 5th one of 4: 3 requests unspent
        limiter.hit("lessee", 10**6, WINDOW_S)
    assert counted_in_redis(limiter, "lessee") == 9  # 5 requests and 4 leased ahead
    limiter.flush()
    assert counted_in_redis(limiter, "lessee") == 5


def test_near_the_limit_requests_are_counted_one_by_one_and_the_limit_is_exact(prefix):
    limiter = make_limiter(prefix)
    verdicts = [limiter.hit("edge", 40, WINDOW_S) for _ in range(45)]
    # a lease is at most 1/16 of what is left: below 32 left, none is granted
    assert [v.allowed for v in verdicts] == [True] * 40 + [False] * 5
    assert [v.remaining for v in verdicts[:40]] == list(range(39, -1, -1))
    limiter.flush()
    assert counted_in_redis(limiter, "edge") == 40


def test_settled_requests_are_counted_at_settlement_never_earlier_than_spent(prefix, clock):
    limiter = make_limiter(prefix, clock=clock)
    for _ in range(2):
        limiter.hit("late", 10**6, WINDOW_S)  # the 2nd is granted a lease of 2 at t
    clock.advance(0.3)
    limiter.hit("late", 10**6, WINDOW_S)  # spent at t + 0.3
    limiter.flush()
    members = limiter.link.client.zrange(f"{prefix}:ratelimit:late", 0, -1, withscores=True)
    scores = sorted(score for _, score in members)
    granted_at = clock.time() - 0.3
    # the two requests counted at once, and the spent lease member re-counted at settlement
    assert scores == [pytest.approx(granted_at, abs=1e-3)] * 2 + [pytest.approx(clock.time(), abs=1e-3)]


def hammer(index, barrier, results, prefix, requests, limit):
    limiter = RedisStore(redis_url(), prefix=prefix, bus=EventBus()).rate_limiter
    barrier.wait()
    allowed = sum(limiter.hit("fleet", limit, WINDOW_S).allowed for _ in range(requests))
    limiter.flush()
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
    limiter = make_limiter(prefix)
    assert allowed <= limit
    # settled: exactly the admitted requests are counted, none lost, no lease left over ...
    assert counted_in_redis(limiter, "fleet") == allowed
    # ... so what the fleet refused early while other processes held leases is still there to spend
    late = [limiter.hit("fleet", limit, WINDOW_S).allowed for _ in range(limit - allowed + 3)]
    assert late == [True] * (limit - allowed) + [False] * 3


def spend_after_fork(limiter, results):
    for _ in range(3):
        limiter.hit("forked", 10**6, WINDOW_S)
    limiter.flush()
    results.put(limiter.script_calls)


def test_a_forked_child_does_not_spend_its_parents_lease(prefix):
    limiter = make_limiter(prefix)
    for _ in range(5):  # the parent holds a lease of 4, unspent
        limiter.hit("forked", 10**6, WINDOW_S)
    results = FORK.Queue()
    child = FORK.Process(target=spend_after_fork, args=(limiter, results))
    child.start()
    calls_before = limiter.script_calls
    child_calls = results.get(timeout=30) - calls_before
    child.join(30)
    assert child.exitcode == 0
    for _ in range(3):
        limiter.hit("forked", 10**6, WINDOW_S)
    limiter.flush()
    assert child_calls >= 2  # the child counted its own (its first request went to Redis)
    # had the child spent the parent's lease, both would have settled the same members
    assert counted_in_redis(limiter, "forked") == 5 + 3 + 3


def test_a_lease_is_settled_by_the_flusher_within_about_a_second(prefix):
    limiter = make_limiter(prefix, flush_interval_s=0.2)
    for _ in range(5):
        limiter.hit("flushed", 10**6, WINDOW_S)
    assert counted_in_redis(limiter, "flushed") == 9
    deadline = time.monotonic() + 5
    while counted_in_redis(limiter, "flushed") != 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted_in_redis(limiter, "flushed") == 5

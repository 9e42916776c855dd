"""The outbound rate limiter (issue 15, item 1): at most rate_limit_permits attempts in any
rate_limit_period_s per integration, per process or fleet-wide in Redis; a caller waits for a
permit up to rate_limit_wait_ms, never past its deadline, else RATE_LIMIT without reaching the
upstream.

Per process on a FakeClock (make_engine: waiting advances it); fleet-wide with OS processes on
the real Redis.
"""

import time
import uuid

import pytest

from conftest import redis_url
from integrations.errors import ErrorCategory
from integrations.resilience import Policy, execute
from integrations.resilience.leases import LEASE_TTL_S
from test_shared_state import engine_on, run_processes


class Counting:
    def __init__(self, fail=False):
        self.calls = 0
        self.fail = fail

    def __call__(self):
        self.calls += 1
        if self.fail:
            raise ConnectionError("upstream down")
        return self.calls


def test_past_its_permits_an_attempt_is_refused_with_rate_limit_without_reaching_the_upstream(make_engine):
    make_engine(rate_limit_permits=3, rate_limit_period_s=1.0)
    upstream = Counting()

    results = [execute("svc", upstream) for _ in range(5)]

    assert [result.ok for result in results] == [True, True, True, False, False]
    refused = results[3]
    assert (refused.error.category, refused.error.code, refused.attempts) == (
        ErrorCategory.RATE_LIMIT, "outbound_rate_limited", 0)
    assert refused.error.message == "outbound rate limit of 3 per 1 s reached"
    assert 0 < refused.error.retry_after <= 1.0
    assert upstream.calls == 3


def test_the_window_slides_a_permit_comes_back_when_its_attempt_leaves_the_period(make_engine, clock):
    make_engine(rate_limit_permits=2, rate_limit_period_s=10.0)
    upstream = Counting()
    assert execute("svc", upstream).ok
    clock.advance(6)
    assert execute("svc", upstream).ok
    assert not execute("svc", upstream).ok
    clock.advance(4.5)  # the first attempt left the window; the second has not
    assert execute("svc", upstream).ok
    assert not execute("svc", upstream).ok


def test_a_caller_waits_for_a_permit_up_to_rate_limit_wait_ms(make_engine, clock):
    make_engine(rate_limit_permits=1, rate_limit_period_s=1.0, rate_limit_wait_ms=1_500)
    upstream = Counting()
    assert execute("svc", upstream).ok
    started = clock.monotonic()

    result = execute("svc", upstream)

    assert result.ok and upstream.calls == 2
    assert 0.9 < clock.monotonic() - started <= 1.5  # it waited for the first attempt to leave the window


def test_a_caller_never_waits_for_a_permit_past_its_deadline(make_engine, clock):
    make_engine(rate_limit_permits=1, rate_limit_period_s=10.0, rate_limit_wait_ms=60_000, timeout_ms=500,
                attempt_timeout_ms=500)
    upstream = Counting()
    assert execute("svc", upstream).ok
    started = clock.monotonic()

    result = execute("svc", upstream)

    assert (result.ok, result.error.category, upstream.calls) == (False, ErrorCategory.RATE_LIMIT, 1)
    assert clock.monotonic() - started <= 0.5


def test_each_retry_takes_a_permit_and_a_refused_retry_ends_the_call_with_the_upstreams_failure(make_engine):
    make_engine(rate_limit_permits=2, rate_limit_period_s=60.0, max_retries=3, base_delay_ms=1, max_delay_ms=1)
    upstream = Counting(fail=True)

    result = execute("svc", upstream)

    assert (result.error.category, result.attempts, upstream.calls) == (ErrorCategory.NETWORK, 2, 2)
    assert result.error.details["stopped_by"] == "rate_limit"


def test_without_a_rate_limit_nothing_is_counted(make_engine):
    engine = make_engine()
    for _ in range(50):
        assert execute("svc", Counting()).ok
    assert engine.store.rate_limiter.hit("integration.svc", 1, 60).remaining == 0  # the first count, now


# -- fleet-wide, in Redis --------------------------------------------------------------------


def _spend_permits(index, barrier, results, url, prefix, policy):
    """Call until refused for longer than a lease lives: every leased permit is spent or given back."""
    engine = engine_on(url, prefix, policy)
    upstream = Counting()
    barrier.wait()
    refused_since, give_up_at = None, time.monotonic() + 30
    while time.monotonic() < give_up_at:
        result = engine.execute(policy.name, upstream)
        if result.ok:
            refused_since = None
            continue
        assert result.error.category is ErrorCategory.RATE_LIMIT and result.attempts == 0, result.error
        refused_since = refused_since or time.monotonic()
        if time.monotonic() - refused_since > 3 * LEASE_TTL_S:
            break
        time.sleep(0.01)
    results.put(upstream.calls)


NEEDS_REDIS = pytest.mark.skipif(not redis_url(), reason="needs Redis: set REDIS_URL (the second run of .ci/run does)")


@NEEDS_REDIS
def test_processes_share_a_long_rate_limit_exactly():
    # a period of 5 s or more leases permits ahead (leases.py): still exactly the permits in all
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    policy = Policy(name="limited", rate_limit_permits=40, rate_limit_period_s=3600.0, timeout_enforcement="inline")
    assert sum(run_processes(_spend_permits, redis_url(), prefix, policy)) == 40


def _stamp_attempts(index, barrier, results, url, prefix, policy, run_s):
    engine = engine_on(url, prefix, policy)
    stamps = []
    barrier.wait()
    ends = time.monotonic() + run_s
    while time.monotonic() < ends:
        engine.execute(policy.name, lambda: stamps.append(time.time()))
    results.put(stamps)


@NEEDS_REDIS
def test_processes_never_pass_a_short_rate_limit_in_any_period():
    # under 5 s, every attempt is counted in Redis one by one: no period holds more than the permits
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    permits, period_s = 10, 1.0
    policy = Policy(name="limited", rate_limit_permits=permits, rate_limit_period_s=period_s,
                    timeout_enforcement="inline")
    stamps = sorted(t for batch in run_processes(_stamp_attempts, redis_url(), prefix, policy, 2.5) for t in batch)
    assert len(stamps) >= 2 * permits  # the permits of the first period, and more as the window slid
    margin = 0.02  # an attempt starts a moment after Redis counted it
    busiest = max(sum(1 for t in stamps if start <= t < start + period_s - margin) for start in stamps)
    assert busiest <= permits

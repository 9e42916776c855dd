"""Retry counts and delays, on a FakeClock and a seeded random source: nothing sleeps."""

import random

import pytest

from integrations.errors import ErrorCategory, ResilienceError
from integrations.resilience import execute
from integrations.resilience.policy import Policy
from integrations.resilience.retry import parse_retry_after, retry_delay_s

# every engine test runs on the per-process store and on the shared Redis store
STORE_KINDS = ["local", "redis"]


def err(category, **kwargs):
    return ResilienceError(category, category.value, **kwargs)


@pytest.mark.parametrize("category", [ErrorCategory.TIMEOUT, ErrorCategory.NETWORK, ErrorCategory.SERVER_ERROR,
                                      ErrorCategory.RATE_LIMIT])
def test_retryable_failures_are_attempted_one_plus_max_retries_times(make_engine, upstream, category):
    make_engine(max_retries=3, jitter=False, base_delay_ms=1, failure_threshold=100)
    op = upstream(err(category))
    result = execute("svc", op)
    assert op.calls == 4
    assert result.attempts == 4
    assert result.error.category is category


@pytest.mark.parametrize("category", [ErrorCategory.CLIENT_ERROR, ErrorCategory.VALIDATION, ErrorCategory.UNKNOWN])
def test_non_retryable_failures_are_attempted_once(make_engine, upstream, category):
    make_engine(max_retries=3)
    op = upstream(err(category))
    result = execute("svc", op)
    assert op.calls == 1
    assert result.attempts == 1


def test_a_retry_that_succeeds_ends_the_call(make_engine, upstream, clock):
    make_engine(max_retries=3, jitter=False, base_delay_ms=100)
    op = upstream(TimeoutError(), ConnectionError(), "third time lucky")
    result = execute("svc", op)
    assert result.ok and result.value == "third time lucky"
    assert result.attempts == 3
    assert result.error is None
    assert clock.sleeps == [0.1, 0.2]


def test_delays_grow_exponentially_and_are_capped_at_max_delay(make_engine, upstream, clock):
    make_engine(max_retries=5, jitter=False, base_delay_ms=100, backoff_multiplier=3, max_delay_ms=1000,
                failure_threshold=100, timeout_ms=60_000)
    execute("svc", upstream(ConnectionError()))
    assert clock.sleeps == pytest.approx([0.1, 0.3, 0.9, 1.0, 1.0])


def test_full_jitter_draws_each_delay_uniformly_below_the_backoff(make_engine, upstream, clock):
    make_engine(max_retries=4, jitter=True, base_delay_ms=100, backoff_multiplier=2, max_delay_ms=10_000,
                failure_threshold=100)
    execute("svc", upstream(ConnectionError()))
    expected_rng = random.Random(7)  # the engine's seed in conftest
    assert clock.sleeps == pytest.approx([expected_rng.uniform(0, d) for d in (0.1, 0.2, 0.4, 0.8)])
    assert all(0 <= s <= cap for s, cap in zip(clock.sleeps, (0.1, 0.2, 0.4, 0.8)))


def test_a_retry_after_from_the_upstream_replaces_the_backoff(make_engine, upstream, clock):
    make_engine(max_retries=1, jitter=True, base_delay_ms=100, max_delay_ms=5000)
    execute("svc", upstream(err(ErrorCategory.RATE_LIMIT, retry_after=2.5), "ok"))
    assert clock.sleeps == [2.5]


def test_a_retry_after_is_capped_at_max_delay(make_engine, upstream, clock):
    make_engine(max_retries=1, max_delay_ms=1000)
    execute("svc", upstream(err(ErrorCategory.RATE_LIMIT, retry_after=120), "ok"))
    assert clock.sleeps == [1.0]


def test_no_retry_is_started_whose_delay_would_end_past_the_deadline(make_engine, upstream, clock):
    make_engine(max_retries=5, jitter=False, base_delay_ms=400, backoff_multiplier=2, max_delay_ms=10_000,
                timeout_ms=2000, attempt_timeout_ms=1000, failure_threshold=100)
    op = upstream(ConnectionError(), clock=clock, takes=0.1)
    result = execute("svc", op)
    # t=0.1 fail, sleep 0.4; t=0.6 fail, sleep 0.8; t=1.5 fail; a 1.6 s delay would end past 2.0
    assert clock.sleeps == pytest.approx([0.4, 0.8])
    assert op.calls == 3
    assert result.error.details["stopped_by"] == "deadline"
    assert result.latency_ms <= 2000


def test_the_last_attempt_is_trimmed_to_the_time_left_before_the_deadline(make_engine, upstream, clock):
    make_engine(max_retries=1, jitter=False, base_delay_ms=100, timeout_ms=1000, attempt_timeout_ms=800)
    op = upstream(ConnectionError(), "slow success", clock=clock, takes=0.5)
    result = execute("svc", op)
    # first attempt ends at 0.5, retry starts at 0.6 with 0.4 s left: 0.5 s overruns it
    assert not result.ok
    assert result.error.category is ErrorCategory.TIMEOUT
    assert result.latency_ms == pytest.approx(1100)


def test_the_retry_budget_caps_retries_as_a_share_of_calls(make_engine, upstream):
    engine = make_engine(max_retries=3, jitter=False, base_delay_ms=1, retry_budget_percent=20,
                         window_size=100, minimum_calls=10, failure_threshold=10**6, failure_rate_threshold=0)
    for _ in range(10):
        execute("svc", upstream("fine"))
    flaky = upstream(ConnectionError())
    for _ in range(20):
        execute("svc", flaky)
    snapshot = engine.breaker("svc")
    assert snapshot.window_retries * 100 <= 20 * snapshot.window_calls
    assert snapshot.window_retries > 0  # the budget let some retries through
    assert flaky.calls < 20 * 4  # but far fewer than an unbudgeted fleet would make


def test_a_call_stopped_by_the_budget_says_so(make_engine, upstream):
    make_engine(max_retries=3, base_delay_ms=1, retry_budget_percent=0, minimum_calls=1, window_size=10,
                failure_threshold=100, failure_rate_threshold=0)
    execute("svc", upstream("warm-up"))
    result = execute("svc", upstream(ConnectionError()))
    assert result.attempts == 1
    assert result.error.details["stopped_by"] == "retry_budget"


def test_without_a_budget_every_failure_gets_all_its_retries(make_engine, upstream):
    make_engine(max_retries=2, base_delay_ms=1, retry_budget_percent=None, minimum_calls=1,
                failure_threshold=10**6, failure_rate_threshold=0)
    op = upstream(ConnectionError())
    for _ in range(10):
        execute("svc", op)
    assert op.calls == 30


def test_retries_stop_when_the_breaker_opens_mid_call(make_engine, upstream):
    make_engine(max_retries=5, base_delay_ms=1, failure_threshold=2)
    op = upstream(ConnectionError())
    result = execute("svc", op)
    assert op.calls == 2
    assert result.error.category is ErrorCategory.NETWORK
    assert result.error.details["stopped_by"] == "circuit_open"


def test_retry_delay_uses_the_policy_formula():
    policy = Policy(name="p", base_delay_ms=200, backoff_multiplier=1.5, max_delay_ms=600, jitter=False)
    error = err(ErrorCategory.TIMEOUT)
    delays = [retry_delay_s(policy, n, error, random.Random(0)) for n in (1, 2, 3, 4)]
    assert delays == pytest.approx([0.2, 0.3, 0.45, 0.6])


@pytest.mark.parametrize("header, seconds", [("5", 5.0), ("0", 0.0), (" 2.5 ", 2.5), ("-3", 0.0), ("soon", None),
                                             ("", None), (None, None)])
def test_retry_after_headers_in_seconds(header, seconds):
    assert parse_retry_after(header) == seconds


def test_retry_after_as_an_http_date():
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now=now) == pytest.approx(20.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now=now) == 0.0

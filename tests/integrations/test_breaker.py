"""The circuit breaker, through the engine and on its own state machine."""

import math
import threading

import pytest

from integrations.errors import ErrorCategory, ResilienceError
from integrations.resilience import breaker as br
from integrations.resilience import execute
from integrations.resilience.breaker import BreakerCell
from integrations.resilience.events import StateTransition
from integrations.resilience.policy import Policy

# every engine test runs on the per-process store and on the shared Redis store
STORE_KINDS = ["local", "redis"]


def fail():
    raise ConnectionError("connection refused")


def ok():
    return "ok"


def state(engine, name="svc"):
    return engine.breaker(name).state


def test_it_opens_after_failure_threshold_consecutive_failures(make_engine):
    engine = make_engine(failure_threshold=3, max_retries=0, failure_rate_threshold=0)
    for _ in range(2):
        execute("svc", fail)
    assert state(engine) == br.CLOSED
    execute("svc", fail)
    assert state(engine) == br.OPEN


def test_a_success_resets_the_consecutive_failure_count(make_engine):
    engine = make_engine(failure_threshold=3, max_retries=0, failure_rate_threshold=0)
    for op in (fail, fail, ok, fail, fail):
        execute("svc", op)
    assert state(engine) == br.CLOSED


def test_an_open_breaker_fails_fast_without_invoking_the_operation(make_engine, upstream):
    make_engine(failure_threshold=1, max_retries=0)
    execute("svc", fail)
    op = upstream("never")
    result = execute("svc", op)
    assert not result.ok
    assert result.error.category is ErrorCategory.CIRCUIT_OPEN
    assert result.attempts == 0
    assert op.calls == 0


def test_it_opens_on_the_failure_rate_once_minimum_calls_were_made(make_engine):
    engine = make_engine(failure_threshold=100, failure_rate_threshold=50, window_size=10, minimum_calls=6,
                         max_retries=0)
    for op in (ok, fail, ok, fail, ok):  # 40 % over 5 calls: under the minimum anyway
        execute("svc", op)
    assert state(engine) == br.CLOSED
    execute("svc", fail)  # 3 of 6 = 50 %
    assert state(engine) == br.OPEN


def test_the_failure_rate_is_measured_over_the_last_window_size_calls(make_engine):
    engine = make_engine(failure_threshold=100, failure_rate_threshold=50, window_size=4, minimum_calls=4,
                         max_retries=0)
    for op in (fail, ok, ok, ok, ok, ok):  # the failure slides out of the window
        execute("svc", op)
    snapshot = engine.breaker("svc")
    assert (snapshot.window_calls, snapshot.window_failures) == (4, 0)
    for op in (fail, ok):
        execute("svc", op)
    assert state(engine) == br.CLOSED  # 1 of 4
    execute("svc", fail)  # 2 of 4
    assert state(engine) == br.OPEN


def test_it_opens_on_the_slow_call_rate(make_engine, clock):
    engine = make_engine(failure_threshold=100, failure_rate_threshold=0, slow_call_rate_threshold=50,
                         slow_call_ms=100, window_size=4, minimum_calls=4, attempt_timeout_ms=10_000)

    def slow():
        clock.advance(0.2)
        return "late but fine"

    for op in (ok, ok, slow):
        assert execute("svc", op).ok
    assert state(engine) == br.CLOSED
    execute("svc", slow)  # 2 slow of 4
    assert state(engine) == br.OPEN


def test_open_becomes_half_open_after_the_reset_timeout(make_engine, clock, upstream):
    engine = make_engine(failure_threshold=1, max_retries=0, reset_timeout_s=30)
    execute("svc", fail)
    clock.advance(29.9)
    assert execute("svc", ok).error.category is ErrorCategory.CIRCUIT_OPEN
    clock.advance(0.1)
    op = upstream("trial")
    assert execute("svc", op).ok
    assert op.calls == 1
    assert state(engine) == br.HALF_OPEN  # one success of the two needed


def test_success_threshold_consecutive_successes_close_it(make_engine, clock):
    engine = make_engine(failure_threshold=1, max_retries=0, reset_timeout_s=1, success_threshold=3)
    execute("svc", fail)
    clock.advance(1)
    for _ in range(2):
        execute("svc", ok)
        assert state(engine) == br.HALF_OPEN
    execute("svc", ok)
    assert state(engine) == br.CLOSED


def test_a_failure_in_half_open_reopens_it_and_restarts_the_reset_timeout(make_engine, clock):
    engine = make_engine(failure_threshold=1, max_retries=0, reset_timeout_s=10, success_threshold=2)
    execute("svc", fail)
    clock.advance(10)
    execute("svc", ok)
    execute("svc", fail)
    assert state(engine) == br.OPEN
    clock.advance(9)
    assert execute("svc", ok).error.category is ErrorCategory.CIRCUIT_OPEN
    clock.advance(1)
    assert execute("svc", ok).ok


def test_half_open_lets_at_most_half_open_max_calls_through_at_once(make_engine, clock):
    engine = make_engine(failure_threshold=1, max_retries=0, reset_timeout_s=1, half_open_max_calls=2,
                         success_threshold=5, max_concurrent=10)
    execute("svc", fail)
    clock.advance(1)
    release = threading.Event()
    entered = threading.Semaphore(0)

    def trial():
        entered.release()
        release.wait(5)
        return "trial"

    results = []
    threads = [threading.Thread(target=lambda: results.append(execute("svc", trial))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert entered.acquire(timeout=5)
    third = execute("svc", ok)  # both trial slots are held
    assert third.error.category is ErrorCategory.CIRCUIT_OPEN
    assert "half-open" in third.error.message
    release.set()
    for thread in threads:
        thread.join(5)
    assert [r.ok for r in results] == [True, True]
    assert execute("svc", ok).ok  # slots released: a new trial gets in
    assert engine.breaker("svc").half_open_in_flight == 0


def test_a_refused_trial_slot_is_given_back_when_the_quota_refuses(make_engine, clock):
    engine = make_engine(failure_threshold=1, max_retries=0, reset_timeout_s=1, half_open_max_calls=1,
                         hourly_limit=1)
    execute("svc", fail)  # uses the one unit of quota
    clock.advance(1)
    assert execute("svc", ok).error.category is ErrorCategory.QUOTA_EXCEEDED
    assert engine.breaker("svc").half_open_in_flight == 0


def test_client_errors_count_neither_as_failure_nor_as_success(make_engine):
    engine = make_engine(failure_threshold=2, max_retries=0)

    def bad_request():
        raise ResilienceError(ErrorCategory.CLIENT_ERROR, "400 bad request")

    execute("svc", fail)
    for _ in range(5):
        execute("svc", bad_request)
    snapshot = engine.breaker("svc")
    assert snapshot.consecutive_failures == 1
    assert snapshot.window_calls == 1
    execute("svc", fail)
    assert state(engine) == br.OPEN


def test_forced_open_refuses_every_call(make_engine, upstream):
    make_engine(mode="forced_open")
    op = upstream("never")
    result = execute("svc", op)
    assert result.error.category is ErrorCategory.CIRCUIT_OPEN
    assert "forced open" in result.error.message
    assert op.calls == 0


def test_forced_closed_lets_every_call_through_and_never_trips(make_engine, upstream):
    engine = make_engine(mode="forced_closed", failure_threshold=1, max_retries=0)
    op = upstream(ConnectionError("down"))
    for _ in range(10):
        execute("svc", op)
    assert op.calls == 10
    assert state(engine) == br.CLOSED


def test_metrics_only_records_transitions_but_never_blocks(make_engine, upstream, bus):
    engine = make_engine(mode="metrics_only", failure_threshold=2, max_retries=0)
    transitions = []
    bus.subscribe(StateTransition, lambda event: transitions.append(event.transition))
    op = upstream(ConnectionError("down"))
    for _ in range(5):
        execute("svc", op)
    assert op.calls == 5
    assert state(engine) == br.OPEN
    assert [(t.from_state, t.to_state) for t in transitions] == [(br.CLOSED, br.OPEN)]


def test_every_transition_is_published_with_its_reason(make_engine, clock, bus):
    make_engine(failure_threshold=1, max_retries=0, reset_timeout_s=1, success_threshold=1)
    transitions = []
    bus.subscribe(StateTransition, lambda event: transitions.append(event.transition))
    execute("svc", fail)
    clock.advance(1)
    execute("svc", ok)
    assert [(t.from_state, t.to_state) for t in transitions] == [
        (br.CLOSED, br.OPEN), (br.OPEN, br.HALF_OPEN), (br.HALF_OPEN, br.CLOSED)]
    assert transitions[0].reason == "1 consecutive failures"
    assert transitions[1].reason == "reset timeout elapsed"


def test_an_operator_reset_closes_it_and_names_who(make_engine):
    engine = make_engine(failure_threshold=1, max_retries=0)
    execute("svc", fail)
    transition = engine.reset_breaker(engine.registry.get("svc"), by="alice")
    assert (transition.from_state, transition.to_state, transition.by) == (br.OPEN, br.CLOSED, "alice")
    assert execute("svc", ok).ok


def test_a_reset_of_a_closed_breaker_clears_its_counts_without_a_transition(make_engine):
    engine = make_engine(failure_threshold=3, max_retries=0)
    execute("svc", fail)
    assert engine.reset_breaker(engine.registry.get("svc")) is None
    assert engine.breaker("svc").consecutive_failures == 0


@pytest.mark.parametrize("window", [1, 3, 7])
def test_the_window_counts_stay_consistent_as_it_slides(window):
    policy = Policy(name="cell", window_size=window, minimum_calls=window, failure_threshold=10**6,
                    failure_rate_threshold=0, slow_call_rate_threshold=0)
    cell = BreakerCell("cell", window)
    history = []
    for i in range(50):
        failed, slow, retry = i % 3 == 0, i % 4 == 0, i % 5 == 0
        cell.record(policy, 0.0, br.FAILURE if failed else br.SUCCESS, slow, False, retry)
        history.append((failed, slow, retry))
        last = history[-window:]
        assert cell.count == len(last)
        assert cell.failures == sum(f for f, _, _ in last)
        assert cell.slows == sum(s for _, s, _ in last)
        assert cell.retries == sum(r for _, _, r in last)


# -- the time window (window_type="time"): the calls of the last window_duration_s seconds --------------

TIMED = dict(window_type="time", window_duration_s=60, failure_threshold=100, failure_rate_threshold=50,
             minimum_calls=4, max_retries=0)


def test_a_time_window_forgets_calls_older_than_its_duration(make_engine, clock):
    engine = make_engine(**TIMED)
    make_engine(name="counted", **{**TIMED, "window_type": "count", "window_size": 20})
    for name in ("svc", "counted"):
        for _ in range(3):  # under minimum_calls: no verdict yet
            execute(name, fail)
    clock.advance(61)
    assert engine.breaker("svc").window_calls == 0
    assert engine.breaker("counted").window_calls == 3
    for name in ("svc", "counted"):
        for op in (ok, ok, ok, fail):
            execute(name, op)
    assert state(engine) == br.CLOSED  # 1 failure of 4 in the last minute
    assert state(engine, "counted") == br.OPEN  # the hour-old failures still count: 4 of 7


def test_a_burst_of_failures_within_the_time_window_trips_it(make_engine, clock, bus):
    engine = make_engine(**TIMED)
    transitions = []
    bus.subscribe(StateTransition, lambda event: transitions.append(event.transition))
    for op in (ok, fail, ok, ok, fail):
        execute("svc", op)
        clock.advance(5)
    assert state(engine) == br.CLOSED  # 2 of 5
    execute("svc", fail)  # 3 of 6, all within 25 s
    assert state(engine) == br.OPEN
    assert transitions[-1].reason == "failure rate 50% >= 50% over 6 calls in the last 60 s"


def test_the_same_failures_spread_over_longer_than_the_time_window_do_not_trip_it(make_engine, clock):
    engine = make_engine(**TIMED)
    make_engine(name="counted", **{**TIMED, "window_type": "count", "window_size": 20})
    for op in (ok, fail, ok, ok, fail, fail, fail, fail):
        for name in ("svc", "counted"):
            execute(name, op)
        assert state(engine) == br.CLOSED
        assert engine.breaker("svc").window_calls <= 2  # one call every 30 s: two at most in a minute
        clock.advance(30)
    assert state(engine, "counted") == br.OPEN  # a count window judges the same calls as one burst


def test_minimum_calls_counts_only_the_calls_within_the_time_window(make_engine, clock):
    engine = make_engine(**TIMED)
    for _ in range(3):
        execute("svc", fail)
    clock.advance(59.5)
    execute("svc", fail)  # 4 failures in 59.5 s
    assert state(engine) == br.OPEN
    engine.reset_breaker(engine.registry.get("svc"))
    for _ in range(3):
        execute("svc", fail)
    clock.advance(60)
    execute("svc", fail)  # 4 failures in 60 s: the first three have left the window
    snapshot = engine.breaker("svc")
    assert (snapshot.state, snapshot.window_calls, snapshot.window_failures) == (br.CLOSED, 1, 1)


def test_the_slow_call_rate_is_measured_over_the_time_window(make_engine, clock):
    engine = make_engine(**{**TIMED, "failure_rate_threshold": 0, "slow_call_rate_threshold": 50,
                            "slow_call_ms": 100, "attempt_timeout_ms": 10_000})

    def slow():
        clock.advance(0.2)
        return "late but fine"

    for op in (slow, ok, slow):
        execute("svc", op)
    clock.advance(60)
    for op in (ok, ok, slow):
        execute("svc", op)
    assert state(engine) == br.CLOSED  # 1 slow of 3 in the window: the old ones left it
    execute("svc", slow)
    assert state(engine) == br.OPEN  # 2 of 4


def test_a_policy_saved_with_another_window_starts_counting_again(make_engine):
    engine = make_engine(**TIMED)
    for _ in range(3):
        execute("svc", fail)
    engine.registry.put(engine.registry.get("svc").replace(window_type="count", window_size=10))
    execute("svc", ok)
    assert (engine.breaker("svc").window_calls, engine.breaker("svc").window_failures) == (1, 0)


@pytest.mark.parametrize("duration", [1, 7, 60, 90, 3600])
def test_the_time_window_counts_what_a_brute_force_count_of_its_buckets_gives(duration):
    policy = Policy(name="cell", window_type="time", window_duration_s=duration, failure_threshold=10**6,
                    failure_rate_threshold=0, slow_call_rate_threshold=0)
    buckets, width = br.time_buckets(duration)
    cell = BreakerCell("cell", 20, duration)
    history = []
    now = 1_700_000_000.0
    for i in range(400):
        now += (i * 7919 % 13) * duration / 40  # steps of 0 to 0.3 windows
        failed, slow, retry = i % 3 == 0, i % 4 == 0, i % 5 == 0
        cell.record(policy, now, br.FAILURE if failed else br.SUCCESS, slow, False, retry)
        history.append((now, failed, slow, retry))
        now += i % 3 * width / 2  # read a little later (time only moves on)
        shown = cell.snapshot(policy, now)
        newest = math.floor(now / width)
        kept = [call for call in history if math.floor(call[0] / width) > newest - buckets]
        assert (shown.window_calls, shown.window_failures, shown.window_slow, shown.window_retries) == (
            len(kept), sum(c[1] for c in kept), sum(c[2] for c in kept), sum(c[3] for c in kept))


def test_a_time_window_has_at_most_max_buckets_each_of_duration_over_their_number():
    assert br.time_buckets(1) == (1, 1.0)
    assert br.time_buckets(60) == (60, 1.0)
    assert br.time_buckets(90) == (br.MAX_BUCKETS, 1.5)
    assert br.time_buckets(3600) == (br.MAX_BUCKETS, 60.0)


def test_the_retry_budget_of_a_time_window_counts_every_call_in_it():
    policy = Policy(name="cell", window_type="time", window_duration_s=60, window_size=1, minimum_calls=1,
                    retry_budget_percent=20)
    cell = BreakerCell("cell", 1, 60)
    for _ in range(9):
        cell.record(policy, 0.0, br.SUCCESS, False, False, False)
    assert cell.retry_allowed(policy, 1.0)  # 1 retry for 10 calls: a count window of 1 would say 1 of 1
    cell.record(policy, 1.0, br.SUCCESS, False, False, True)
    assert cell.retry_allowed(policy, 2.0)  # 2 of 11
    cell.record(policy, 2.0, br.SUCCESS, False, False, True)
    assert not cell.retry_allowed(policy, 3.0)  # 3 of 12 is over 20 %
    assert not cell.retry_allowed(policy, 60.0)  # the nine first calls left the window: 3 of 3
    assert cell.retry_allowed(policy, 62.0)  # every call left it: fewer than minimum_calls, no budget applies


def test_a_count_window_counts_exactly_its_last_calls_as_they_replace_older_ones():
    """Every mix of flags in and out of a full ring (the same flags skip the count update): the
    window's counts are always those of its last window_size calls."""
    import random

    rng = random.Random(7)
    size = 7
    policy = Policy(name="ring", window_size=size, minimum_calls=10**6, failure_threshold=10**6,
                    failure_rate_threshold=0, slow_call_rate_threshold=0)
    cell = BreakerCell("ring", size)
    made = []
    for step in range(400):
        failed, slow, retry = rng.random() < 0.3, rng.random() < 0.2, rng.random() < 0.25
        if step % 50 < 20:  # runs of plain successes, as most traffic is
            failed = slow = retry = False
        cell.record(policy, float(step), br.FAILURE if failed else br.SUCCESS, slow, False, retry)
        made.append((failed, slow, retry))
        last = made[-size:]
        snap = cell.snapshot(policy, float(step))
        assert (snap.window_calls, snap.window_failures, snap.window_slow, snap.window_retries) == (
            len(last), sum(f for f, _, _ in last), sum(s for _, s, _ in last), sum(r for _, _, r in last)), step

"""The redrive, in this process: outcomes, backoff, poison, health gate, rate cap, leases.

Time is driven by hand: the engine runs on a FakeClock (make_engine) and the
redrive on a SteppedNow, so no test waits through a backoff.
"""

import logging
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

import dlq_test_handlers  # noqa: F401 - registers the dlq_test.* handlers
from dlq_support import SteppedNow, enqueue, make_redriver
from integrations.dlq import dead_letter_handler
from integrations.dlq.models import MAX_INTERRUPTED_RUNS, DeadLetter
from integrations.dlq.redrive import RateCap
from integrations.dlq.signals import dead_letter_died
from integrations.dlq.subscriber import on_dead_letter_requested
from integrations.errors import ErrorCategory, ResilienceError
from integrations.resilience import execute
from integrations.resilience.events import DeadLetterRequested

pytestmark = pytest.mark.django_db

CALLS = []
ON_CALL = []  # callables a test wants run inside the handler
FAILURES = {
    "network": lambda: ConnectionError("upstream down"),
    "payload": lambda: ValueError("order id missing"),
    "arguments": lambda: TypeError("charge() got an unexpected keyword argument 'amount'"),
    "validation": lambda: ResilienceError(ErrorCategory.VALIDATION, "order 7 does not exist"),
    "rate_limited": lambda: ResilienceError(ErrorCategory.RATE_LIMIT, "slow down", retry_after=40),
}


@dead_letter_handler("redrive_test.scripted", takes_context=True)
def scripted(payload, context):
    """Fails on the attempts listed in payload["failures"] ({"1": "network", ...}), else succeeds."""
    CALLS.append((context.entry_id, context.attempt, context.idempotency_key))
    for hook in ON_CALL:
        hook(context)
    failure = payload.get("failures", {}).get(str(context.attempt))
    if failure:
        raise FAILURES[failure]()
    return "ok"


@dead_letter_handler("redrive_test.plain")
def plain(payload):
    CALLS.append(payload)


@pytest.fixture(autouse=True)
def dlq_settings(settings):
    settings.RESILIENCE_DLQ_BACKOFF_BASE_MS = 1000
    settings.RESILIENCE_DLQ_BACKOFF_MAX_MS = 3000
    settings.RESILIENCE_DLQ_MAX_REDRIVES = 5
    CALLS.clear()
    ON_CALL.clear()
    yield settings


@pytest.fixture
def now():
    return SteppedNow(timezone.now() + timedelta(seconds=5))  # entries enqueued now are due (base 1 s)


@pytest.fixture
def svc(make_engine):
    # never trips by itself: these tests fail on purpose
    return make_engine("svc", max_retries=0, failure_threshold=1000, window_size=100, minimum_calls=100)


def down():
    raise ConnectionError("upstream down")


def always_failing(**kwargs):
    return enqueue("redrive_test.scripted", {"failures": {str(n): "network" for n in range(1, 20)}}, **kwargs)


def test_a_handler_that_fails_twice_then_succeeds_ends_succeeded_after_three_redrives(svc, now):
    entry = enqueue("redrive_test.scripted", {"failures": {"1": "network", "2": "network"}})
    for _ in range(3):
        make_redriver(now).run()
        now.advance(60)
    entry.refresh_from_db()
    assert (entry.status, entry.attempts, entry.finished_at is not None) == ("succeeded", 3, True)
    assert [record["outcome"] for record in entry.history] == ["enqueued", "failed", "failed", "succeeded"]
    assert entry.history[1]["error"]["category"] == "network"
    assert [attempt for _, attempt, _ in CALLS] == [1, 2, 3]


def test_a_failed_redrive_waits_an_exponential_backoff_with_jitter_capped_at_the_maximum(svc, now):
    entry = always_failing()
    waits = []
    for _ in range(4):
        make_redriver(now).run()
        entry.refresh_from_db()
        waits.append((entry.next_attempt_at - now()).total_seconds())
        now.advance(60)
    # base 1 s, x2 per redrive, max 3 s; each drawn in [half, all] of it
    for wait, (low, high) in zip(waits, [(0.5, 1), (1, 2), (1.5, 3), (1.5, 3)]):
        assert low <= wait <= high
    assert entry.status == "retrying"


def test_a_retry_after_from_the_upstream_is_a_floor_of_the_backoff(svc, now, settings):
    settings.RESILIENCE_DLQ_BACKOFF_MAX_MS = 60_000
    entry = enqueue("redrive_test.scripted", {"failures": {"1": "rate_limited"}})
    make_redriver(now).run()
    entry.refresh_from_db()
    assert (entry.next_attempt_at - now()).total_seconds() == pytest.approx(40)


def test_reaching_max_redrives_makes_it_dead_and_tells_monitoring(svc, now, caplog,
                                                                  django_capture_on_commit_callbacks):
    entry = always_failing(max_redrives=2)
    died = []
    dead_letter_died.connect(lambda sender, entry, reason, **kw: died.append((entry.pk, reason)), weak=False,
                             dispatch_uid="test-died")
    try:
        with caplog.at_level(logging.ERROR, logger="integrations.dlq"):
            for _ in range(3):
                with django_capture_on_commit_callbacks(execute=True):
                    make_redriver(now).run()
                now.advance(60)
    finally:
        dead_letter_died.disconnect(dispatch_uid="test-died")
    entry.refresh_from_db()
    assert (entry.status, entry.attempts, len(CALLS)) == ("dead", 2, 2)
    assert died == [(entry.pk, "max_redrives (2) reached")]
    assert f"dead letter #{entry.pk} of svc (handler redrive_test.scripted) is dead" in caplog.text


def test_each_entry_runs_at_most_once_a_run_even_when_due_again_during_it(svc, settings):
    settings.RESILIENCE_DLQ_BACKOFF_BASE_MS = 1
    entry = always_failing()
    report = make_redriver(lambda: timezone.now() + timedelta(seconds=1)).run()
    entry.refresh_from_db()
    assert (entry.attempts, report.retrying) == (1, 1)


def test_a_failed_redrive_updates_its_entry_and_enqueues_no_new_dead_letter(svc, now, bus):
    bus.subscribe(DeadLetterRequested, on_dead_letter_requested)
    entry = always_failing()
    make_redriver(now).run()
    assert list(DeadLetter.objects.values_list("pk", "attempts")) == [(entry.pk, 1)]


def test_an_entry_whose_handler_no_module_registered_is_poison(svc, now):
    entry = enqueue("billing.gone")
    report = make_redriver(now).run()
    entry.refresh_from_db()
    assert (entry.status, entry.attempts, report.dead) == ("dead", 0, 1)
    assert entry.last_error_code == "unknown_handler"
    assert "Unknown dead letter handler 'billing.gone'" in entry.last_error_message
    assert entry.history[-1] == {"at": entry.history[-1]["at"], "outcome": "dead",
                                 "reason": "unknown handler 'billing.gone'"}


@pytest.mark.parametrize("failure, category", [("payload", "unknown"), ("arguments", "unknown"),
                                               ("validation", "validation")])
def test_a_payload_the_handler_rejects_is_poison(svc, now, failure, category):
    entry = enqueue("redrive_test.scripted", {"failures": {"1": failure}})
    make_redriver(now).run()
    entry.refresh_from_db()
    assert (entry.status, entry.attempts, entry.last_error_category) == ("dead", 1, category)
    assert entry.history[-1]["reason"].startswith("payload rejected by the handler: ")


def test_an_entry_of_an_integration_that_no_longer_exists_is_poison(svc, now):
    entry = enqueue(integration="retired")
    make_redriver(now).run()
    entry.refresh_from_db()
    assert (entry.status, entry.last_error_code) == ("dead", "unknown_integration")
    assert "retired" in entry.last_error_message


def test_an_open_breaker_holds_its_entries_until_a_half_open_trial_is_due(make_engine, clock, now):
    make_engine("svc", max_retries=0, failure_threshold=1, reset_timeout_s=30)
    execute("svc", down)  # trips the breaker
    entry = enqueue("redrive_test.scripted")
    report = make_redriver(now).run()
    entry.refresh_from_db()
    assert report.held == {"svc": "breaker open"}
    assert (entry.status, entry.attempts, entry.claim_token, CALLS) == ("pending", 0, None, [])
    clock.advance(31)
    make_redriver(now).run()
    entry.refresh_from_db()
    assert entry.status == "succeeded"  # it was the half-open trial


def test_a_breaker_forced_open_holds_its_entries(make_engine, now):
    make_engine("svc", mode="forced_open")
    enqueue()
    assert make_redriver(now).run().held == {"svc": "breaker forced open"}


def test_a_critical_quota_holds_its_entries_and_others_go_on(make_engine, now):
    make_engine("svc", hourly_limit=20)
    make_engine("other")
    for _ in range(19):
        execute("svc", lambda: None)  # 95 %: critical
    enqueue()
    other = enqueue(integration="other")
    report = make_redriver(now).run()
    other.refresh_from_db()
    assert (report.held, report.succeeded, other.status) == ({"svc": "quota critical"}, 1, "succeeded")


def test_a_refusal_by_the_pipeline_gives_the_rest_of_the_batch_back_uncounted(make_engine, now):
    make_engine("svc", hourly_limit=2)  # healthy at the gate, exhausted after two redrives
    for n in range(3):
        enqueue(payload={"n": n})
    report = make_redriver(now).run()
    statuses = sorted(DeadLetter.objects.values_list("status", "attempts", "claim_token"))
    assert statuses == [("pending", 0, None), ("succeeded", 1, None), ("succeeded", 1, None)]
    assert (report.released, report.held) == (1, {"svc": "refused by the pipeline: quota_exceeded"})


def test_an_outbound_rate_limit_refusal_gives_the_rest_of_the_batch_back_uncounted(make_engine, now):
    make_engine("svc", rate_limit_permits=2, rate_limit_period_s=60.0)
    for n in range(3):
        enqueue(payload={"n": n})
    report = make_redriver(now).run()
    statuses = sorted(DeadLetter.objects.values_list("status", "attempts"))
    assert statuses == [("pending", 0), ("succeeded", 1), ("succeeded", 1)]
    assert report.held == {"svc": "refused by the pipeline: rate_limit"}


def test_the_rate_cap_limits_entries_per_integration_per_minute(make_engine, now, clock):
    capped = f"capped-{uuid.uuid4().hex[:8]}"  # counts live in the shared cache: a name of this test's own
    make_engine(capped)
    make_engine("other")
    for n in range(5):
        enqueue(payload={"n": n}, integration=capped)
    enqueue(integration="other")
    cap = RateCap(3, "default", clock=clock.time)
    report = make_redriver(now, rate_cap=cap, batch_size=2).run()
    assert report.succeeded == 4  # 3 capped, 1 other
    assert report.held == {capped: "rate cap of 3/min reached"}
    clock.advance(60)
    assert make_redriver(now, rate_cap=cap).run().succeeded == 2
    assert not DeadLetter.objects.waiting().exists()


def crash_mid_handler(lease_until, now, max_entries=10):
    """A worker that claimed entries, started the first one's handler and died."""
    token = uuid.uuid4()
    entries, _ = DeadLetter.objects.claim("svc", max_entries, token=token, worker="crashed:42", now=now(),
                                          due_by=now(), lease_until=lease_until)
    assert DeadLetter.objects.write_claimed(token, start=entries[0]) == {entries[0].pk}
    return entries


def test_a_claim_left_by_a_crashed_worker_is_taken_up_after_its_lease_and_noted(svc, now):
    entry = enqueue("redrive_test.scripted")
    crash_mid_handler(now() + timedelta(seconds=30), now)
    assert make_redriver(now).run().processed == 0  # still leased
    now.advance(31)
    make_redriver(now).run()
    entry.refresh_from_db()
    assert (entry.status, entry.attempts) == ("succeeded", 1)  # the interrupted run is not a redrive spent
    interrupted = entry.history[1]
    assert (interrupted["outcome"], interrupted["error"]["code"]) == ("interrupted", "lease_expired")
    assert "crashed:42" in interrupted["error"]["message"]


def test_a_crash_on_the_last_allowed_redrive_leaves_the_entry_to_be_retried(svc, now):
    entry = enqueue("redrive_test.scripted", max_redrives=1)
    crash_mid_handler(now(), now)
    now.advance(1)
    make_redriver(now).run()
    entry.refresh_from_db()
    assert (entry.status, entry.attempts, len(CALLS)) == ("succeeded", 1, 1)


def test_an_entry_whose_handler_is_interrupted_again_and_again_is_poison(svc, now):
    entry = enqueue("redrive_test.scripted")
    error = {"category": "unknown", "code": "lease_expired", "message": "worker crashed:42 stopped"}
    for _ in range(MAX_INTERRUPTED_RUNS - 1):
        entry.lease_lapsed(now(), error)
        assert entry.status == "pending"
    entry.lease_lapsed(now(), error)
    assert (entry.status, entry.attempts) == ("dead", 0)
    assert f"interrupted {MAX_INTERRUPTED_RUNS} times" in entry.history[-1]["reason"]


def test_entries_a_crashed_worker_never_started_are_run_without_being_charged(svc, now):
    for _ in range(2):
        enqueue("redrive_test.scripted", max_redrives=1)
    started, untouched = crash_mid_handler(now(), now)  # the first claimed was started, the other not
    now.advance(1)
    make_redriver(now).run()
    started.refresh_from_db()
    untouched.refresh_from_db()
    assert [e.history[-1]["outcome"] for e in (started, untouched)] == ["succeeded", "succeeded"]
    assert [e.attempts for e in (started, untouched)] == [1, 1]
    assert sum(record["outcome"] == "interrupted" for record in started.history) == 1
    assert not any(record["outcome"] == "interrupted" for record in untouched.history)


def test_the_lease_is_renewed_when_the_next_run_could_outlive_it(make_engine, now):
    make_engine("svc", timeout_ms=10_000)  # each run needs 10 s + 5 s margin of lease
    leases = []

    def slow_and_watch_lease(context):
        leases.append(DeadLetter.objects.get(pk=context.entry_id).lease_expires_at)
        now.advance(8)

    ON_CALL.append(slow_and_watch_lease)
    first, second = enqueue("redrive_test.scripted"), enqueue("redrive_test.scripted")
    started = now()
    make_redriver(now, lease_s=1).run()
    assert leases == [started + timedelta(seconds=15), started + timedelta(seconds=8 + 15)]
    assert set(DeadLetter.objects.values_list("status", flat=True)) == {"succeeded"}
    assert first.pk < second.pk


def test_redrives_are_never_served_from_the_response_cache(make_engine, now):
    make_engine("svc", cache_ttl_s=300)
    enqueue("redrive_test.plain", {"same": "payload"})
    enqueue("redrive_test.plain", {"same": "payload"})
    make_redriver(now).run()
    assert CALLS == [{"same": "payload"}, {"same": "payload"}]


def test_a_handler_gets_its_payload_and_with_takes_context_a_stable_idempotency_key(svc, now):
    keyed = enqueue("redrive_test.scripted", idempotency_key="charge-7")
    unkeyed = enqueue("redrive_test.scripted", {"failures": {"1": "network"}})
    make_redriver(now).run()
    now.advance(60)
    make_redriver(now).run()
    assert sorted(CALLS) == sorted([(keyed.pk, 1, "charge-7"), (unkeyed.pk, 1, f"dead-letter-{unkeyed.pk}"),
                                    (unkeyed.pk, 2, f"dead-letter-{unkeyed.pk}")])


def synchronous_commit():
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return cursor.fetchone()[0]


@pytest.mark.parametrize("async_commit, during", [(True, "off"), (False, "local")])
def test_on_postgresql_the_run_writes_without_waiting_for_the_wal_flush_unless_told_and_restores_the_setting(
        svc, now, settings, async_commit, during):
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("synchronous_commit is PostgreSQL's: needs DATABASE_URL (the second run of .ci/run sets it)")
    settings.RESILIENCE_DLQ_ASYNC_COMMIT = async_commit
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO local")  # the project's own choice, which the run must give back
    seen = []
    ON_CALL.append(lambda context: seen.append(synchronous_commit()))
    entry = enqueue("redrive_test.scripted", {})
    assert make_redriver(now).run().succeeded == 1
    assert seen == [during]
    assert synchronous_commit() == "local"
    assert DeadLetter.objects.get(pk=entry.pk).status == "succeeded"

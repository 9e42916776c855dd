"""The DeadLetter model: enqueueing, idempotency, claims, and the operators' actions."""

import random
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from dlq_support import enqueue
from integrations.dlq.models import DeadLetter, backoff_delay_s, check_purgeable, error_record
from integrations.errors import ErrorCategory, ResilienceError

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def backoff(settings):
    settings.RESILIENCE_DLQ_BACKOFF_BASE_MS = 1000
    settings.RESILIENCE_DLQ_BACKOFF_MAX_MS = 8000
    settings.RESILIENCE_DLQ_MAX_REDRIVES = 4


def claim(now, *, lease_s=30, worker="w:1", integration="svc"):
    token = uuid.uuid4()
    entries, lapsed = DeadLetter.objects.claim(integration, 100, token=token, worker=worker, now=now, due_by=now,
                                               lease_until=now + timedelta(seconds=lease_s))
    return token, entries, lapsed


def test_enqueueing_stores_the_work_its_error_redacted_and_schedules_the_first_redrive():
    error = ResilienceError(ErrorCategory.SERVER_ERROR, "POST /charge?api_key=abc returned 503",
                            status=503, headers={"Authorization": "Bearer x"})
    before = timezone.now()
    entry, created = DeadLetter.enqueue("billing", "billing.charge", {"order": 7}, error=error, attempts=4)
    entry.refresh_from_db()
    assert created and (entry.status, entry.attempts, entry.max_redrives) == ("pending", 0, 4)
    assert (entry.integration_name, entry.handler_name, entry.payload) == ("billing", "billing.charge", {"order": 7})
    assert (entry.last_error_category, entry.last_error_message) == ("server_error",
                                                                     "POST /charge?api_key=[redacted] returned 503")
    assert entry.last_error_details == {"status": 503, "headers": {"Authorization": "[redacted]"}}
    assert timedelta(seconds=0.5) <= entry.next_attempt_at - before <= timedelta(seconds=1.5)
    assert entry.history == [{"at": entry.history[0]["at"], "outcome": "enqueued", "call_attempts": 4,
                              "error": error_record(error)}]


def test_the_same_idempotency_key_enqueued_twice_keeps_one_entry():
    first, created = DeadLetter.enqueue("billing", "billing.charge", {"order": 7}, idempotency_key="charge-7")
    again, created_again = DeadLetter.enqueue("billing", "billing.charge", {"order": 8}, idempotency_key="charge-7")
    assert (created, created_again, again.pk) == (True, False, first.pk)
    assert DeadLetter.objects.get().payload == {"order": 7}


def test_enqueueing_refuses_a_payload_that_is_not_json():
    with pytest.raises(TypeError, match="not JSON"):
        DeadLetter.enqueue("billing", "billing.charge", {"at": timezone.now()})
    assert not DeadLetter.objects.exists()


def test_the_backoff_doubles_from_the_base_up_to_the_maximum_with_jitter():
    rng = random.Random(3)
    for attempt, (low, high) in {1: (0.5, 1), 2: (1, 2), 3: (2, 4), 4: (4, 8), 9: (4, 8)}.items():
        delays = [backoff_delay_s(attempt, rng) for _ in range(200)]
        assert low <= min(delays) and max(delays) <= high
        assert max(delays) - min(delays) > (high - low) / 2  # really jittered
    assert backoff_delay_s(1, rng, retry_after=5) == 5
    assert backoff_delay_s(1, rng, retry_after=600) == 8


def test_two_claims_never_take_the_same_entry():
    for n in range(5):
        enqueue(payload={"n": n})
    now = timezone.now() + timedelta(seconds=5)
    _, first, _ = claim(now)
    _, second, _ = claim(now)
    assert (len(first), second) == (5, [])


def test_a_lapsed_claim_can_be_taken_again_and_says_by_whom_it_was_held():
    entry = enqueue()
    now = timezone.now() + timedelta(seconds=5)
    first_token, (first,), _ = claim(now, worker="host:41")
    assert DeadLetter.objects.write_claimed(first_token, start=first) == {first.pk}  # host:41 died in it
    assert claim(now + timedelta(seconds=29))[1] == []
    token, entries, lapsed = claim(now + timedelta(seconds=31), worker="host:42")
    assert ([e.pk for e in entries], lapsed) == ([entry.pk], {entry.pk: "host:41"})
    assert entries[0].claimed_by == "host:42" and entries[0].claim_token == token


def test_a_lapsed_claim_on_an_entry_never_started_is_not_a_lapsed_run():
    entry = enqueue()
    now = timezone.now() + timedelta(seconds=5)
    claim(now, worker="host:41")  # claimed, then the worker died before reaching this entry
    _, entries, lapsed = claim(now + timedelta(seconds=31), worker="host:42")
    assert ([e.pk for e in entries], lapsed) == ([entry.pk], {})


def test_an_outcome_is_stored_only_by_the_worker_holding_the_claim():
    enqueue()
    now = timezone.now() + timedelta(seconds=5)
    old_token, (stale,), _ = claim(now, lease_s=1)
    new_token, (current,), _ = claim(now + timedelta(seconds=2))
    stale.succeeded(now, duration_ms=1)
    assert DeadLetter.objects.write_claimed(old_token, [stale]) == set()
    current.succeeded(now, duration_ms=1)
    assert DeadLetter.objects.write_claimed(new_token, [current]) == {current.pk}
    assert DeadLetter.objects.get().status == "succeeded"


def test_operators_discard_requeue_and_retry_entries_not_held_by_a_worker(django_capture_on_commit_callbacks,
                                                                       monkeypatch):
    from integrations.dlq import tasks

    queued = []
    monkeypatch.setattr(tasks, "queue_redrive", lambda: queued.append(True))
    waiting, held, dead = enqueue(), enqueue(integration="held"), enqueue()
    DeadLetter.objects.filter(pk=dead.pk).update(status="dead", attempts=4)
    claim(timezone.now() + timedelta(seconds=5), integration="held")

    assert DeadLetter.objects.filter(pk__in=[waiting.pk, held.pk]).discard(by="ann") == 1
    assert DeadLetter.objects.get(pk=held.pk).status == "pending"  # its worker's outcome is about to be stored
    with django_capture_on_commit_callbacks(execute=True):
        assert DeadLetter.objects.filter(pk=dead.pk).retry_now(by="bob") == 1
    dead.refresh_from_db()
    assert (dead.status, dead.attempts, dead.history[-1]["outcome"], dead.history[-1]["by"]) == (
        "pending", 0, "requeued", "bob")
    assert queued == [True]
    discarded = DeadLetter.objects.get(pk=waiting.pk)
    assert (discarded.status, discarded.history[-1]["by"]) == ("discarded", "ann")


def test_purging_deletes_finished_entries_only():
    waiting, done = enqueue(), enqueue()
    DeadLetter.objects.filter(pk=done.pk).update(status="succeeded")
    assert DeadLetter.objects.all().purge() == 1
    assert list(DeadLetter.objects.values_list("pk", flat=True)) == [waiting.pk]
    with pytest.raises(ValueError, match="'pending' cannot be purged"):
        check_purgeable("pending")


def test_choosing_entries_names_those_missing_or_not_retryable():
    waiting, done = enqueue(), enqueue()
    DeadLetter.objects.filter(pk=done.pk).update(status="succeeded")
    with pytest.raises(LookupError, match=f"no dead letter with id {done.pk + 1}"):
        DeadLetter.objects.with_ids([waiting.pk, done.pk + 1])
    with pytest.raises(ValueError, match=f"entries #{done.pk} succeeded or were discarded"):
        DeadLetter.objects.with_ids([waiting.pk, done.pk]).check_retryable()


def test_stats_count_by_status_and_integration():
    enqueue(), enqueue(integration="other")
    DeadLetter.objects.filter(integration_name="other").update(status="dead")
    stats = DeadLetter.objects.stats(now=timezone.now() + timedelta(seconds=5))
    assert (stats["total"], stats["waiting"], stats["due"]) == (2, 1, 1)
    assert stats["by_status"] == {"pending": 1, "retrying": 0, "succeeded": 0, "dead": 1, "discarded": 0}
    assert stats["by_integration"]["other"]["dead"] == 1
    assert stats["oldest_waiting_at"] is not None

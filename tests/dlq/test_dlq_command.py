"""``manage.py dlq {stats,peek,retry,purge}``: output, the redrive it runs, and bad arguments."""

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

import dlq_test_handlers  # noqa: F401 - registers the dlq_test.* handlers
from dlq_support import enqueue
from integrations.dlq import dead_letter_handler
from integrations.dlq.models import DeadLetter

pytestmark = pytest.mark.django_db

FAILING_ORDERS = set()


@dead_letter_handler("command_test.ship")
def ship(payload):
    if payload["order"] in FAILING_ORDERS:
        raise ConnectionError("carrier down")


@pytest.fixture(autouse=True)
def setup(settings, make_engine):
    settings.RESILIENCE_DLQ_BACKOFF_BASE_MS = 60_000  # nothing is due by itself during a test
    settings.RESILIENCE_DLQ_RATE_PER_MINUTE = 0
    make_engine("svc", max_retries=0, failure_threshold=1000, window_size=100, minimum_calls=100)
    make_engine("other")
    FAILING_ORDERS.clear()


def dlq(*args):
    out, err = StringIO(), StringIO()
    call_command("dlq", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_stats_count_by_status_and_integration():
    enqueue("command_test.ship", {"order": 1})
    enqueue("command_test.ship", {"order": 2}, integration="other")
    DeadLetter.objects.filter(integration_name="other").update(status="dead")
    out, _ = dlq("stats")
    assert "dead letters: 2 (waiting 1, due now 0)" in out
    assert "pending 1  retrying 0  succeeded 0  dead 1  discarded 0" in out
    assert "other  dead 1" in out and "svc    pending 1" in out
    assert "dead letters: 1 " in dlq("stats", "--integration", "other")[0]


def test_peek_lists_the_latest_and_shows_one_in_full():
    first = enqueue("command_test.ship", {"order": 1})
    enqueue("command_test.ship", {"order": 2})
    out, _ = dlq("peek", "--status", "pending")
    lines = out.splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"#{first.pk} ") and "command_test.ship" in lines[1]
    out, _ = dlq("peek", "--id", str(first.pk))
    assert json.loads(out)["payload"] == {"order": 1}
    assert dlq("peek", "--integration", "nobody")[0] == "no dead letters match\n"


def test_retry_runs_the_chosen_entries_now_whatever_their_next_attempt_time():
    chosen = enqueue("command_test.ship", {"order": 1})
    left = enqueue("command_test.ship", {"order": 2})
    out, _ = dlq("retry", "--id", str(chosen.pk))
    assert "retried 1 of 1: 1 succeeded" in out
    assert DeadLetter.objects.get(pk=chosen.pk).status == "succeeded"
    assert DeadLetter.objects.get(pk=left.pk).status == "pending"


def test_retry_all_runs_every_waiting_entry_with_a_progress_bar_and_reports_failures():
    for order in range(25):
        enqueue("command_test.ship", {"order": order})
    FAILING_ORDERS.add(3)
    out, err = dlq("retry", "--all")
    assert "retried 25 of 25: 24 succeeded, 1 to retry, 0 dead, 0 released" in out
    assert err.splitlines()[-1] == f"retry [{'#' * 30}] 25/25 100%"
    assert DeadLetter.objects.get(payload__order=3).status == "retrying"


def test_retry_of_dead_entries_requeues_them_first():
    dead = enqueue("command_test.ship", {"order": 1})
    DeadLetter.objects.filter(pk=dead.pk).update(status="dead", attempts=10)
    out, _ = dlq("retry", "--status", "dead")
    dead.refresh_from_db()
    assert (dead.status, dead.attempts) == ("succeeded", 1)
    assert [record["outcome"] for record in dead.history] == ["enqueued", "requeued", "succeeded"]
    assert "1 succeeded" in out


def test_purge_deletes_finished_entries_and_keeps_waiting_ones():
    waiting = enqueue("command_test.ship", {"order": 1})
    done = enqueue("command_test.ship", {"order": 2})
    DeadLetter.objects.filter(pk=done.pk).update(status="succeeded")
    out, _ = dlq("purge", "--id", str(waiting.pk), str(done.pk))
    assert out == "deleted 1 finished entry\nkept 1 waiting entry: discard them first\n"
    assert list(DeadLetter.objects.values_list("pk", flat=True)) == [waiting.pk]


@pytest.mark.parametrize("args, message", [
    (["retry"], "--id, --status, --all: give exactly one of them"),
    (["retry", "--all", "--status", "dead"], "--id, --status, --all: give exactly one of them"),
    (["retry", "--status", "succeeded"], "--status: succeeded entries cannot be retried"),
    (["retry", "--id", "0"], "--id: ids are positive integers"),
    (["retry", "--id", "999"], "--id: no dead letter with id 999"),
    (["stats", "--all"], "--all: not an option of 'dlq stats'"),
    (["peek", "--all"], "--all: not an option of 'dlq peek'"),
    (["purge", "--status", "pending"], "--status: 'pending' cannot be purged"),
    (["peek", "--status", "lost"], "argument --status: invalid choice: 'lost'"),
    (["retry", "--id", "x"], "argument --id: invalid int value: 'x'"),
    (["drain"], "argument action: invalid choice: 'drain'"),
])
def test_bad_arguments_are_refused_naming_the_argument(args, message):
    with pytest.raises(CommandError, match=message.replace("(", r"\(")):
        dlq(*args)

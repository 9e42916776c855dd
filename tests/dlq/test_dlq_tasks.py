"""The dead letter queue's django-q tasks: the scheduled redrive and "retry now"."""

from datetime import timedelta

import pytest
from django.utils import timezone
from django.utils.module_loading import import_string

import dlq_test_handlers  # noqa: F401 - registers the dlq_test.* handlers
from dlq_support import enqueue
from integrations.dlq import tasks
from integrations.dlq.models import DeadLetter


def test_a_run_stops_starting_entries_at_half_the_clusters_task_timeout(monkeypatch):
    from django_q.conf import Conf  # django-q2 reads Q_CLUSTER once, at import: its reading is patched

    assert tasks.run_budget_s() == Conf.TIMEOUT / 2 == 60  # our site's Q_CLUSTER timeout: 120 s
    monkeypatch.setattr(Conf, "TIMEOUT", 90)
    assert tasks.run_budget_s() == 45
    monkeypatch.setattr(Conf, "TIMEOUT", None)
    assert tasks.run_budget_s() is None


@pytest.mark.django_db
def test_the_redrive_task_runs_the_due_entries_and_returns_its_report(make_engine, settings):
    settings.RESILIENCE_DLQ_BACKOFF_BASE_MS = 1
    make_engine("svc")
    entry = enqueue()
    DeadLetter.objects.filter(pk=entry.pk).update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    assert tasks.redrive() == {"succeeded": 1, "retrying": 0, "dead": 0, "released": 0, "lost": 0, "held": {},
                               "spool": {"stored": 0, "already_there": 0, "files": 0, "left": 0}}


def test_retry_now_queues_the_scheduled_task_itself(monkeypatch):
    import django_q.tasks

    queued = []
    monkeypatch.setattr(django_q.tasks, "async_task", lambda func, *a, **kw: queued.append(func) or "task-1")
    assert tasks.queue_redrive() == "task-1"
    assert import_string(queued[0]) is tasks.redrive

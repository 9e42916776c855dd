"""The dead letter queue's django-q tasks.

``redrive`` is the scheduled task "dlq.redrive" (every
RESILIENCE_DLQ_REDRIVE_EVERY_MIN minutes; ``manage.py resilience schedules``
installs it). It first stores the dead letters this host spooled while the
database refused them (spool.py), then runs the steps of ``Redriver.run``
(redrive.py).
"""

from __future__ import annotations

from . import spool
from .redrive import Redriver


def run_budget_s() -> float | None:
    """Half the cluster's task timeout: no entry is started later, so the task ends before it is killed."""
    from django_q.conf import Conf  # django-q2's reading of Q_CLUSTER, with its defaults

    timeout = Conf.TIMEOUT
    return timeout / 2 if timeout else None


def redrive() -> dict:
    """Spooled dead letters stored, then one redrive run over the whole queue; returns its report
    (kept as the task's result)."""
    spooled = spool.replay()
    report = Redriver.from_settings(budget_s=run_budget_s()).run().as_dict()
    report["spool"] = spooled
    return report


def on_redrive_requested(sender, **kwargs) -> str:
    """signals.redrive_requested's receiver (connected by the app)."""
    return queue_redrive()


def queue_redrive() -> str:
    """Ask the cluster for a redrive run now (operators' "retry now"); returns the task id."""
    from django_q.tasks import async_task

    return async_task("integrations.dlq.tasks.redrive")

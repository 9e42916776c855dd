"""Metrics for the user-defined watchdog rules' tests (monitoring/rules.py), importable by dotted path.

``VALUES`` is what ``site_value`` and ``by_integration`` return, set by each test; ``dead_share`` reads a
real table: the share (in %) of the dead letters of the last hour that are dead, as a user's fraud rate
would read the share of flagged payments from their own model.
"""

from datetime import timedelta

VALUES: dict = {"site": None, "by_integration": {}}


def site_value(now):
    return VALUES["site"]


def by_integration(now):
    return VALUES["by_integration"]


def broken(now):
    raise ZeroDivisionError("no payments table yet")


def dead_share(now):
    from integrations.dlq.models import DeadLetter

    recent = DeadLetter.objects.filter(created_at__gte=now - timedelta(hours=1))
    total = recent.count()
    if not total:
        return None
    return round(100 * recent.filter(status="dead").count() / total, 1)


NOT_A_FUNCTION = 42

"""Monitoring's call figures, installed as integrations' source (integrations/figures.py)."""

from __future__ import annotations

from datetime import datetime

from django.db.models import Q, Sum


class StoredCallFigures:
    """The call statistics every process flushed to the database (monitoring.models.CallStats)."""

    def window(self, integration_ids: list[int], minutes: int) -> dict[int, dict]:
        from .api import integration_stats

        return integration_stats(list(integration_ids), minutes)

    def attempts(self, integration_ids: list[int], hour_start: datetime, day_start: datetime) -> dict[int, dict]:
        from .models import CallStats

        rows = (CallStats.objects.filter(minute__gte=min(day_start, hour_start), integration_id__in=integration_ids)
                .order_by().values("integration_id")
                .annotate(day=Sum("attempts", filter=Q(minute__gte=day_start)),
                          hour=Sum("attempts", filter=Q(minute__gte=hour_start))))
        used = {row["integration_id"]: {"hour": row["hour"] or 0, "day": row["day"] or 0} for row in rows}
        return {pk: used.get(pk, {"hour": 0, "day": 0}) for pk in integration_ids}

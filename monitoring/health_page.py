"""The System health page of the admin, and the figures it shares with the Integration list.

One document (``system_health``) says everything the page shows: the
watchdog's overall status and active alerts, a card per integration (live
breaker state and quota from the state store, the last hour's calls, success
rate, p50/p95/p99, cache hit ratio and calls per minute from the call
statistics, dead letters waiting, a fault injection in force), the cache hit
ratio of all calls, the dead letter counts, the fault injections in force and the
user-defined watchdog rules (monitoring/rules.py) with their metrics' current values.
The view renders it once into the page (``json_script``) and serves it as
JSON at ``?format=json``; ``static/monitoring/health.js`` draws the page from
it and fetches it again every REFRESH_SECONDS. The whole document takes a
fixed number of queries, whatever the number of integrations (plus what the
user's metric functions run, and one query per rule whose metric names integrations).

Staff with the view permission on integrations see it; there is nothing to
act on here (the actions are on the Integration list).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import JsonResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from integrations.levels import latency_level, ratio, success_level
from integrations.models import FaultInjection, Integration
from integrations.resilience.quota import level_for
from integrations.status import IntegrationStatus, read_statuses

from .models import CallStats, describe
from .notifications import dlq_installed
from .watchdog import report
from integrations.conf import app_settings

WINDOW_MINUTES = 60
REFRESH_SECONDS = 30


def window(now: datetime | None = None) -> tuple[datetime, datetime]:
    """The last WINDOW_MINUTES whole minutes of call statistics, the current one included: [since, until)."""
    until = (now or timezone.now()).replace(second=0, microsecond=0) + timedelta(minutes=1)
    return until - timedelta(minutes=WINDOW_MINUTES), until


def last_hour_stats(integration_ids=None, now: datetime | None = None) -> dict[int, dict]:
    """``describe()`` of each integration's calls over the window, in one query (every id present)."""
    since, until = window(now)
    rows = CallStats.objects.between(since, until)
    if integration_ids is not None:
        integration_ids = list(integration_ids)
        rows = rows.filter(integration_id__in=integration_ids)
    stats = rows.totals_by_integration()
    return {pk: stats.get(pk) or describe({}) for pk in (integration_ids if integration_ids is not None else stats)}


def calls_per_minute(now: datetime | None = None) -> dict[int, list[int]]:
    """Each integration's calls in each minute of the window, oldest first, in one query."""
    since, until = window(now)
    series: dict[int, list[int]] = {}
    for integration_id, minute, calls in (CallStats.objects.between(since, until).order_by()
                                          .values_list("integration_id", "minute", "calls")):
        index = int((minute - since).total_seconds() // 60)
        series.setdefault(integration_id, [0] * WINDOW_MINUTES)[index] += calls
    return series


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def faults_in_force(integrations: list[Integration]) -> dict[int, dict]:
    """The fault injection in force on each integration that has one, in one query (none when none has).

    The integration's row says what the engine injects; its latest FaultInjection says who started it.
    """
    active = {integration.pk: integration for integration in integrations if integration.fault_active}
    latest = {}
    for injection in FaultInjection.objects.filter(integration_id__in=list(active)).order_by("starts_at", "pk"):
        latest[injection.integration_id] = injection
    faults = {}
    for pk, integration in active.items():
        injection = latest.get(pk)
        faults[pk] = {
            "integration": integration.name, "error_percent": integration.fault_error_percent,
            "latency_ms": integration.fault_latency_ms, "ends_at": _iso(integration.fault_until),
            "starts_at": _iso(injection.starts_at) if injection else None,
            "created_by": injection.created_by if injection else "",
            "url": reverse("admin:integrations_faultinjection_changelist") + f"?integration__id__exact={pk}",
        }
    return faults


def quota_dict(status: IntegrationStatus) -> dict | None:
    integration, usage = status.integration, status.quota
    if integration.hourly_limit is None and integration.daily_limit is None:
        return None
    windows = {name: {"used": used, "limit": limit, "ratio": ratio, "level": level_for(ratio)}
               for name, used, limit, ratio in (("hourly", usage.hourly_used, usage.hourly_limit, usage.hourly_ratio),
                                                ("daily", usage.daily_used, usage.daily_limit, usage.daily_ratio))
               if limit}
    return {"level": usage.level, **windows}


def integration_card(status: IntegrationStatus, stats: dict, per_minute: list[int], dead_letters: dict,
                     fault: dict | None) -> dict:
    integration = status.integration
    rate = stats["success_rate"]
    p95 = stats["latency_p95_ms"]
    return {
        "id": integration.pk,
        "name": integration.name,
        "kind": integration.kind,
        "url": reverse("admin:integrations_integration_change", args=[integration.pk]),
        "state": status.state,
        "own_state": status.own_state,
        "scope": status.scope,
        "mode": integration.mode,
        "capacity": integration.capacity,
        "quota": quota_dict(status),
        "calls": stats["calls"],
        "success_rate": rate,
        "success_level": success_level(rate),
        "latency": {"p50_ms": stats["latency_p50_ms"], "p95_ms": p95, "p99_ms": stats["latency_p99_ms"],
                    "level": latency_level(p95, integration.slow_call_ms)},
        "slow_call_ms": integration.slow_call_ms,
        "cache": {"hits": stats["cache_hits"], "misses": stats["cache_misses"], "hit_ratio": stats["cache_hit_ratio"]},
        "calls_per_minute": per_minute,
        "dead_letters_waiting": dead_letters.get("pending", 0) + dead_letters.get("retrying", 0),
        "fault": fault,
    }


def dead_letter_counts() -> dict | None:
    """The dead letter queue's counts, or None when its app is not installed."""
    if not dlq_installed():
        return None
    from integrations.dlq.models import DeadLetter

    stats = DeadLetter.objects.stats()
    return {"by_status": stats["by_status"], "waiting": stats["waiting"], "due": stats["due"],
            "oldest_waiting_at": stats["oldest_waiting_at"], "by_integration": stats["by_integration"],
            "url": reverse("admin:dlq_deadletter_changelist")}


def alert_dict(alert: dict) -> dict:
    return {**alert, "url": reverse("admin:monitoring_alert_change", args=[alert["id"]])}


def system_health(now: datetime | None = None) -> dict:
    """The document the page draws: see the module docstring."""
    now = now or timezone.now()
    since, _ = window(now)
    integrations = list(Integration.objects.all())
    statuses = read_statuses(integrations, figures_minutes=None)  # one store round trip for every card
    stats = last_hour_stats((i.pk for i in integrations), now)
    series = calls_per_minute(now)
    faults = faults_in_force(integrations)
    dead_letters = dead_letter_counts()
    dead_letters_by_name = dead_letters["by_integration"] if dead_letters else {}
    alerts = report(now)
    hits = sum(row["cache_hits"] for row in stats.values())
    misses = sum(row["cache_misses"] for row in stats.values())
    return {
        "generated_at": now.isoformat(),
        "window_minutes": WINDOW_MINUTES,
        "window_start": since.isoformat(),
        "refresh_seconds": REFRESH_SECONDS,
        "status": alerts["status"],
        "critical": [alert_dict(alert) for alert in alerts["critical"]],
        "warnings": [alert_dict(alert) for alert in alerts["warnings"]],
        "rules": alerts["rules"],
        "integrations": [
            integration_card(status, stats[status.integration.pk],
                             series.get(status.integration.pk, [0] * WINDOW_MINUTES),
                             dead_letters_by_name.get(status.name, {}), faults.get(status.integration.pk))
            for status in statuses
        ],
        "cache": {"hits": hits, "misses": misses, "hit_ratio": ratio(hits, hits + misses)},
        "dead_letters": dead_letters,
        "faults": list(faults.values()),
        "fault_injection_enabled": app_settings.FAULT_INJECTION,
        "links": {"integrations": reverse("admin:integrations_integration_changelist"),
                  "alerts": reverse("admin:monitoring_alert_changelist"),
                  "faults": reverse("admin:integrations_faultinjection_changelist")},
    }


def may_see(request, admin_site=admin.site) -> bool:
    """Seeing the system's health needs the view permission on integrations."""
    return admin_site.get_model_admin(Integration).has_view_permission(request)


def system_health_view(request, admin_site=admin.site):
    """The page, or its document at ``?format=json`` (staff: served by SystemHealthAdmin)."""
    if not may_see(request, admin_site):
        raise PermissionDenied("Seeing the system's health needs the view permission on integrations.")
    document = system_health()
    if request.GET.get("format") == "json":
        return JsonResponse(document)
    context = {**admin_site.each_context(request), "title": "System health", "document": document,
               "json_url": f"{request.path}?format=json"}
    return TemplateResponse(request, "monitoring/system_health.html", context)

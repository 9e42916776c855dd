"""``manage.py resilience <subcommand>``: the product's operations in one command.

Subcommands:

- ``status [--json]``: every integration: kind, breaker state (and mode when
  not normal), quota used / limit and level, success rate and p95 latency
  over the last hour, cache hit ratio, calls in flight. Steps:
  1. read every integration and its recorded breaker state;
  2. read the last hour's call statistics (the monitoring app) and this
     hour's and today's quota use;
  3. print a table (or, with ``--json``, the same as a JSON document).
  Where each figure comes from is printed under the table: with REDIS_URL,
  breakers and quotas are the fleet's shared state; without it, breakers are
  the last recorded transition and quotas come from the call statistics.
- ``breaker {reset,open,close} NAME``: an operator's action on one breaker,
  through ``Integration.operate_breaker`` as the admin's actions (reset: back
  to normal mode and closed; open and close: forced modes). Steps:
  1. find the integration (an unknown name lists the close matches);
  2. act as the operator ``cli:<OS user>``; the model records a BreakerEvent
     naming the operator (a reset that closed the breaker, by the breaker's
     own transition);
  3. print the breaker's new state.
- ``schedules``: install every django-q schedule of the product (idempotent).
"""

from __future__ import annotations

import difflib
import getpass
import json
import os
from datetime import datetime, timezone as dt_timezone
from types import SimpleNamespace

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from integrations.models import BREAKER_ACTIONS, BreakerState, Integration
from integrations.resilience import get_engine
from integrations.resilience.breaker import CLOSED, OPEN
from integrations.resilience.policy import MODE_NORMAL
from integrations.resilience.quota import DAY, HOUR, QuotaUsage
from integrations.figures import call_figures
from integrations.schedules import install_schedules

STATS_WINDOW_MINUTES = 60
SHARED, RECORDED, CALL_STATS, PROCESS = "shared", "recorded", "call_stats", "process"
COLUMNS = ("NAME", "KIND", "BREAKER", "QUOTA", "SUCCESS 1h", "P95 1h", "CACHE HITS", "IN FLIGHT")


# -- status: one document, rendered as a table or JSON ---------------------------------------

def shared_state(engine) -> bool:
    """Whether breakers and quotas live in Redis for the whole fleet (else each process has its own)."""
    from integrations.resilience.redis_store import RedisStore

    return isinstance(engine.store, RedisStore)


def call_statistics(integrations: list[Integration], now: datetime) -> dict | None:
    """Per integration id: the last hour's call statistics and this hour's and today's attempts.

    None when no call figures source is installed (the monitoring app keeps them).
    """
    figures = call_figures()
    if figures is None:
        return None
    hour_start = now.replace(minute=0, second=0, microsecond=0)
    day_start = hour_start.replace(hour=0)
    ids = [integration.pk for integration in integrations]
    return {"window": figures.window(ids, STATS_WINDOW_MINUTES), "used": figures.attempts(ids, hour_start, day_start),
            "hour_resets_at": int(hour_start.timestamp()) + HOUR, "day_resets_at": int(day_start.timestamp()) + DAY}


def breaker_view(integration: Integration, live: bool) -> dict:
    """The breaker as the engine holds it (``live``: shared state, or this process's), else as last recorded.

    ``effective_state`` is what callers meet: a forced mode overrides the breaker's own state.
    """
    if live:
        snapshot = integration.breaker_snapshot()
        changed = snapshot.changed_at
        changed_at = datetime.fromtimestamp(changed, tz=dt_timezone.utc).isoformat() if changed else None
    else:
        try:
            recorded = integration.breaker_state
        except BreakerState.DoesNotExist:
            recorded = BreakerState(state=CLOSED)
        snapshot = SimpleNamespace(state=recorded.state)
        changed_at = recorded.changed_at.isoformat() if recorded.changed_at else None
    return {"state": snapshot.state, "mode": integration.mode, "changed_at": changed_at,
            "effective_state": integration.effective_breaker_state(snapshot)}


def quota_view(integration: Integration, live: bool, stats: dict | None) -> QuotaUsage:
    if live or stats is None:
        return integration.quota_usage()
    used = stats["used"].get(integration.pk, {})
    return QuotaUsage(integration.name, used.get("hour") or 0, integration.hourly_limit, used.get("day") or 0,
                      integration.daily_limit, stats["hour_resets_at"], stats["day_resets_at"])


def integration_status(integration: Integration, engine, live: bool, stats: dict | None) -> dict:
    quota = quota_view(integration, live, stats).as_dict()
    quota.pop("integration")
    window = stats["window"].get(integration.pk) if stats is not None else None
    if stats is not None:
        calls = window["calls"] if window else 0
        hits, misses = (window["cache_hits"], window["cache_misses"]) if window else (0, 0)
        success_rate = window["successes"] / calls if calls else None
        p95 = window["latency_p95_ms"] if window else None
    else:
        calls = success_rate = p95 = None
        process_cache = engine.cache_stats(integration.name)
        hits, misses = process_cache["hits"], process_cache["misses"]
    return {
        "name": integration.name,
        "kind": integration.kind,
        "breaker": breaker_view(integration, live),
        "quota": quota,
        "calls": calls,
        "success_rate": success_rate,
        "p95_ms": p95,
        "cache": {"hits": hits, "misses": misses, "hit_ratio": hits / (hits + misses) if hits + misses else None},
        "in_flight": engine.in_flight(integration.name),
    }


def collect_status(names=None, now: datetime | None = None, *, process_state: bool = False) -> dict:
    """The status document of every integration (or of ``names``), as ``status --json`` prints it.

    ``process_state``: breakers and quotas as this process's engine holds
    them, for a process that makes the calls itself (the demo); otherwise
    they are the shared state, or without Redis the recorded breaker
    transitions and the quota use in the call statistics.
    """
    now = now or timezone.now()
    engine = get_engine()
    shared = shared_state(engine)
    live = shared or process_state
    rows = Integration.objects.select_related("breaker_state").order_by("name")
    if names is not None:
        rows = rows.filter(name__in=names)
    rows = list(rows)
    stats = call_statistics(rows, now)
    return {
        "generated_at": now.isoformat(),
        "sources": {
            "breaker": SHARED if shared else PROCESS if live else RECORDED,
            "quota": SHARED if shared else PROCESS if live or stats is None else CALL_STATS,
            "statistics": CALL_STATS if stats is not None else None,
            "in_flight": PROCESS,
        },
        "stats_window_minutes": STATS_WINDOW_MINUTES,
        "integrations": [integration_status(row, engine, live, stats) for row in rows],
    }


def dumps(document: dict) -> str:
    return json.dumps(document, indent=2, sort_keys=True)


def percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.1f}%"


def breaker_text(breaker: dict) -> str:
    return breaker["state"] if breaker["mode"] == MODE_NORMAL else f"{breaker['state']} ({breaker['mode']})"


def quota_text(quota: dict) -> str:
    parts = [f"{quota[window]['used']}/{quota[window]['limit']} {label}"
             for window, label in (("hourly", "per hour"), ("daily", "per day")) if quota[window]["limit"]]
    return f"{', '.join(parts)} {quota['level']}" if parts else "-"


def table_row(row: dict) -> tuple[str, ...]:
    p95 = row["p95_ms"]
    return (row["name"], row["kind"], breaker_text(row["breaker"]), quota_text(row["quota"]),
            percent(row["success_rate"]), "-" if p95 is None else f"{p95:.0f} ms",
            percent(row["cache"]["hit_ratio"]), str(row["in_flight"]))


SOURCE_NOTES = {
    ("breaker", SHARED): "Breakers and quotas: the fleet's shared state (Redis).",
    ("breaker", RECORDED): ("Breakers: the last transition recorded by any process (no REDIS_URL: each "
                            "process has its own breakers)."),
    ("quota", CALL_STATS): "Quotas: attempts this hour and today, from the call statistics.",
    ("breaker", PROCESS): "Breakers: this process's.",
    ("quota", PROCESS): "Quotas: this process's counters.",
    ("statistics", CALL_STATS): f"Success rate, p95 and cache hits: the last {STATS_WINDOW_MINUTES} minutes of "
                                f"call statistics (written by each process every few seconds).",
    ("statistics", None): "No call statistics: the monitoring app is not installed.",
    ("in_flight", PROCESS): "In flight: this process's calls.",
}


# -- breaker: operator actions --------------------------------------------------------------

def operator_name() -> str:
    """Who runs the command, as recorded in BreakerEvent.by."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return f"cli:uid-{os.getuid()}"


def find_integration(name: str) -> Integration:
    integration = Integration.objects.filter(name=name).first()
    if integration is not None:
        return integration
    names = list(Integration.objects.values_list("name", flat=True))
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        hint = f" Did you mean: {', '.join(close)}?"
    elif names:
        hint = " `manage.py resilience status` lists them."
    else:
        hint = " There are no integrations yet."
    raise CommandError(f'Unknown integration "{name}".{hint}')


class Command(BaseCommand):
    help = "Operate the resilience layer: status, breaker {reset,open,close} NAME, schedules."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="{status,breaker,schedules}")
        status = sub.add_parser("status", help="Every integration's breaker, quota, success rate, p95 and cache.")
        status.add_argument("--json", action="store_true", help="Print the status as a JSON document.")
        breaker = sub.add_parser("breaker", help="Reset, force open or force close one integration's breaker.")
        breaker.add_argument("action", choices=tuple(BREAKER_ACTIONS),
                             help="reset: normal mode, closed; open: forced open; close: forced closed.")
        breaker.add_argument("name", metavar="NAME", help="The integration's name.")
        sub.add_parser("schedules", help="Install every django-q schedule of the product (idempotent).")

    def handle(self, *args, subcommand, **options):
        return getattr(self, f"handle_{subcommand}")(**options)

    def handle_status(self, **options):
        document = collect_status()
        if options["json"]:
            self.stdout.write(dumps(document))
            return
        rows = document["integrations"]
        if not rows:
            self.stdout.write("No integrations. Add them in the admin, or with "
                              "`manage.py integrations import FILE`.")
            return
        cells = [COLUMNS, *(table_row(row) for row in rows)]
        widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
        colours = {CLOSED: self.style.SUCCESS, OPEN: self.style.ERROR}
        for index, line in enumerate(cells):
            padded = [cell.ljust(width) for cell, width in zip(line, widths)]
            if index:
                colour = colours.get(rows[index - 1]["breaker"]["effective_state"], self.style.WARNING)
                padded[2] = colour(padded[2])
            self.stdout.write("  ".join(padded).rstrip())
        self.stdout.write("")
        for key, value in document["sources"].items():
            note = SOURCE_NOTES.get((key, value))
            if note and not (key == "quota" and value == SHARED):  # one line says it for both
                self.stdout.write(note)

    def handle_breaker(self, action, name, **options):
        integration = find_integration(name)
        shared = shared_state(get_engine())
        operator = operator_name()
        integration.operate_breaker(action, operator)
        integration.refresh_from_db()
        after = breaker_view(integration, shared)
        self.stdout.write(f"{integration.name}: breaker {after['state']}, mode {after['mode']} "
                          f"({BREAKER_ACTIONS[action]} by {operator})")
        if action == "reset" and not shared:
            self.stderr.write(self.style.WARNING(
                "No shared state (REDIS_URL is unset): each process has its own breaker. The mode is back to "
                "normal everywhere within RESILIENCE_POLICY_REFRESH_S seconds; a breaker another process opened "
                "closes after its own reset timeout and trial calls."))

    def handle_schedules(self, **options):
        installed = install_schedules()
        if not installed:
            self.stdout.write("No schedules are registered.")
        for spec, created in installed:
            verb = "installed" if created else "updated"
            self.stdout.write(f"{verb} {spec.name}: {spec.func} every {spec.minutes} min")

"""One watchdog run over 1,000 integrations with a day of call statistics; and the stats subscriber's cost.

    .venv/bin/python benchmarks/bench_watchdog.py [--integrations N] [--runs N] [--json FILE] [--user-rules N]
    DATABASE_URL=postgres://... .venv/bin/python benchmarks/bench_watchdog.py

Steps:
1. create a throw-away test database (Django's test database machinery; a
   file for SQLite, so the figure is not an in-memory one) and migrate it;
2. create N integrations (default 1,000), each with one CallStats row per
   minute for the last 24 hours (1,440,000 rows by default), written minute
   by minute as the flushes write them, and a daily quota (so the run also
   sums today's attempts of every integration). Most are healthy;
   every 20th has an error spike, every 25th slow calls, every 30th a traffic
   spike, every 40th is served by fallbacks, every 50th is near its hourly
   quota and every 60th has had its breaker open for 20 minutes;
3. time ``monitoring.watchdog.run(now)``: the first run raises every alert
   and sums the day's earlier hours, the later ones (``--runs``, default 5)
   find the same conditions and count occurrences (the steady state, every
   minute). Target: < 1 s per run, the first included;
4. time the CallFinished subscriber (``StatsBuffer.record``) per call, for a
   success, a failure served by a fallback and a refusal (best of 5 loops of
   200,000 calls);
5. destroy the test database.

``--user-rules N`` also registers N user-defined rules (monitoring/rules.py) whose metrics give every
integration a value, one in ten past a level: the rules' own cost at this scale.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "resilience_site.settings")
os.environ["RESILIENCE_STATS_FLUSH_S"] = "0"  # nothing but the benchmark writes statistics

import django  # noqa: E402

django.setup()

from django.db import connection, transaction  # noqa: E402

from integrations.models import BreakerState, Integration  # noqa: E402
from integrations.resilience.events import CallFinished  # noqa: E402
from monitoring import watchdog  # noqa: E402
from monitoring.counters import COUNTER_COLUMNS, StatsBuffer  # noqa: E402
from monitoring.models import Alert, CallStats  # noqa: E402

NOW = datetime(2026, 1, 5, 12, 30, tzinfo=timezone.utc)
MINUTES = 24 * 60
TARGET_S = 1.0
SUBSCRIBER_CALLS = 200_000


def profile(index: int) -> str:
    for every, name in ((60, "breaker_open"), (50, "quota"), (40, "degraded"), (30, "traffic_spike"),
                        (25, "slow"), (20, "error_spike")):
        if index % every == 0:
            return name
    return "healthy"


def counters(kind: str, ago: int) -> dict:
    """One minute of one integration's traffic, by profile."""
    row = {"calls": 20, "successes": 20, "attempts": 20, "latency_le_100": 15, "latency_le_250": 5,
           "latency_sum_ms": 20 * 90.0}
    if kind == "error_spike" and ago < 60:
        row.update(successes=10, failures_server_error=8, failures_timeout=2, attempts=30, retries=10)
    elif kind == "slow":
        row.update(latency_le_100=2, latency_le_250=3, latency_le_10000=15, latency_sum_ms=20 * 6_000.0)
    elif kind == "traffic_spike" and ago < 5:
        row.update(calls=200, successes=200, attempts=200, latency_le_100=150, latency_le_250=50)
    elif kind == "degraded":
        row.update(successes=5, rejected_open=15, fallback_cache=10, fallback_value=5, attempts=5,
                   latency_le_100=5, latency_le_250=0)
    return row


def populate(count: int) -> None:
    created = Integration.objects.bulk_create(
        Integration(name=f"svc-{i:04d}", slow_call_ms=1_000, daily_limit=1_000_000,
                    hourly_limit=1_000 if profile(i) == "quota" else None) for i in range(count))
    columns = ["integration_id", "minute", *COUNTER_COLUMNS, "latency_sum_ms"]
    minute_field = CallStats._meta.get_field("minute")
    minutes = [(ago, minute_field.get_db_prep_value((NOW - timedelta(minutes=ago)).replace(second=0), connection))
               for ago in range(MINUTES)]
    qn = connection.ops.quote_name
    sql = (f"INSERT INTO {qn(CallStats._meta.db_table)} ({', '.join(qn(c) for c in columns)}) "
           f"VALUES ({', '.join(['%s'] * len(columns))})")
    started = time.perf_counter()
    # Minute by minute, every integration in each: the order the flushes write them in.
    with transaction.atomic(), connection.cursor() as cursor:  # one commit, not one per row
        for ago, minute in reversed(minutes):
            rows = []
            for i, integration in enumerate(created):
                kind = profile(i)
                row = counters(kind, ago)
                if kind == "quota" and ago <= 30:
                    row["attempts"] = 31  # 31 minutes of this hour x 31 = 961: 96 % of 1,000
                rows.append([integration.pk, minute, *(row.get(c, 0) for c in COUNTER_COLUMNS),
                             row["latency_sum_ms"]])
            cursor.executemany(sql, rows)
    BreakerState.objects.bulk_create(
        BreakerState(integration=integration, state="open", opened_at=NOW - timedelta(minutes=20))
        for i, integration in enumerate(created) if profile(i) == "breaker_open")
    print(f"populated {count} integrations x {MINUTES} minutes = {count * MINUTES:,} rows "
          f"in {time.perf_counter() - started:.0f} s")


def register_user_rules(count: int, integrations: int) -> None:
    """N rules whose metrics give each integration a value (its number modulo 100): the cost of the
    rules' own machinery (names to integrations, findings, their alerts), not of a user's query."""
    from monitoring.rules import register_metric, register_rule

    values = {f"svc-{i:04d}": i % 100 for i in range(integrations)}
    for n in range(count):
        register_metric(f"bench_metric_{n}", lambda now: values, unit="%")
        register_rule(f"bench_rule_{n}", metric=f"bench_metric_{n}", warning=89.5, critical=94.5)


def time_runs(runs: int) -> list[float]:
    durations = []
    for n in range(1 + runs):
        started = time.perf_counter()
        report = watchdog.run(now=NOW + timedelta(seconds=n))
        durations.append(time.perf_counter() - started)
        changes = {change: len(ids) for change, ids in report["changes"].items()}
        print(f"run {n + 1}: {durations[-1]:.3f} s  status={report['status']} critical={len(report['critical'])} "
              f"warnings={len(report['warnings'])} changes={changes}")
    return durations


def time_subscriber() -> dict[str, float]:
    at = NOW.timestamp()
    events = {
        "success": CallFinished("svc-0001", True, "live", None, 1, 0, 42.0, (42.0,), None, None, at),
        "failure served by a fallback": CallFinished("svc-0001", True, "fallback", "timeout", 3, 2, 900.0,
                                                     (300.0, 300.0, 300.0), "value", "miss", at),
        "refusal (breaker open)": CallFinished("svc-0001", False, "live", "circuit_open", 0, 0, 0.0, (), None,
                                               None, at),
    }
    figures = {}
    for name, event in events.items():
        buffer = StatsBuffer()
        record = buffer.record
        best = float("inf")
        for _ in range(5):
            gc.collect()
            gc.disable()
            started = time.perf_counter_ns()
            for _ in range(SUBSCRIBER_CALLS):
                record(event)
            best = min(best, (time.perf_counter_ns() - started) / SUBSCRIBER_CALLS / 1000)
            gc.enable()
        figures[name] = best
        print(f"subscriber, {name}: {best:.3f} us/call")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--integrations", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=5, help="steady-state runs after the first")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--user-rules", type=int, default=0, metavar="N",
                        help="also register N user-defined rules (monitoring/rules.py), each on a metric giving "
                             "every integration a value; one integration in ten past a level")
    options = parser.parse_args()
    if options.user_rules:
        register_user_rules(options.user_rules, options.integrations)

    with tempfile.TemporaryDirectory() as scratch:
        if connection.vendor == "sqlite":
            connection.settings_dict.setdefault("TEST", {})["NAME"] = str(Path(scratch) / "bench.sqlite3")
        old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
        try:
            populate(options.integrations)
            durations = time_runs(options.runs)
            active = Alert.objects.active().count()
        finally:
            connection.creation.destroy_test_db(old_name, verbosity=0)
    subscriber = time_subscriber()

    first, steady = durations[0], durations[1:]
    median = statistics.median(steady) if steady else first
    print(f"\n{connection.vendor}: first run {first:.3f} s, steady-state median {median:.3f} s, "
          f"{active} active alerts; target < {TARGET_S} s -> "
          f"{'PASS' if max(durations) < TARGET_S else 'FAIL'}")
    if options.json:
        Path(options.json).write_text(json.dumps({
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpu_count": os.cpu_count()},
            "database": connection.vendor, "integrations": options.integrations, "minutes": MINUTES,
            "user_rules": options.user_rules,
            "run_seconds": durations, "first_s": first, "steady_median_s": median, "active_alerts": active,
            "subscriber_us_per_call": subscriber, "target_s": TARGET_S,
        }, indent=2))


if __name__ == "__main__":
    main()

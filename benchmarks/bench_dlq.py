"""Redrive throughput of the dead letter queue: due entries with a no-op handler, on PostgreSQL.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test .venv/bin/python benchmarks/bench_dlq.py \
        [--entries 20000] [--processes 1 2] [--batch-size 100] [--repeats 3] [--json FILE]

Method: a scratch database bench_dlq_<pid> is created next to DATABASE_URL's
(Django's test database machinery: migrated, then dropped at the end), with one integration
"bench" (the external_api preset: thread-enforced timeouts, breaker, quota
and bulkhead on; no rate cap). For each row, N entries are bulk-inserted, all
due, with the handler ``bench.noop`` (returns None); then P processes start
together at a barrier, each running ``Redriver.run()`` (the scheduled task's
code: health gate, claim with FOR UPDATE SKIP LOCKED, execute() through the
pipeline, outcomes stored under the claim) until the queue is drained. The
time is from the barrier to the last process's end; entries/min =
N / time x 60. Each row is repeated and the best repeat kept. Process
start-up and Django setup are outside the timing; inserting the entries is too.

Target: >= 60,000 entries a minute with one process (issue 14).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "resilience_site.settings")

import django  # noqa: E402

django.setup()

from django.db import connection, connections  # noqa: E402
from django.utils import timezone  # noqa: E402

from integrations.dlq import dead_letter_handler  # noqa: E402
from integrations.dlq.models import DeadLetter  # noqa: E402
from integrations.dlq.redrive import RateCap, Redriver  # noqa: E402
from integrations.models import Integration  # noqa: E402

TARGET_PER_MIN = 60_000


@dead_letter_handler("bench.noop")
def noop(payload):
    return None


def fill(entries: int) -> None:
    DeadLetter.objects.all().delete()
    due = timezone.now() - timedelta(seconds=1)
    DeadLetter.objects.bulk_create(
        (DeadLetter(integration_name="bench", handler_name="bench.noop", payload={"order": n}, max_redrives=5,
                    next_attempt_at=due) for n in range(entries)),
        batch_size=2000)


def drain(database: str, batch_size: int, barrier, results) -> None:
    """One redrive process: set up, wait at the barrier, drain the queue, report what it did."""
    connections.close_all()
    connections["default"].settings_dict["NAME"] = database
    redriver = Redriver.from_settings(batch_size=batch_size, rate_cap=RateCap(0, "default"))
    Integration.objects.get(name="bench")  # connect and load before the clock starts
    barrier.wait()
    report = redriver.run()
    results.put((time.perf_counter(), report.as_dict()))
    connections.close_all()


def measure(database: str, entries: int, processes: int, batch_size: int) -> dict:
    fill(entries)
    connections.close_all()
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(processes + 1)
    results = context.Queue()
    workers = [context.Process(target=drain, args=(database, batch_size, barrier, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.perf_counter()
    finished = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(60)
    elapsed = max(end for end, _ in finished) - started
    succeeded = sum(report["succeeded"] for _, report in finished)
    left = DeadLetter.objects.exclude(status="succeeded").count()
    if succeeded != entries or left:
        raise SystemExit(f"the redrive did not drain the queue: {succeeded} succeeded, {left} left")
    return {"entries": entries, "processes": processes, "batch_size": batch_size, "seconds": round(elapsed, 3),
            "per_minute": round(entries / elapsed * 60)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if connection.vendor != "postgresql":
        raise SystemExit("bench_dlq measures PostgreSQL: set DATABASE_URL=postgres://...")

    # A name of its own: a test run's database (test_<name>) is never touched.
    connection.settings_dict["TEST"]["NAME"] = f"bench_dlq_{os.getpid()}"
    database = connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    try:
        Integration.objects.create(name="bench", kind="external_api")
        rows = []
        for processes in args.processes:
            best = min((measure(database, args.entries, processes, args.batch_size) for _ in range(args.repeats)),
                       key=lambda row: row["seconds"])
            rows.append(best)
            verdict = "meets" if best["per_minute"] >= TARGET_PER_MIN else "BELOW"
            print(f"{processes} process(es), batch {best['batch_size']}: {best['entries']} entries in "
                  f"{best['seconds']:.2f} s = {best['per_minute']:,} entries/min ({verdict} the target of "
                  f"{TARGET_PER_MIN:,})")
    finally:
        connections.close_all()
        connection.creation.destroy_test_db(database, verbosity=0)
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "dlq redrive throughput", "target_per_minute": TARGET_PER_MIN, "rows": rows,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        }, indent=2))


if __name__ == "__main__":
    main()

"""Chaos: the django-q2 cluster's workers are SIGKILLed mid-redrive of 200 dead letters.

200 due entries of one integration, each with its own idempotency key; the
handler (tests/chaos/chaos_handlers.py) records every run in ``chaos_run``
and applies its effect as a row of ``chaos_effect``, whose primary key is the
idempotency key, after sleeping 20 ms. A ``manage.py qcluster`` (two workers,
a queue of its own) is given two redrive tasks at once, so both workers
redrive concurrently in batches of 20. Once a quarter of the entries have
run, every worker process that has run the handler is SIGKILLed; the cluster
is then stopped and a new one started, and redrives are queued until every
entry has succeeded.

Asserted: every entry succeeded (nothing lost); each effect applied exactly
once; an entry run more than once was first run by a killed worker (whose
claim lapsed: its history says lease_expired), and its next run started only
after the kill (never two runs of one entry at once).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

import chaos_handlers
from chaos_support import ROOT, child_env, record, stop_group, wait_until
from dlq_support import database_url
from integrations.dlq.models import DeadLetter
from integrations.models import Integration

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(150), pytest.mark.django_db(transaction=True)]

ENTRIES = 200
HANDLER_SLEEP_S = 0.02
KILL_AFTER_RUNS = ENTRIES // 4
DRAIN_WITHIN_S = 60


class Cluster:
    """``manage.py qcluster`` in its own process group, on a queue of its own."""

    def __init__(self, log, queue: str) -> None:
        self.queue = queue
        self.log = log
        env = child_env(
            DATABASE_URL=database_url(), Q_CLUSTER_NAME=queue, RESILIENCE_DLQ_HANDLER_MODULES="chaos_handlers",
            RESILIENCE_DLQ_LEASE_S=1, RESILIENCE_DLQ_BATCH_SIZE=20, RESILIENCE_DLQ_RATE_PER_MINUTE=0,
            RESILIENCE_DLQ_BACKOFF_BASE_MS=100, RESILIENCE_DLQ_BACKOFF_MAX_MS=400, RESILIENCE_STATS_FLUSH_S=0)
        with open(log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=ROOT, env=env,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def queue_redrive(self) -> None:
        from django_q.tasks import async_task

        async_task("integrations.dlq.tasks.redrive", cluster=self.queue)

    def stop(self) -> None:
        stop_group(self.process, grace_s=3)


@pytest.fixture
def effect_tables():
    chaos_handlers.create_tables()
    yield
    chaos_handlers.drop_tables()


@pytest.fixture
def clusters(tmp_path):
    started = []
    queue = f"chaos-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def start() -> Cluster:
        started.append(Cluster(tmp_path / "qcluster.log", queue))
        return started[-1]

    yield start
    for cluster in started:
        cluster.stop()


def runs() -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT entry_id, attempt, pid, started_at, ended_at, applied FROM chaos_run "
                       "ORDER BY started_at")
        return cursor.fetchall()


def effects() -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT idem_key, entry_id FROM chaos_effect")
        return cursor.fetchall()


@pytest.mark.parametrize("max_redrives", [
    10,
    1,  # an entry killed before its handler started must not be charged (it would die unrun)
])
def test_workers_killed_mid_redrive_lose_nothing_and_apply_each_effect_once(effect_tables, clusters, max_redrives):
    Integration.objects.create(name="chaos-redrive", max_retries=0, attempt_timeout_ms=1000, timeout_ms=1000,
                               timeout_enforcement="inline")
    due = timezone.now() - timedelta(seconds=1)
    DeadLetter.objects.bulk_create(
        DeadLetter(integration_name="chaos-redrive", handler_name="chaos.effect", payload={"sleep_s": HANDLER_SLEEP_S},
                   idempotency_key=f"chaos-effect-{n}", max_redrives=max_redrives, next_attempt_at=due)
        for n in range(ENTRIES))

    cluster = clusters()
    started = time.monotonic()
    cluster.queue_redrive()
    cluster.queue_redrive()  # two runs at once: both workers redrive concurrently
    wait_until(lambda: len(runs()) >= KILL_AFTER_RUNS, "the workers run a quarter of the entries", timeout_s=60,
               interval_s=0.01, log=cluster.log)
    victims = sorted({pid for _, _, pid, *_ in runs()})
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    runs_before_kill = len(runs())
    cluster.stop()  # the sentinel may have replaced them; this cluster goes, a new one comes
    cluster = clusters()
    restarted = time.monotonic()

    def drained():
        if not DeadLetter.objects.filter(status__in=("pending", "retrying")).exists():
            return True
        cluster.queue_redrive()  # the killed runs' claims lapse after their lease (6 s): a later run takes them
        time.sleep(1.0)
        return False

    wait_until(drained, "no entry is left waiting after the restart", timeout_s=DRAIN_WITHIN_S, interval_s=0,
               log=cluster.log)
    drained_at = time.monotonic()

    entries = {entry.pk: entry for entry in DeadLetter.objects.all()}
    all_runs = runs()
    per_entry = collections.defaultdict(list)
    for run in all_runs:
        per_entry[run[0]].append(run)
    applied = effects()
    rerun = {pk: entry_runs for pk, entry_runs in per_entry.items() if len(entry_runs) > 1}
    lapsed = [entry for entry in entries.values()
              if any(step.get("error", {}).get("code") == "lease_expired" for step in entry.history)]
    never_run = [entry for entry in entries.values() if entry.status != "succeeded" and entry.pk not in per_entry]
    record(
        "worker_kill" if max_redrives > 1 else f"worker_kill_max_redrives_{max_redrives}",
        command="DATABASE_URL=postgres://postgres@127.0.0.1:5432/chaos .venv/bin/python -m pytest "
                "tests/chaos/test_worker_kill.py",
        database=connection.vendor,
        load=f"{ENTRIES} due dead letters (max_redrives {max_redrives}), handler {HANDLER_SLEEP_S * 1000:.0f} ms, "
             f"2 cluster workers redriving concurrently in batches of 20",
        faults=f"SIGKILL of {len(victims)} worker process(es) after {runs_before_kill} handler runs, then the "
               f"cluster stopped and a new one started",
        entries=ENTRIES,
        processes=2,
        workers_killed=len(victims),
        handler_runs=len(all_runs),
        entries_run_more_than_once=len(rerun),
        entries_counting_a_lapsed_run=len(lapsed),
        effects_applied=len(applied),
        effects_applied_twice=len(applied) - len({key for key, _ in applied}),
        succeeded=sum(entry.status == "succeeded" for entry in entries.values()),
        dead=sum(entry.status == "dead" for entry in entries.values()),
        dead_without_ever_running=len(never_run),
        requests_failed=sum(entry.status != "succeeded" for entry in entries.values()),
        data_lost=ENTRIES - len({key for key, _ in applied}),
        drained_after_restart_s=round(drained_at - restarted, 1),
        total_s=round(drained_at - started, 1),
    )

    assert len(victims) >= 1
    assert never_run == [], f"{len(never_run)} entries dead without their handler ever running"
    assert all(entry.status == "succeeded" for entry in entries.values())  # nothing lost
    assert sorted(key for key, _ in applied) == sorted(entry.idempotency_key for entry in entries.values())
    assert len(applied) == ENTRIES  # each effect exactly once
    assert set(per_entry) == set(entries)  # every entry's handler ran
    for pk, entry_runs in rerun.items():
        first, *later = entry_runs
        assert first[2] in victims, f"entry {pk} ran twice without its worker being killed: {entry_runs}"
        for run in later:
            assert run[3] >= killed_at, f"entry {pk} ran again before its first run was killed: {entry_runs}"
        assert entries[pk] in lapsed  # the killed run was counted, as lease_expired
        assert sum(run[5] or 0 for run in entry_runs) <= 1

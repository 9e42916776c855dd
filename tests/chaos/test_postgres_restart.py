"""Chaos: PostgreSQL restarted, then stopped for a while, while processes leave dead letters.

A PostgreSQL cluster of the test's own (initdb in a temporary directory, its
own port: the machine's main cluster is never touched) is migrated, and three
processes (tests/chaos/chaos_enqueuer.py, each its own Django) make failing
guarded calls to a local upstream with ``dead_letter=DeadLetter(...)``, each
with an idempotency key of its own. Mid-run the cluster is restarted
(``pg_ctl restart -m fast``: every connection terminated), then stopped
(``-m fast``) and started again after a while.

What "enqueued" means: a call that finally fails hands its dead letter to the
queue's subscriber, in the caller's thread, after the call. The caller is told
nothing more (``execute`` returns the failure; the Client raises it). The
subscriber stores the row; if the database cannot be reached it tries once
more on a fresh connection, then spools the entry to local disk
(integrations/dlq/spool.py), and the process stores its spool by itself after
its next dead letter is stored. Last, ``manage.py dlq replay`` runs, as the
scheduled redrive would, for anything still spooled.

Asserted: with no step by hand, the table holds exactly one row per failed
call (by idempotency key), and no other row: nothing lost, nothing doubled;
nothing was only logged for recovery by hand. Measured: calls, rows stored at
once, entries spooled and replayed, how long writes took to resume after each
fault.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import psycopg
import pytest

from chaos_enqueuer import logged_entries, replayed_count, spooled_entries
from chaos_support import CHAOS_DIR, ROOT, OwnPostgres, child_env, record, stop_group, wait_until
from chaos_support import upstream  # noqa: F401 - a fixture

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(150)]

PROCESSES = 3
LOAD_S = 1.5  # load before the restart, between the faults, and after the last one
DOWN_S = 2.0  # how long PostgreSQL stays stopped in the second fault


@pytest.fixture
def own_postgres():
    server = OwnPostgres()
    try:
        server.init()
        server.start()
        server.create_database("chaos_dlq")
        yield server
    finally:
        server.destroy()


def rows(server: OwnPostgres) -> list[tuple[str, float]]:
    with psycopg.connect(server.url("chaos_dlq")) as conn:
        return conn.execute(
            "SELECT idempotency_key, extract(epoch FROM created_at)::float8 FROM dlq_deadletter").fetchall()


def test_every_dead_letter_left_while_postgres_restarts_is_stored_with_no_step_by_hand(own_postgres, upstream,
                                                                                     tmp_path):
    env = child_env(DATABASE_URL=own_postgres.url("chaos_dlq"), RESILIENCE_DLQ_HANDLER_MODULES="chaos_handlers",
                    LOG_LEVEL="WARNING", RESILIENCE_DLQ_SPOOL_DIR=str(tmp_path / "spool"))
    migrated = subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert migrated.returncode == 0, migrated.stderr[-3000:]

    go, stop = tmp_path / "go", tmp_path / "stop"
    processes, logs, outs = [], [], []
    try:
        for n in range(PROCESSES):
            logs.append(tmp_path / f"enqueuer-{n}.log")
            outs.append(tmp_path / f"calls-{n}.txt")
            with open(logs[-1], "wb") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, str(CHAOS_DIR / "chaos_enqueuer.py")], cwd=ROOT, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                    env={**env, "CHAOS_WORKER": str(n), "CHAOS_UPSTREAM": upstream.url,
                         "CHAOS_READY": str(tmp_path / f"ready-{n}"), "CHAOS_GO": str(go), "CHAOS_STOP": str(stop),
                         "CHAOS_OUT": str(outs[-1])}))
        wait_until(lambda: all((tmp_path / f"ready-{n}").exists() for n in range(PROCESSES)),
                   "the enqueuers are ready", timeout_s=60, log=logs[0])
        go.write_text("go")
        started = time.monotonic()
        time.sleep(LOAD_S)
        restart_began = time.time()
        own_postgres.restart()
        restarted_at = time.time()
        restart_took = restarted_at - restart_began
        time.sleep(LOAD_S)
        stopped_at = time.time()
        own_postgres.stop("fast")
        time.sleep(DOWN_S)
        own_postgres.start()
        back_at = time.time()
        time.sleep(LOAD_S)
        stop.write_text("stop")
        for process in processes:
            process.wait(30)
        ended = time.monotonic()
    finally:
        stop.write_text("stop")
        for process in processes:
            stop_group(process)

    assert [p.returncode for p in processes] == [0] * PROCESSES, [log.read_text()[-2000:] for log in logs]
    calls = [line.split() for out in outs for line in out.read_text().splitlines()]
    failed_keys = [key for key, _, outcome in calls if outcome != "ok"]
    raised = [outcome for _, _, outcome in calls if outcome.startswith("raised:")]
    stored = dict(rows(own_postgres))
    logged = logged_entries(*logs)
    logged_keys = [entry["idempotency_key"] for entry in logged]
    spooled_keys = spooled_entries(*logs)
    replayed_by_processes = replayed_count(*logs)

    replay = subprocess.run([sys.executable, "manage.py", "dlq", "replay"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert replay.returncode == 0, replay.stderr[-3000:]
    replayed_by_command = int(re.search(r"(\d+) stored", replay.stdout).group(1))
    after = [key for key, _ in rows(own_postgres)]
    stored_after_the_run = set(failed_keys) & set(after)

    def logged_between(start, end):
        """Entries spooled among the calls that started in [start, end)."""
        return sum(start <= float(at) < end for key, at, _ in calls if key in spooled_set)

    spooled_set = set(spooled_keys)

    def resumed_after(moment):
        """Seconds from ``moment`` until the first row stored after it."""
        later = [created for created in stored.values() if created >= moment]
        return round(min(later) - moment, 3) if later else None

    duration = ended - started
    record(
        "postgres_restart",
        command="DATABASE_URL=postgres://postgres@127.0.0.1:5432/chaos .venv/bin/python -m pytest "
                "tests/chaos/test_postgres_restart.py",
        load=f"{PROCESSES} processes, {len(calls) / duration:.0f} failing guarded calls/s with a dead letter "
             f"for {duration:.1f} s",
        faults=f"own PostgreSQL: pg_ctl restart -m fast ({restart_took:.2f} s), then stop -m fast, down "
               f"{DOWN_S} s, start",
        processes=PROCESSES,
        calls=len(calls),
        calls_per_s=round(len(calls) / duration, 1),
        requests_failed=len(failed_keys),
        requests_failed_note="every call fails by design (the upstream answers 503): each leaves a dead letter",
        exceptions_other_than_resilience_error=len(raised),
        dead_letters_requested=len(failed_keys),
        stored_at_once=len(set(failed_keys) - set(spooled_keys)),
        spooled=len(spooled_keys),
        # by when the call started: its dead letter is written a few ms later, after the call
        spooled_by_call_start={
            "before_the_restart": logged_between(0, restart_began),
            "during_the_restart": logged_between(restart_began, restarted_at),
            "after_the_restart": logged_between(restarted_at, stopped_at),
            "while_stopped": logged_between(stopped_at, back_at),
            "after_the_start": logged_between(back_at, float("inf")),
        },
        replayed_by_the_processes=replayed_by_processes,
        replayed_by_dlq_replay=replayed_by_command,
        logged_for_recovery_by_hand=len(logged_keys),
        writes_resumed_after_restart_s=resumed_after(restarted_at),
        writes_resumed_after_start_s=resumed_after(back_at),
        rows_after=len(after),
        data_lost=len(set(failed_keys) - set(after)),
        duplicated=len(after) - len(set(after)),
    )

    assert raised == []
    assert len(failed_keys) > 100
    assert spooled_keys, "the faults made no write fail: the scenario did not test anything"
    assert logged_keys == []  # nothing left to recover by hand
    assert len(set(spooled_keys)) == len(spooled_keys)  # each entry spooled once
    assert replayed_by_processes + replayed_by_command == len(set(spooled_keys))
    assert stored_after_the_run == set(failed_keys)
    assert sorted(after) == sorted(failed_keys)  # nothing lost, nothing doubled, nothing else

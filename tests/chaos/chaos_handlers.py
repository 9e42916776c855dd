"""The dead letter handler of the chaos scenarios, registered in every process they start.

Processes import this module through RESILIENCE_DLQ_HANDLER_MODULES. The
handler's effect is a row in the table ``chaos_effect``, whose primary key is
the entry's idempotency key, so an effect is applied at most once whatever
happens; every run of the handler is a row in ``chaos_run`` (started, ended,
whether it applied the effect), so a test can tell how often, by whom and
when each entry was run. ``create_tables`` makes both in the test database.
"""

from __future__ import annotations

import os
import time

from django.db import connection

from integrations.dlq import dead_letter_handler

TABLES = {
    "chaos_effect": "CREATE TABLE chaos_effect (idem_key VARCHAR(255) PRIMARY KEY, entry_id BIGINT NOT NULL, "
                    "pid INTEGER NOT NULL, applied_at DOUBLE PRECISION NOT NULL)",
    "chaos_run": "CREATE TABLE chaos_run (entry_id BIGINT NOT NULL, attempt INTEGER NOT NULL, pid INTEGER NOT NULL, "
                 "started_at DOUBLE PRECISION NOT NULL, ended_at DOUBLE PRECISION, applied INTEGER)",
}


def create_tables() -> None:
    with connection.cursor() as cursor:
        for name, ddl in TABLES.items():
            cursor.execute(f"DROP TABLE IF EXISTS {name}")
            cursor.execute(ddl)


def drop_tables() -> None:
    with connection.cursor() as cursor:
        for name in TABLES:
            cursor.execute(f"DROP TABLE IF EXISTS {name}")


@dead_letter_handler("chaos.effect", takes_context=True)
def apply_effect(payload, context):
    """Record the run, sleep ``payload["sleep_s"]``, then apply the effect once per idempotency key."""
    pid, started = os.getpid(), time.time()
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO chaos_run (entry_id, attempt, pid, started_at) VALUES (%s, %s, %s, %s)",
                       [context.entry_id, context.attempt, pid, started])
    time.sleep(payload.get("sleep_s", 0))
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO chaos_effect (idem_key, entry_id, pid, applied_at) VALUES (%s, %s, %s, %s) "
                       "ON CONFLICT (idem_key) DO NOTHING", [context.idempotency_key, context.entry_id, pid,
                                                               time.time()])
        applied = cursor.rowcount
        cursor.execute("UPDATE chaos_run SET ended_at = %s, applied = %s WHERE entry_id = %s AND pid = %s "
                       "AND started_at = %s", [time.time(), applied, context.entry_id, pid, started])
    return "applied" if applied else "already applied"

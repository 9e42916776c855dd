"""Call statistics into the database: flush, merge across processes, prune.

Each process buffers its calls in ``buffer`` (``counters.StatsBuffer``, the
CallFinished subscriber: no query on the hot path). The buffer is written:

- every ``RESILIENCE_STATS_FLUSH_S`` seconds by a daemon thread, started by
  the first call the process records (0 starts none: flush yourself);
- at interpreter exit (atexit), so a stopping worker loses nothing;
- whenever ``flush()`` is called (the watchdog does, before it reads).

A flush is one upsert per batch of (integration, minute) rows whose counters
are *added* to the stored ones (``INSERT ... ON CONFLICT DO UPDATE SET c =
c + excluded.c``), so processes and hosts flushing the same minute add up,
and the latency buckets of the whole fleet end in one row. A flush that fails
puts its rows back into the buffer for the next one.
"""

from __future__ import annotations

import atexit
import logging
import threading
from datetime import datetime, timedelta, timezone as dt_timezone

from django.db import DatabaseError, connections, transaction
from django.utils import timezone

from .counters import COUNTER_COLUMNS, LATENCY_SUM, LATENCY_SUM_COLUMN, StatsBuffer
from .conf import monitoring_settings

logger = logging.getLogger("monitoring.stats")

UPSERT_VENDORS = ("sqlite", "postgresql")


class Flusher:
    """The per-process thread that flushes a buffer every ``interval_s`` seconds."""

    def __init__(self, buffer: StatsBuffer, interval_s: float) -> None:
        self.buffer = buffer
        self.interval_s = interval_s
        # The database the calls were recorded against. A test run swaps in a test database and
        # gives the old name back when it destroys it: rows recorded then belong to no database
        # any more (flushing them would fail with "no such table", or land in the real one).
        self.database = database_name()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats-flusher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def database_gone(self) -> bool:
        if database_name() == self.database:
            return False
        dropped = len(self.buffer.drain())
        logger.debug("call statistics not flushed: database %r is gone (a finished test run); %d rows dropped",
                     self.database, dropped)
        return True

    def flush(self) -> None:
        if not self.database_gone():
            flush_quietly(self.buffer)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the flusher must outlive any one failure: the rows wait for the next
                logger.exception("call statistics flush failed (%d rows kept in memory)", self.buffer.pending())
            finally:
                connections.close_all()  # this thread's own: one flush every few seconds holds none between them


_flusher: Flusher | None = None


def start_periodic_flush(buffer: StatsBuffer) -> None:
    """``buffer.on_first_record``: flush every RESILIENCE_STATS_FLUSH_S and at exit (0: neither)."""
    global _flusher
    interval = monitoring_settings.STATS_FLUSH_S
    if interval <= 0:
        return
    _flusher = Flusher(buffer, interval)
    _flusher.start()
    atexit.register(_flush_at_exit, _flusher)


def database_name(alias: str = "default"):
    return connections[alias].settings_dict.get("NAME")


def _flush_at_exit(flusher: Flusher) -> None:
    flusher.stop()
    flusher.flush()


buffer = StatsBuffer(on_first_record=start_periodic_flush)


def flush_quietly(source: StatsBuffer) -> int:
    """``flush`` for background callers: a failure is logged (the rows wait in the buffer), never raised."""
    try:
        return flush(source)
    except DatabaseError:
        logger.exception("call statistics not flushed (%d rows kept in memory for the next flush)",
                         source.pending())
        return 0


def flush(source: StatsBuffer | None = None, using: str = "default") -> int:
    """Write the buffered counters, adding them to the stored ones; returns the rows written.

    Counters of integrations that have no row (deleted since, or never
    stored) are dropped and logged.
    """
    from integrations.models import Integration

    source = source or buffer
    rows = source.drain()
    if not rows:
        return 0
    try:
        names = {name for name, _ in rows}
        ids = dict(Integration.objects.using(using).filter(name__in=names).values_list("name", "id"))
        unknown = names - ids.keys()
        if unknown:
            logger.warning("call statistics of unknown integrations dropped: %s", ", ".join(sorted(unknown)))
        records = [(ids[name], minute, counts) for (name, minute), counts in rows.items() if name in ids]
        upsert(records, using)
    except Exception:
        source.restore(rows)
        raise
    return len(records)


def upsert(records: list[tuple[int, int, list]], using: str = "default") -> None:
    """Add (integration id, minute epoch seconds, buffer row) records to CallStats, in batches."""
    from .models import CallStats

    if not records:
        return
    connection = connections[using]
    if connection.vendor not in UPSERT_VENDORS:
        raise DatabaseError(f"call statistics need INSERT ... ON CONFLICT: supported on "
                            f"{', '.join(UPSERT_VENDORS)}, not {connection.vendor}")
    qn = connection.ops.quote_name
    table = qn(CallStats._meta.db_table)
    summed = [*COUNTER_COLUMNS, LATENCY_SUM_COLUMN]
    columns = ["integration_id", "minute", *summed]
    minute_field = CallStats._meta.get_field("minute")
    per_row = "(" + ", ".join(["%s"] * len(columns)) + ")"
    updates = ", ".join(f"{qn(c)} = {table}.{qn(c)} + excluded.{qn(c)}" for c in summed)
    max_params = connection.features.max_query_params or 30_000
    batch = max(1, min(500, max_params // len(columns)))
    with transaction.atomic(using=using), connection.cursor() as cursor:
        for start in range(0, len(records), batch):
            chunk = records[start:start + batch]
            params = []
            for integration_id, minute, counts in chunk:
                when = datetime.fromtimestamp(minute, tz=dt_timezone.utc)
                params += [integration_id, minute_field.get_db_prep_value(when, connection),
                           *counts[:LATENCY_SUM], float(counts[LATENCY_SUM])]
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(qn(c) for c in columns)}) VALUES {', '.join([per_row] * len(chunk))} "
                f"ON CONFLICT ({qn('integration_id')}, {qn('minute')}) DO UPDATE SET {updates}",
                params,
            )


def prune(now: datetime | None = None) -> dict[str, int]:
    """Delete call statistics and health check results older than RESILIENCE_STATS_RETENTION_DAYS."""
    from .models import CallStats, HealthCheckResult

    cutoff = (now or timezone.now()) - timedelta(days=monitoring_settings.STATS_RETENTION_DAYS)
    stats, _ = CallStats.objects.filter(minute__lt=cutoff).delete()
    results, _ = HealthCheckResult.objects.filter(at__lt=cutoff).delete()
    return {"call_stats": stats, "health_check_results": results}

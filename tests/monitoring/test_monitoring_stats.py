"""Call statistics into the database: the upsert adds up processes, a failed flush loses nothing, pruning."""

import logging
import threading
from datetime import datetime, timedelta, timezone

import pytest
from django.db import DatabaseError

from integrations.models import Integration
from integrations.resilience import execute
from monitoring import stats
from monitoring.counters import StatsBuffer
from monitoring.histogram import BUCKET_NAMES, percentiles
from monitoring.models import CallStats, HealthCheck, HealthCheckResult

from test_monitoring_counters import AT, event

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_stats_buffer")]

MINUTE = datetime.fromtimestamp(1_699_999_980, tz=timezone.utc)


@pytest.fixture
def billing():
    return Integration.objects.create(name="billing", max_retries=0, timeout_enforcement="inline")


def test_two_processes_flushing_the_same_minute_add_up_in_one_row(billing):
    first, second = StatsBuffer(), StatsBuffer()  # two workers' buffers
    for _ in range(3):
        first.record(event(latency_ms=8))
    second.record(event("server_error", latency_ms=400))
    second.record(event(latency_ms=8))
    assert stats.flush(first) == 1
    assert stats.flush(second) == 1
    row = CallStats.objects.get()
    assert (row.integration, row.minute) == (billing, MINUTE)
    assert (row.calls, row.successes, row.failures_server_error) == (5, 4, 1)
    assert (row.latency_le_10, row.latency_le_500) == (4, 1)
    assert row.latency_sum_ms == pytest.approx(432)


def test_percentiles_come_from_the_fleets_merged_buckets(billing):
    fast, slow = StatsBuffer(), StatsBuffer()
    for _ in range(90):
        fast.record(event(latency_ms=8))
    for _ in range(10):
        slow.record(event(latency_ms=800))
    stats.flush(fast)
    stats.flush(slow)
    merged = [90 if name == "latency_le_10" else 10 if name == "latency_le_1000" else 0 for name in BUCKET_NAMES]
    totals = CallStats.objects.totals()
    assert totals["latency_buckets"] == merged
    # p95 is the 95th of 100 calls: halfway through the ten in (500, 1000] ms; no process saw it alone
    assert totals["latency_p95_ms"] == pytest.approx(percentiles(merged)["p95"]) == pytest.approx(750.0)
    assert totals["latency_p50_ms"] < 10


def test_the_process_buffer_records_every_guarded_call(billing):
    execute("billing", lambda: 1)
    execute("billing", lambda: 1)
    assert stats.flush() == 1
    assert CallStats.objects.get().calls == 2


def database_down(records, using="default"):
    raise DatabaseError("connection refused")


def test_a_failed_flush_puts_its_rows_back_for_the_next_one(billing, monkeypatch):
    buffer = StatsBuffer()
    buffer.record(event())
    monkeypatch.setattr(stats, "upsert", database_down)
    with pytest.raises(DatabaseError):
        stats.flush(buffer)
    assert buffer.pending() == 1
    monkeypatch.undo()
    buffer.record(event())
    stats.flush(buffer)
    assert CallStats.objects.get().calls == 2


def test_a_background_flush_logs_a_failure_instead_of_raising(billing, monkeypatch, caplog):
    buffer = StatsBuffer()
    buffer.record(event())
    monkeypatch.setattr(stats, "upsert", database_down)
    assert stats.flush_quietly(buffer) == 0
    assert buffer.pending() == 1
    assert "1 rows kept in memory" in caplog.text


def test_counts_of_an_unknown_integration_are_dropped_and_logged(billing, caplog):
    buffer = StatsBuffer()
    buffer.record(event(integration="gone"))
    buffer.record(event())
    assert stats.flush(buffer) == 1
    assert CallStats.objects.get().integration == billing
    assert "unknown integrations dropped: gone" in caplog.text


def test_many_rows_are_written_in_batches(billing):
    buffer = StatsBuffer()
    for minute in range(1_500):
        buffer.record(event(at=AT + 60 * minute))
    assert stats.flush(buffer) == 1_500
    assert CallStats.objects.count() == 1_500


def test_pruning_deletes_statistics_and_results_past_the_retention(billing, settings):
    settings.RESILIENCE_STATS_RETENTION_DAYS = 7
    now = datetime(2026, 1, 20, 12, 0, tzinfo=timezone.utc)
    for days in (8, 6):
        CallStats.objects.create(integration=billing, minute=now - timedelta(days=days), calls=1)
    check = HealthCheck.objects.create(integration=billing, url="http://127.0.0.1:1/")
    for days in (8, 1):
        HealthCheckResult.objects.create(health_check=check, at=now - timedelta(days=days), ok=True, latency_ms=1)
    assert stats.prune(now) == {"call_stats": 1, "health_check_results": 1}
    assert CallStats.objects.get().minute == now - timedelta(days=6)


def test_the_flusher_thread_flushes_every_interval_until_stopped(monkeypatch):
    flushed = threading.Semaphore(0)
    calls = []

    def count(buffer):
        calls.append(buffer)
        flushed.release()
        return 0

    monkeypatch.setattr(stats, "flush_quietly", count)
    buffer = StatsBuffer()
    flusher = stats.Flusher(buffer, 0.01)
    flusher.start()
    assert flushed.acquire(timeout=5) and flushed.acquire(timeout=5)
    flusher.stop()
    assert not flusher._thread.is_alive()
    assert calls[0] is buffer


def test_no_background_flush_starts_when_the_interval_is_0(settings, monkeypatch):
    settings.RESILIENCE_STATS_FLUSH_S = 0
    registered = []
    monkeypatch.setattr(stats.atexit, "register", lambda *args: registered.append(args))
    monkeypatch.setattr(stats, "_flusher", None)
    stats.start_periodic_flush(StatsBuffer())
    assert stats._flusher is None and registered == []


def test_a_process_flushes_periodically_and_at_exit(settings, monkeypatch):
    settings.RESILIENCE_STATS_FLUSH_S = 3600
    registered = []
    monkeypatch.setattr(stats.atexit, "register", lambda *args: registered.append(args))
    monkeypatch.setattr(stats, "_flusher", None)
    buffer = StatsBuffer()
    stats.start_periodic_flush(buffer)
    try:
        assert stats._flusher._thread.is_alive() and stats._flusher.interval_s == 3600
        assert registered == [(stats._flush_at_exit, stats._flusher)] and stats._flusher.buffer is buffer
    finally:
        stats._flusher.stop()


def test_rows_of_a_database_that_is_gone_are_dropped_without_a_word(monkeypatch, caplog):
    buffer = StatsBuffer()
    flusher = stats.Flusher(buffer, 3600)
    flushed = []
    monkeypatch.setattr(stats, "flush_quietly", flushed.append)
    monkeypatch.setattr(stats, "database_name", lambda alias="default": "the real one")
    buffer.record(event())
    flusher.flush()
    assert flushed == [] and buffer.pending() == 0
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]

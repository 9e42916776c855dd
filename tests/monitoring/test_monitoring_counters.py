"""The per-process buffer of call counters: one outcome per call, counts on top, no I/O."""

import threading

import pytest

from integrations.errors import ErrorCategory
from integrations.resilience.events import CallFinished
from monitoring.counters import (
    COUNTER_COLUMNS,
    FAILURE_COLUMNS,
    OUTCOME_INDEX,
    REJECTION_COLUMNS,
    StatsBuffer,
    row_as_dict,
)

AT = 1_700_000_000.0  # 22:13:20 UTC: minute 1_699_999_980


def event(category=None, *, attempts=1, latency_ms=12.0, fallback=None, cache=None, source="live",
          integration="billing", at=AT):
    return CallFinished(integration=integration, ok=category is None or fallback is not None, source=source,
                        category=category, attempts=attempts, retries=max(attempts - 1, 0), latency_ms=latency_ms,
                        attempt_latencies_ms=(latency_ms,) * attempts, fallback_used=fallback, cache=cache, at=at)


def only_row(buffer):
    rows = buffer.drain()
    assert len(rows) == 1
    return row_as_dict(next(iter(rows.values())))


def test_every_error_category_has_exactly_one_outcome_column():
    assert set(OUTCOME_INDEX) == {category.value for category in ErrorCategory}
    columns = [*FAILURE_COLUMNS.values(), *REJECTION_COLUMNS.values()]
    assert len(columns) == len(set(columns)) and set(columns) <= set(COUNTER_COLUMNS)
    assert set(REJECTION_COLUMNS) == {c.value for c in ErrorCategory if c.is_refusal}


def test_a_success_a_failure_and_a_rejection_each_count_once_in_their_own_column():
    buffer = StatsBuffer()
    buffer.record(event())
    buffer.record(event("timeout", attempts=3, latency_ms=900))
    buffer.record(event("circuit_open", attempts=0, latency_ms=0.01))
    row = only_row(buffer)
    assert (row["calls"], row["successes"], row["failures_timeout"], row["rejected_open"]) == (3, 1, 1, 1)
    assert (row["attempts"], row["retries"]) == (4, 2)


def test_only_calls_that_reached_the_upstream_feed_the_latency_histogram():
    buffer = StatsBuffer()
    buffer.record(event(latency_ms=12.0))
    buffer.record(event("quota_exceeded", attempts=0, latency_ms=0.02))
    buffer.record(event(attempts=0, latency_ms=0.05, source="cache", cache="hit"))
    row = only_row(buffer)
    assert row["latency_le_25"] == 1 and row["latency_le_1"] == 0
    assert row["latency_sum_ms"] == pytest.approx(12.0)
    assert (row["cache_hits"], row["successes"], row["rejected_quota"]) == (1, 2, 1)


def test_a_fallback_is_counted_by_kind_on_top_of_the_failure_it_covered():
    buffer = StatsBuffer()
    buffer.record(event("network", fallback="last_known", source="fallback", cache="miss"))
    row = only_row(buffer)
    assert (row["failures_network"], row["fallback_last_known"], row["cache_misses"], row["successes"]) == (1, 1, 1, 0)


def test_calls_are_keyed_by_integration_and_utc_minute():
    buffer = StatsBuffer()
    buffer.record(event(at=AT))
    buffer.record(event(at=AT + 39.9))  # same minute (it ends at AT + 40)
    buffer.record(event(at=AT + 40))
    buffer.record(event(at=AT, integration="search"))
    rows = buffer.drain()
    assert {key: row[0] for key, row in rows.items()} == {
        ("billing", 1_699_999_980): 2, ("billing", 1_700_000_040): 1, ("search", 1_699_999_980): 1}
    assert buffer.drain() == {}


def test_restored_rows_add_to_what_was_recorded_since_the_drain():
    buffer = StatsBuffer()
    buffer.record(event())
    drained = buffer.drain()
    buffer.record(event())
    buffer.restore(drained)
    assert only_row(buffer)["calls"] == 2


def test_the_first_record_arms_the_flush_once():
    armed = []
    buffer = StatsBuffer(on_first_record=armed.append)
    for _ in range(3):
        buffer.record(event())
    assert armed == [buffer]


def test_a_forked_child_starts_empty_and_arms_its_own_flush():
    armed = []
    buffer = StatsBuffer(on_first_record=armed.append)
    buffer.record(event())
    buffer._after_fork()
    assert buffer.pending() == 0
    buffer.record(event())
    assert len(armed) == 2


def test_concurrent_records_lose_no_count():
    buffer = StatsBuffer()

    def hammer():
        for _ in range(5_000):
            buffer.record(event())

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert only_row(buffer)["calls"] == 20_000

"""Call statistics as counters: the columns, and the per-process buffer the hot path feeds.

Every ``CallFinished`` adds to one row of counters, keyed by integration and
UTC minute. Each call is counted once in exactly one outcome column: a
success (live or cached), a failure by category (the upstream's error, even
when a fallback then served a value) or a rejection (the pipeline refused it
without calling the upstream). Fallbacks, retries and cache lookups are
counted on top. Calls that reached the upstream (at least one attempt) also
add their latency to a fixed-bucket histogram (see ``histogram``), so
cache hits and refusals do not hide a slow upstream.

The buffer makes no query and imports no ORM: ``stats.flush`` drains it into
the database. It is thread-safe (one lock, held for a few increments).
"""

from __future__ import annotations

import os
import threading
from typing import Callable

from integrations.errors import ErrorCategory
from integrations.resilience import fallback as fb

from .histogram import BUCKET_NAMES, bucket_index

# Rejections have short names of their own; every other category is a failure.
REJECTION_COLUMNS = {
    ErrorCategory.CIRCUIT_OPEN.value: "rejected_open",
    ErrorCategory.QUOTA_EXCEEDED.value: "rejected_quota",
    ErrorCategory.BULKHEAD_FULL.value: "rejected_bulkhead",
    ErrorCategory.DEGRADED.value: "rejected_degraded",
}
FAILURE_COLUMNS = {category.value: f"failures_{category.value}"
                   for category in ErrorCategory if category.value not in REJECTION_COLUMNS}
# The failures the breaker counts against the upstream: what the watchdog calls errors.
ERROR_COLUMNS = tuple(FAILURE_COLUMNS[category.value] for category in ErrorCategory if category.counts_as_failure)
FALLBACK_COLUMNS = {kind: f"fallback_{kind}" for kind in (fb.CACHE, fb.LAST_KNOWN, fb.VALUE, fb.CALL)}

# Every integer column of a row, in buffer order.
COUNTER_COLUMNS: tuple[str, ...] = (
    "calls", "successes", "attempts", "retries",
    *FAILURE_COLUMNS.values(),
    *REJECTION_COLUMNS.values(),
    *FALLBACK_COLUMNS.values(),
    "cache_hits", "cache_misses",
    *BUCKET_NAMES,
)
LATENCY_SUM_COLUMN = "latency_sum_ms"  # a float, last in a buffer row
ROW_WIDTH = len(COUNTER_COLUMNS) + 1

_INDEX = {column: i for i, column in enumerate(COUNTER_COLUMNS)}
CALLS = _INDEX["calls"]
SUCCESSES = _INDEX["successes"]
ATTEMPTS = _INDEX["attempts"]
RETRIES = _INDEX["retries"]
CACHE_HITS = _INDEX["cache_hits"]
CACHE_MISSES = _INDEX["cache_misses"]
FIRST_BUCKET = _INDEX[BUCKET_NAMES[0]]
LATENCY_SUM = ROW_WIDTH - 1
OUTCOME_INDEX = {category: _INDEX[column] for category, column in (*FAILURE_COLUMNS.items(),
                                                                    *REJECTION_COLUMNS.items())}
FALLBACK_INDEX = {kind: _INDEX[column] for kind, column in FALLBACK_COLUMNS.items()}

Key = tuple[str, int]  # (integration name, minute as seconds since the epoch, a multiple of 60)


class StatsBuffer:
    """Counters per (integration, minute) of this process, waiting for a flush.

    ``on_first_record`` is called once, with the buffer, on the first call
    recorded in this process (and again in a forked child): that is where the
    periodic flush is started, so processes that make no call start nothing.
    """

    def __init__(self, on_first_record: Callable[[StatsBuffer], None] | None = None) -> None:
        self.on_first_record = on_first_record
        self._lock = threading.Lock()
        self._rows: dict[Key, list] = {}
        self._armed = on_first_record is None
        if on_first_record is not None and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork)  # a buffer that flushes itself: the process's

    def record(self, event) -> None:
        """The CallFinished subscriber: a few increments under a lock, no I/O."""
        if not self._armed:
            self._arm()
        outcome = SUCCESSES if event.category is None else OUTCOME_INDEX[event.category]
        key = (event.integration, int(event.at // 60) * 60)
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = [0] * ROW_WIDTH
            row[CALLS] += 1
            row[outcome] += 1
            if event.attempts:
                row[ATTEMPTS] += event.attempts
                row[RETRIES] += event.retries
                row[FIRST_BUCKET + bucket_index(event.latency_ms)] += 1
                row[LATENCY_SUM] += event.latency_ms
            if event.fallback_used is not None:
                row[FALLBACK_INDEX[event.fallback_used]] += 1
            if event.cache is not None:
                row[CACHE_HITS if event.cache == "hit" else CACHE_MISSES] += 1

    def drain(self) -> dict[Key, list]:
        """Take every row out of the buffer (the caller now owns them)."""
        with self._lock:
            rows, self._rows = self._rows, {}
        return rows

    def restore(self, rows: dict[Key, list]) -> None:
        """Put drained rows back (a flush that failed), adding to what was recorded since."""
        with self._lock:
            for key, counts in rows.items():
                row = self._rows.get(key)
                if row is None:
                    self._rows[key] = list(counts)
                else:
                    for i, value in enumerate(counts):
                        row[i] += value

    def pending(self) -> int:
        """How many (integration, minute) rows wait for a flush."""
        return len(self._rows)

    def _arm(self) -> None:
        with self._lock:
            if self._armed:
                return
            self._armed = True
        self.on_first_record(self)

    def _after_fork(self) -> None:
        # The parent flushes what it recorded; the child starts empty, with its own flush.
        self._lock = threading.Lock()
        self._rows = {}
        self._armed = self.on_first_record is None


def row_as_dict(row: list) -> dict:
    """A buffer row by column name (the float latency sum included)."""
    return {**dict(zip(COUNTER_COLUMNS, row)), LATENCY_SUM_COLUMN: row[LATENCY_SUM]}

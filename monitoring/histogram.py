"""Fixed-bucket latency histograms: bucket bounds, percentiles and shares.

The buckets are the same in every process and on every host, so histograms
merge by adding their counts, and a percentile computed from merged counts is
the fleet's, not an average of per-process percentiles. Counts are stored per
bucket (not cumulative); the last bucket has no upper bound.

A percentile is interpolated linearly inside the bucket that holds it, as
Prometheus' ``histogram_quantile`` does: the error is at most the bucket's
width. A percentile that falls in the unbounded bucket is reported as the
highest finite bound (the histogram cannot say more).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Sequence

# Upper bounds (inclusive), in milliseconds, of every bucket but the last.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
)
BUCKET_COUNT = len(LATENCY_BOUNDS_MS) + 1


def bucket_name(index: int) -> str:
    """The column name of bucket ``index``: latency_le_2_5 for <= 2.5 ms, latency_inf for the last."""
    if index == len(LATENCY_BOUNDS_MS):
        return "latency_inf"
    bound = LATENCY_BOUNDS_MS[index]
    return f"latency_le_{bound:g}".replace(".", "_")


BUCKET_NAMES: tuple[str, ...] = tuple(bucket_name(i) for i in range(BUCKET_COUNT))


def bucket_index(latency_ms: float) -> int:
    """The bucket a latency falls in (bounds are inclusive)."""
    return bisect_left(LATENCY_BOUNDS_MS, latency_ms)


def percentile(counts: Sequence[int], q: float) -> float | None:
    """The q-th percentile (0 < q <= 100) of a histogram's counts; None when it is empty."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile needs 0 < q <= 100, got {q}")
    if len(counts) != BUCKET_COUNT:
        raise ValueError(f"a latency histogram has {BUCKET_COUNT} buckets, got {len(counts)} counts")
    total = sum(counts)
    if total == 0:
        return None
    rank = total * q / 100
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(LATENCY_BOUNDS_MS):
                return float(LATENCY_BOUNDS_MS[-1])
            lower = LATENCY_BOUNDS_MS[index - 1] if index else 0.0
            upper = LATENCY_BOUNDS_MS[index]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return float(LATENCY_BOUNDS_MS[-1])  # unreachable: the loop always reaches the rank


def percentiles(counts: Sequence[int]) -> dict[str, float | None]:
    """p50, p95 and p99 of a histogram."""
    return {"p50": percentile(counts, 50), "p95": percentile(counts, 95), "p99": percentile(counts, 99)}


def share_above(counts: Sequence[int], threshold_ms: float) -> float | None:
    """The share (0..1) of observations above ``threshold_ms``; None when the histogram is empty.

    The bucket that holds the threshold contributes the part of it above the
    threshold, assuming its observations are spread evenly (the same
    assumption as ``percentile``).
    """
    total = sum(counts)
    if total == 0:
        return None
    index = bucket_index(threshold_ms)
    above = sum(counts[index + 1:])
    if index < len(LATENCY_BOUNDS_MS):
        lower = LATENCY_BOUNDS_MS[index - 1] if index else 0.0
        upper = LATENCY_BOUNDS_MS[index]
        above += counts[index] * (upper - threshold_ms) / (upper - lower)
    # In the unbounded bucket nothing says where the threshold falls: count none of it as above.
    return above / total

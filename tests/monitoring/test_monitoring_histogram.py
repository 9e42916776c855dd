"""Fixed-bucket latency histograms: percentiles and shares from bucket counts."""

import pytest

from monitoring.histogram import (
    BUCKET_COUNT,
    BUCKET_NAMES,
    LATENCY_BOUNDS_MS,
    bucket_index,
    percentile,
    percentiles,
    share_above,
)


def histogram(**counts):
    """Counts by bucket name, e.g. histogram(latency_le_10=5)."""
    unknown = set(counts) - set(BUCKET_NAMES)
    assert not unknown, unknown
    return [counts.get(name, 0) for name in BUCKET_NAMES]


def test_bounds_are_inclusive_and_the_last_bucket_has_no_upper_bound():
    assert bucket_index(0) == 0
    assert bucket_index(1) == 0
    assert bucket_index(1.01) == 1
    assert bucket_index(60_000) == len(LATENCY_BOUNDS_MS) - 1
    assert bucket_index(10**9) == BUCKET_COUNT - 1
    assert BUCKET_NAMES[1] == "latency_le_2_5" and BUCKET_NAMES[-1] == "latency_inf"


def test_a_percentile_is_interpolated_inside_its_bucket():
    counts = histogram(latency_le_100=50, latency_le_250=50)  # 50 in (50, 100], 50 in (100, 250]
    assert percentile(counts, 50) == pytest.approx(100.0)
    assert percentile(counts, 75) == pytest.approx(175.0)
    assert percentile(counts, 99) == pytest.approx(247.0)


def test_p50_p95_p99_of_a_histogram():
    counts = histogram(latency_le_10=90, latency_le_1000=10)
    result = percentiles(counts)
    assert result["p50"] == pytest.approx(5 + 5 * 50 / 90)
    assert result["p95"] == pytest.approx(500 + 500 * 5 / 10)
    assert result["p99"] == pytest.approx(500 + 500 * 9 / 10)


def test_a_percentile_in_the_unbounded_bucket_is_the_highest_finite_bound():
    assert percentile(histogram(latency_inf=3), 50) == LATENCY_BOUNDS_MS[-1]


def test_an_empty_histogram_has_no_percentile_and_no_share():
    assert percentile([0] * BUCKET_COUNT, 99) is None
    assert share_above([0] * BUCKET_COUNT, 100) is None


def test_a_percentile_outside_0_100_or_a_wrong_histogram_is_refused():
    with pytest.raises(ValueError, match="0 < q <= 100"):
        percentile(histogram(latency_le_10=1), 0)
    with pytest.raises(ValueError, match="buckets"):
        percentile([1, 2, 3], 50)


def test_share_above_counts_the_part_of_the_threshold_bucket_above_it():
    counts = histogram(latency_le_500=10, latency_le_1000=10, latency_le_2500=20)
    # 750 ms is halfway through (500, 1000]: half of its 10, plus the 20 above
    assert share_above(counts, 750) == pytest.approx((5 + 20) / 40)
    assert share_above(counts, 1000) == pytest.approx(20 / 40)
    assert share_above(counts, 10) == pytest.approx(1.0)

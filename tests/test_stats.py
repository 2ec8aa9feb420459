"""The wait histogram and the stats snapshot (pure logic)."""

from __future__ import annotations

import random

import httpx
import pytest

from hostpool import HostRouter
from hostpool._stats import WAIT_BUCKETS, WaitHistogram


def test_quantiles_are_within_ten_percent_of_the_exact_ones() -> None:
    rng = random.Random(7)
    samples = [rng.lognormvariate(-4, 1.5) for _ in range(20_000)]
    histogram = WaitHistogram()
    for sample in samples:
        histogram.record(sample)
    ordered = sorted(samples)
    summary = histogram.summary()
    for q, got in ((0.50, summary.p50), (0.95, summary.p95), (0.99, summary.p99)):
        exact = ordered[int(q * len(ordered)) - 1]
        assert exact * 0.9 <= got <= exact * 1.11, (q, exact, got)
    assert summary.max == max(samples)
    assert summary.count == len(samples)
    assert summary.total == pytest.approx(sum(samples))


def test_zero_waits_report_zero_quantiles() -> None:
    histogram = WaitHistogram()
    for _ in range(100):
        histogram.record(0.0)
    summary = histogram.summary()
    assert (summary.p50, summary.p99, summary.max) == (0.0, 0.0, 0.0)
    assert summary.buckets[0] == (WAIT_BUCKETS[0], 100)


def test_memory_is_bounded_whatever_the_number_of_samples() -> None:
    histogram = WaitHistogram()
    rng = random.Random(1)
    for _ in range(50_000):
        histogram.record(rng.uniform(0, 3600))
    assert len(histogram.buckets) <= 192


def test_cumulative_buckets_never_decrease_and_end_at_the_count_below_the_last_bound() -> None:
    histogram = WaitHistogram()
    for value in (0.0005, 0.003, 0.03, 0.3, 3.0, 300.0):
        histogram.record(value)
    counts = [n for _, n in histogram.summary().buckets]
    assert counts == sorted(counts)
    assert counts[-1] == 5  # 300 s is above the last bound (30 s): only +Inf holds it


def test_merge_adds_samples() -> None:
    a, b = WaitHistogram(), WaitHistogram()
    a.record(0.01)
    b.record(0.02)
    b.record(2.0)
    a.merge(b)
    assert a.count == 3
    assert a.max == 2.0


@pytest.mark.anyio
async def test_stats_snapshot_is_immutable() -> None:
    async with HostRouter(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as router:
        await router.get("https://a.example/")
        stats = router.stats()
    with pytest.raises(TypeError):
        stats.partitions["b.example"] = stats.partitions["a.example"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        stats.in_flight = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        stats.partitions["a.example"].requests = 9  # type: ignore[misc]

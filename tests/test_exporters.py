"""The Prometheus and OpenTelemetry exporters, against real routers and the real libraries.

Prometheus: a fresh ``CollectorRegistry`` is scraped with ``generate_latest``
and the text exposition parsed back. OpenTelemetry: an SDK ``MeterProvider``
with an ``InMemoryMetricReader``. Either way the figures must match what the
router really did against the loopback ``upstream`` (or a ``MockTransport``).
"""

from __future__ import annotations

import gc
import importlib
import random
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider, ObservableCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader, Sum
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from upstream import Upstream

import hostpool
from hostpool import HostRouter, Quota
from hostpool._stats import WAIT_BUCKETS
from hostpool.otel import OTHER, instrument
from hostpool.prometheus import HostpoolCollector, register

pytestmark = pytest.mark.anyio

H2, H3 = "127.0.0.2", "127.0.0.3"

Labels = frozenset[tuple[str, str]]


# -- helpers -------------------------------------------------------------------


class Scrape:
    """One parsed Prometheus scrape: sample values by name and labels."""

    def __init__(self, registry: CollectorRegistry) -> None:
        text = generate_latest(registry).decode()
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def by_partition(self, name: str) -> dict[str, float]:
        """Values of a per-partition sample, by ``partition`` label."""
        return {
            dict(labels)["partition"]: value
            for (sample, labels), value in self.samples.items()
            if sample == name and "le" not in dict(labels)
        }


class OtelData:
    """One OpenTelemetry collection: data points by instrument name and partition."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        data = reader.get_metrics_data()
        assert data is not None
        self.points: dict[str, dict[str | None, float]] = {}
        self.units: dict[str, str] = {}
        self.monotonic: dict[str, bool | None] = {}
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                assert scope.scope.name == "hostpool"
                for metric in scope.metrics:
                    self.units[metric.name] = metric.unit or ""
                    sums = metric.data if isinstance(metric.data, Sum) else None
                    self.monotonic[metric.name] = None if sums is None else sums.is_monotonic
                    values = self.points.setdefault(metric.name, {})
                    for point in metric.data.data_points:
                        partition = (point.attributes or {}).get("hostpool.partition")
                        assert partition is None or isinstance(partition, str)
                        values[partition] = point.value  # type: ignore[union-attr]

    def __call__(self, name: str, partition: str | None = None) -> float:
        return self.points[name][partition]


def otel_reader() -> tuple[MeterProvider, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return MeterProvider(metric_readers=[reader]), reader


@asynccontextmanager
async def concurrently(
    router: HostRouter, urls: list[str], results: list[Any]
) -> AsyncIterator[None]:
    """Send every URL at once; on exit, wait for all of them (bounded)."""

    async def one(url: str) -> None:
        try:
            results.append((await router.get(url)).status_code)
        except Exception as exc:
            results.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for url in urls:
                tg.start_soon(one, url)
            yield


def mock_router(**kwargs: Any) -> HostRouter:
    """A router whose requests never leave the process."""
    return HostRouter(transport=httpx.MockTransport(lambda _: httpx.Response(200)), **kwargs)


async def send(router: HostRouter, counts: dict[str, int]) -> None:
    """Send ``counts[host]`` requests to each host, one after the other."""
    for host, n in counts.items():
        for _ in range(n):
            (await router.get(f"http://{host}/")).raise_for_status()


# -- Prometheus: what happened on the wire --------------------------------------


async def test_prometheus_counts_requests_sockets_and_waits(upstream: Upstream) -> None:
    registry = CollectorRegistry()
    async with HostRouter() as router:
        register(router, registry)
        for _ in range(3):
            assert (await router.get(upstream.url(H2, "/ok"))).text == "ok"
        await router.get(upstream.url(H3, "/ok"))
        scrape = Scrape(registry)

    assert scrape.types["hostpool_requests"] == "counter"
    assert scrape.types["hostpool_requests_in_flight"] == "gauge"
    assert scrape.types["hostpool_pool_wait_seconds"] == "histogram"
    assert scrape("hostpool_requests_total", partition=H2) == 3
    assert scrape("hostpool_requests_completed_total", partition=H2) == 3
    assert scrape("hostpool_requests_completed_total", partition=H3) == 1
    assert scrape("hostpool_requests_failed_total", partition=H2) == 0
    # Sequential requests reuse one keep-alive socket.
    assert scrape("hostpool_connections_opened_total", partition=H2) == 1
    assert scrape("hostpool_connections_open", partition=H2) == 1
    assert scrape("hostpool_connections_idle", partition=H2) == 1
    assert scrape("hostpool_requests_in_flight", partition=H2) == 0
    assert scrape("hostpool_requests_waiting", partition=H2) == 0
    assert scrape("hostpool_quota_max_connections", partition=H2) == 50  # half the budget
    assert scrape("hostpool_quota_reserved", partition=H2) == 0
    # Every request waited (for 0 s); each wait is in every bucket.
    assert scrape("hostpool_pool_wait_seconds_count", partition=H2) == 3
    assert scrape("hostpool_pool_wait_seconds_bucket", partition=H2, le="+Inf") == 3
    assert scrape("hostpool_pool_wait_seconds_bucket", partition=H2, le="0.001") == 3
    assert scrape("hostpool_pool_wait_seconds_sum", partition=H2) == pytest.approx(0, abs=1e-3)
    buckets = [
        scrape("hostpool_pool_wait_seconds_bucket", partition=H2, le=str(b)) for b in WAIT_BUCKETS
    ]
    assert buckets == [3] * len(WAIT_BUCKETS)
    # Router-wide figures.
    assert scrape("hostpool_budget_connections") == 100
    assert scrape("hostpool_budget_keepalive_connections") == 20
    assert scrape("hostpool_shared_slots") == 100
    assert scrape("hostpool_shared_slots_in_use") == 0
    assert scrape("hostpool_partitions") == 2
    assert scrape("hostpool_partitions_other") == 0
    assert scrape("hostpool_partitions_created_total") == 2
    assert scrape("hostpool_partitions_dropped_total") == 0
    # Nothing was capped, so there is no "other" series.
    assert set(scrape.by_partition("hostpool_requests_total")) == {H2, H3}


async def test_prometheus_shows_requests_in_flight_while_held(upstream: Upstream) -> None:
    registry = CollectorRegistry()
    results: list[Any] = []
    async with HostRouter(quotas={H2: Quota(max_connections=5, reserved=2)}) as router:
        HostpoolCollector(router, registry=registry)
        async with concurrently(router, [upstream.url(H2, "/hold?key=a")] * 2, results):
            await upstream.wait_until(lambda: upstream.stats(H2).in_flight == 2)
            held = Scrape(registry)
            upstream.release("a")
        after = Scrape(registry)

    assert results == [200, 200]
    assert held("hostpool_requests_in_flight", partition=H2) == 2
    assert held("hostpool_connections_open", partition=H2) == 2
    assert held("hostpool_connections_idle", partition=H2) == 0
    assert held("hostpool_requests_total", partition=H2) == 2
    assert held("hostpool_requests_completed_total", partition=H2) == 0
    assert held("hostpool_quota_max_connections", partition=H2) == 5
    assert held("hostpool_quota_reserved", partition=H2) == 2
    assert held("hostpool_shared_slots") == 98
    assert after("hostpool_requests_in_flight", partition=H2) == 0
    assert after("hostpool_requests_completed_total", partition=H2) == 2
    assert after("hostpool_connections_idle", partition=H2) == 2


async def test_prometheus_counts_pool_timeouts_overflows_and_long_waits(
    upstream: Upstream,
) -> None:
    registry = CollectorRegistry()
    quotas = {
        H2: Quota(max_connections=1, pool_timeout=0.05),
        H3: Quota(max_connections=1, max_pending=0),
    }
    results: list[Any] = []
    async with HostRouter(quotas=quotas) as router:
        HostpoolCollector(router, registry=registry)
        urls = [upstream.url(H2, "/hold?key=a"), upstream.url(H3, "/hold?key=a")]
        async with concurrently(router, urls, results):
            await upstream.wait_until(lambda: upstream.total().in_flight == 2)
            with pytest.raises(hostpool.PoolTimeout) as timed_out:
                await router.get(upstream.url(H2, "/ok"))
            with pytest.raises(hostpool.PendingLimitExceeded):
                await router.get(upstream.url(H3, "/ok"))
            scrape = Scrape(registry)
            upstream.release("a")

    assert results == [200, 200]
    assert scrape("hostpool_pool_timeouts_total", partition=H2) == 1
    assert scrape("hostpool_pool_overflows_total", partition=H2) == 0
    assert scrape("hostpool_pool_overflows_total", partition=H3) == 1
    assert scrape("hostpool_pool_timeouts_total", partition=H3) == 0
    assert scrape("hostpool_requests_total", partition=H2) == 2
    assert scrape("hostpool_requests_in_flight", partition=H2) == 1
    assert scrape("hostpool_requests_waiting", partition=H2) == 0
    # Two waits on H2: the held request's (0 s) and the timed-out one (~0.05 s).
    assert scrape("hostpool_pool_wait_seconds_count", partition=H2) == 2
    assert scrape("hostpool_pool_wait_seconds_bucket", partition=H2, le="+Inf") == 2
    assert scrape("hostpool_pool_wait_seconds_bucket", partition=H2, le="0.025") == 1
    assert scrape("hostpool_pool_wait_seconds_bucket", partition=H2, le="2.5") == 2
    assert scrape("hostpool_pool_wait_seconds_sum", partition=H2) == pytest.approx(
        timed_out.value.waited, rel=0.01
    )
    # The rejected request never waited.
    assert scrape("hostpool_pool_wait_seconds_count", partition=H3) == 1


async def test_prometheus_counts_failed_requests(refused_url: str) -> None:
    registry = CollectorRegistry()
    async with HostRouter() as router:
        register(router, registry)
        with pytest.raises(httpx.ConnectError):
            await router.get(refused_url)
        scrape = Scrape(registry)
    assert scrape("hostpool_requests_failed_total", partition="127.0.0.1") == 1
    assert scrape("hostpool_requests_completed_total", partition="127.0.0.1") == 0


# -- OpenTelemetry: the same figures ---------------------------------------------


async def test_otel_reports_requests_in_flight_and_waits(upstream: Upstream) -> None:
    provider, reader = otel_reader()
    results: list[Any] = []
    async with HostRouter() as router:
        instrument(router, provider)
        for _ in range(3):
            await router.get(upstream.url(H2, "/ok"))
        async with concurrently(router, [upstream.url(H3, "/hold?key=b")] * 2, results):
            await upstream.wait_until(lambda: upstream.stats(H3).in_flight == 2)
            held = OtelData(reader)
            upstream.release("b")
        after = OtelData(reader)

    assert held("hostpool.requests", H2) == 3
    assert held("hostpool.requests.completed", H2) == 3
    assert held("hostpool.requests.failed", H2) == 0
    assert held("hostpool.connections.opened", H2) == 1
    assert held("hostpool.connections.idle", H2) == 1
    assert held("hostpool.requests.in_flight", H3) == 2
    assert held("hostpool.requests.in_flight", H2) == 0
    assert held("hostpool.connections.open", H3) == 2
    assert held("hostpool.pool.wait.count", H2) == 3
    assert held("hostpool.pool.wait.time", H2) == pytest.approx(0, abs=1e-3)
    assert held("hostpool.quota.max_connections", H2) == 50
    assert held("hostpool.budget.connections") == 100
    assert held("hostpool.partitions") == 2
    assert held("hostpool.partitions.created") == 2
    assert after("hostpool.requests.in_flight", H3) == 0
    assert after("hostpool.requests.completed", H3) == 2
    assert results == [200, 200]
    # Instrument kinds and units.
    assert held.units["hostpool.pool.wait.time"] == "s"
    assert held.units["hostpool.requests.in_flight"] == "{request}"
    assert held.units["hostpool.connections.open"] == "{connection}"
    assert held.monotonic["hostpool.requests"] is True
    assert held.monotonic["hostpool.pool.wait.time"] is True
    assert held.monotonic["hostpool.requests.in_flight"] is False
    assert held.monotonic["hostpool.partitions"] is False


async def test_otel_counts_pool_timeouts(upstream: Upstream) -> None:
    provider, reader = otel_reader()
    results: list[Any] = []
    async with HostRouter(quotas={H2: Quota(max_connections=1, pool_timeout=0.05)}) as router:
        instrument(router, provider)
        async with concurrently(router, [upstream.url(H2, "/hold?key=a")], results):
            await upstream.wait_until(lambda: upstream.stats(H2).in_flight == 1)
            with pytest.raises(hostpool.PoolTimeout):
                await router.get(upstream.url(H2, "/ok"))
            data = OtelData(reader)
            upstream.release("a")
    assert data("hostpool.pool.timeouts", H2) == 1
    assert data("hostpool.pool.wait.count", H2) == 2
    assert data("hostpool.pool.wait.time", H2) >= 0.04


async def test_otel_takes_one_snapshot_per_collection() -> None:
    first, second = InMemoryMetricReader(), InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[first, second])
    async with mock_router() as router:
        await send(router, {"a.test": 1})
        calls = 0
        real_stats = router.stats

        def counting_stats() -> hostpool.RouterStats:
            nonlocal calls
            calls += 1
            return real_stats()

        router.stats = counting_stats  # type: ignore[method-assign]
        instrument(router, provider)
        OtelData(first)
        assert calls == 1
        OtelData(first)
        OtelData(second)
        assert calls == 3


# -- the cap on partition labels --------------------------------------------------


def crawl_counts(hosts: int) -> dict[str, int]:
    """Hosts ``hNN.test`` with 1 to 3 requests each: plenty of ties."""
    return {f"h{i:02d}.test": 1 + (i * 7) % 3 for i in range(hosts)}


def expected_named(counts: dict[str, int], limit: int) -> set[str]:
    return set(sorted(counts, key=lambda host: (-counts[host], host))[:limit])


async def test_prometheus_shows_the_busiest_partitions_and_adds_up_the_rest() -> None:
    counts = crawl_counts(60)
    registry = CollectorRegistry()
    async with mock_router() as router:
        HostpoolCollector(router, registry=registry)  # max_partitions=50
        await send(router, counts)
        stats = router.stats()
        scrape = Scrape(registry)

    named = expected_named(counts, 50)
    requests = scrape.by_partition("hostpool_requests_total")
    assert set(requests) == named | {OTHER}
    assert len(requests) == 51
    for host in named:
        assert requests[host] == counts[host]
    rest = sum(n for host, n in counts.items() if host not in named)
    assert requests[OTHER] == rest
    assert sum(requests.values()) == stats.requests == sum(counts.values())
    assert scrape("hostpool_requests_completed_total", partition=OTHER) == rest
    # Gauges are summed too: ten default quotas of 50.
    assert scrape("hostpool_quota_max_connections", partition=OTHER) == 10 * 50
    # The histogram of "other" merges the buckets of its partitions.
    assert scrape("hostpool_pool_wait_seconds_count", partition=OTHER) == rest
    assert scrape("hostpool_pool_wait_seconds_bucket", partition=OTHER, le="+Inf") == rest
    assert scrape("hostpool_pool_wait_seconds_bucket", partition=OTHER, le="0.001") == rest
    assert scrape("hostpool_partitions") == 60
    assert scrape("hostpool_partitions_other") == 10


async def test_otel_shows_the_busiest_partitions_and_adds_up_the_rest() -> None:
    counts = crawl_counts(60)
    provider, reader = otel_reader()
    async with mock_router() as router:
        await send(router, counts)
        instrument(router, provider, max_partitions=20)
        data = OtelData(reader)

    named = expected_named(counts, 20)
    requests = data.points["hostpool.requests"]
    assert set(requests) == named | {OTHER}
    rest = sum(n for host, n in counts.items() if host not in named)
    assert requests[OTHER] == rest
    assert sum(requests.values()) == sum(counts.values())
    assert data("hostpool.pool.wait.count", OTHER) == rest
    assert data("hostpool.partitions.other") == 40


class Growth:
    """Add up the increases of every series across scrapes; fail if one goes down.

    A series seen for the first time counts from 0, as for OpenTelemetry
    cumulative-to-delta conversion; a series that disappears and comes back
    must come back at its last value or above.
    """

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.total = 0.0

    def observe(self, values: dict[str, float]) -> dict[str, float]:
        for label, value in values.items():
            previous = self.last.get(label, 0)
            assert value >= previous, f"{label} went down from {previous} to {value}"
            self.total += value - previous
            self.last[label] = value
        return values


async def test_series_never_go_down_as_partitions_move_and_drop() -> None:
    registry = CollectorRegistry()
    growth = Growth()
    async with mock_router(partition_idle_timeout=0.05) as router:
        HostpoolCollector(router, max_partitions=1, registry=registry)

        def requests() -> dict[str, float]:
            return growth.observe(Scrape(registry).by_partition("hostpool_requests_total"))

        await send(router, {"a.test": 2, "b.test": 1})
        assert requests() == {"a.test": 2, OTHER: 1}
        # b overtakes a and gets the label. What b added to "other" stays
        # there; its requests since the last scrape go to its own series.
        await send(router, {"b.test": 3})
        assert requests() == {"b.test": 3, OTHER: 1}
        # a now adds to "other" only its requests from here on.
        await send(router, {"a.test": 1, "b.test": 1})
        assert requests() == {"b.test": 4, OTHER: 2}
        # Both go idle and are dropped when c arrives: b's series ends (at 4),
        # and "other" keeps what a added to it.
        await anyio.sleep(0.1)
        await send(router, {"c.test": 1})
        assert router.stats().partitions_dropped == 2
        assert requests() == {"c.test": 1, OTHER: 2}
        # a comes back and wins the tie with c: its series continues from 2.
        await send(router, {"a.test": 1})
        assert requests() == {"a.test": 3, OTHER: 2}
        # b comes back into "other", then gets busy: its series continues from 4.
        await send(router, {"b.test": 1})
        assert requests() == {"a.test": 3, OTHER: 3}
        await send(router, {"b.test": 2})
        assert requests() == {"b.test": 6, OTHER: 3}
        assert growth.total == router.stats().requests == 13


async def test_a_partition_recreated_between_scrapes_continues_its_series() -> None:
    registry = CollectorRegistry()
    async with mock_router(partition_idle_timeout=0.05) as router:
        HostpoolCollector(router, max_partitions=1, registry=registry)
        await send(router, {"a.test": 3, "b.test": 2})
        first = Scrape(registry)
        assert first.by_partition("hostpool_requests_total") == {"a.test": 3, OTHER: 2}
        await anyio.sleep(0.1)
        # Both are dropped and come back with fewer requests than before.
        await send(router, {"a.test": 1, "b.test": 1})
        assert router.stats().partitions_dropped == 2
        second = Scrape(registry)
        assert second.by_partition("hostpool_requests_total") == {"a.test": 4, OTHER: 3}


@pytest.mark.parametrize("seed", range(3))
async def test_every_request_is_counted_once_whatever_happens(seed: int) -> None:
    rng = random.Random(seed)
    hosts = [f"h{i}.test" for i in range(8)]
    registry = CollectorRegistry()
    names = ("requests_total", "requests_completed_total", "pool_wait_seconds_count")
    growth = {name: Growth() for name in names}
    # The idle timeout is long enough that a partition is never created and
    # dropped between two scrapes, even on a loaded machine (the documented
    # limit of the exporters), and short enough to drop partitions often.
    async with mock_router(partition_idle_timeout=0.25) as router:
        HostpoolCollector(router, max_partitions=rng.choice([0, 1, 2, 3]), registry=registry)
        for _ in range(20):
            if rng.random() < 0.2:
                await anyio.sleep(0.3)  # let partitions go idle: the next request drops them
            await send(router, {rng.choice(hosts): rng.randint(1, 4) for _ in range(3)})
            scrape = Scrape(registry)
            for name in names:
                growth[name].observe(scrape.by_partition(f"hostpool_{name}"))
        stats = router.stats()
    assert stats.partitions_dropped > 0
    assert growth["requests_total"].total == stats.requests
    assert growth["requests_completed_total"].total == stats.requests_completed
    assert growth["pool_wait_seconds_count"].total == stats.wait.count


async def test_otel_deltas_are_never_negative_as_partitions_move_and_drop() -> None:
    reader = InMemoryMetricReader(
        preferred_temporality={ObservableCounter: AggregationTemporality.DELTA}
    )
    provider = MeterProvider(metric_readers=[reader])
    total = 0.0
    async with mock_router(partition_idle_timeout=0.05) as router:
        instrument(router, provider, max_partitions=1)
        steps: list[dict[str, int]] = [
            {"a.test": 2, "b.test": 1},
            {"b.test": 3},
            {"a.test": 1, "b.test": 1},
            {},  # sleep: a and b go idle
            {"c.test": 1},
            {"a.test": 1},
            {"b.test": 3},
        ]
        for step in steps:
            if not step:
                await anyio.sleep(0.1)
            await send(router, step)
            deltas = OtelData(reader).points["hostpool.requests"]
            assert all(delta >= 0 for delta in deltas.values()), deltas
            total += sum(deltas.values())
        assert router.stats().partitions_dropped == 2
        assert total == router.stats().requests == 13


async def test_a_partition_keyed_other_is_always_part_of_other() -> None:
    def by_host(url: httpx.URL) -> str:
        return OTHER if url.host.startswith("x") else url.host

    registry = CollectorRegistry()
    async with mock_router(partition_by=by_host) as router:
        HostpoolCollector(router, registry=registry)
        await send(router, {"x.test": 2, "a.test": 1})
        scrape = Scrape(registry)
    assert scrape.by_partition("hostpool_requests_total") == {"a.test": 1, OTHER: 2}


async def test_max_partitions_zero_shows_only_other() -> None:
    registry = CollectorRegistry()
    provider, reader = otel_reader()
    async with mock_router() as router:
        HostpoolCollector(router, max_partitions=0, registry=registry)
        instrument(router, provider, max_partitions=0)
        await send(router, {"a.test": 2, "b.test": 1})
        scrape = Scrape(registry)
        data = OtelData(reader)
    assert scrape.by_partition("hostpool_requests_total") == {OTHER: 3}
    assert data.points["hostpool.requests"] == {OTHER: 3}


# -- registration, lifetime, errors -----------------------------------------------


def test_collector_validates_its_arguments() -> None:
    router = mock_router()
    with pytest.raises(ValueError, match="max_partitions must be >= 0"):
        HostpoolCollector(router, max_partitions=-1)
    with pytest.raises(TypeError, match="max_partitions must be an int"):
        HostpoolCollector(router, max_partitions=True)
    with pytest.raises(ValueError, match="namespace must match"):
        HostpoolCollector(router, namespace="host-pool")
    with pytest.raises(TypeError, match="HostRouter"):
        HostpoolCollector(httpx.AsyncClient())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_partitions must be >= 0"):
        instrument(router, MeterProvider(), max_partitions=-1)


def test_one_collector_per_router_and_registry_unless_namespaced() -> None:
    registry = CollectorRegistry()
    first, second = mock_router(), mock_router()
    collector = register(first, registry)
    assert collector.router is first
    assert collector.max_partitions == 50
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        register(second, registry)
    register(second, registry, namespace="crawler", max_partitions=5)
    scrape = Scrape(registry)
    assert scrape("hostpool_budget_connections") == 100
    assert scrape("crawler_budget_connections") == 100
    registry.unregister(collector)
    assert ("hostpool_budget_connections", frozenset()) not in Scrape(registry).samples


def test_registering_takes_no_snapshot() -> None:
    router = mock_router()
    calls: list[None] = []
    real_stats = router.stats

    def counting_stats() -> hostpool.RouterStats:
        calls.append(None)
        return real_stats()

    router.stats = counting_stats  # type: ignore[method-assign]
    registry = CollectorRegistry(auto_describe=True)  # as the global REGISTRY
    register(router, registry)
    assert calls == []
    Scrape(registry)
    assert len(calls) == 1


def test_collector_yields_nothing_once_the_router_is_gone() -> None:
    registry = CollectorRegistry()
    router = mock_router()
    collector = HostpoolCollector(router, registry=registry)
    assert Scrape(registry)("hostpool_partitions") == 0
    del router
    gc.collect()
    assert collector.router is None
    assert Scrape(registry).samples == {}


def test_otel_routers_share_a_provider_with_distinct_attributes() -> None:
    provider, reader = otel_reader()
    api = mock_router(limits=httpx.Limits(max_connections=10))
    crawler = mock_router()
    handle = instrument(api, provider, attributes={"hostpool.router": "api"})
    with pytest.raises(ValueError, match="distinct attributes"):
        instrument(crawler, provider, attributes={"hostpool.router": "api"})
    instrument(crawler, provider, attributes={"hostpool.router": "crawler"})

    def budgets() -> dict[str, float]:
        data = reader.get_metrics_data()
        assert data is not None
        (metric,) = [
            m
            for r in data.resource_metrics
            for s in r.scope_metrics
            for m in s.metrics
            if m.name == "hostpool.budget.connections"
        ]
        points = metric.data.data_points
        return {str((p.attributes or {})["hostpool.router"]): p.value for p in points}  # type: ignore[union-attr]

    assert budgets() == {"api": 10, "crawler": 100}
    assert [handle.active, handle.router] == [True, api]
    assert handle.router is api
    assert handle.max_partitions == 50
    handle.uninstrument()
    assert not handle.active
    assert budgets() == {"crawler": 100}
    # Once uninstrumented, the same attributes may be used again.
    again = instrument(api, provider, attributes={"hostpool.router": "api"})
    assert budgets() == {"api": 10, "crawler": 100}
    del api, again
    gc.collect()
    assert budgets() == {"crawler": 100}


def test_missing_prometheus_client_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "hostpool.prometheus")
    with pytest.raises(ImportError, match=r"pip install 'hostpool\[prometheus\]'"):
        importlib.import_module("hostpool.prometheus")


def test_missing_opentelemetry_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'hostpool\[otel\]'"):
        instrument(mock_router())


def test_hostpool_imports_without_either_library() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None
        sys.modules["opentelemetry"] = None
        import hostpool, hostpool.otel
        assert "prometheus_client" not in [m for m in sys.modules if sys.modules[m]]
        try:
            hostpool.otel.instrument(hostpool.HostRouter())
        except ImportError as exc:
            assert "hostpool[otel]" in str(exc), exc
        else:
            raise AssertionError("no ImportError")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)

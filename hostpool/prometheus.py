"""Expose a ``HostRouter``'s figures to Prometheus.

Needs ``prometheus_client`` (``pip install hostpool[prometheus]``). A
:class:`HostpoolCollector` calls :meth:`HostRouter.stats()
<hostpool.HostRouter.stats>` on every scrape, so there is nothing to update
on the request path:

>>> from prometheus_client import start_http_server
>>> from hostpool.prometheus import register
>>> register(router)  # on prometheus_client's default REGISTRY
>>> start_http_server(9100)

Series (``hostpool`` is the ``namespace``), each with a ``partition`` label:

- gauges ``hostpool_requests_in_flight``, ``hostpool_requests_waiting``,
  ``hostpool_connections_open``, ``hostpool_connections_idle``,
  ``hostpool_quota_max_connections``, ``hostpool_quota_reserved``,
  ``hostpool_paused`` (1 while a Retry-After pause lasts);
- counters ``hostpool_requests_total``, ``hostpool_requests_completed_total``,
  ``hostpool_requests_failed_total``, ``hostpool_connections_opened_total``,
  ``hostpool_connections_evicted_total``, ``hostpool_pool_timeouts_total``,
  ``hostpool_pool_overflows_total``, ``hostpool_pool_reserved_admissions_total``,
  and for the upstream's limits ``hostpool_rate_delayed_total``,
  ``hostpool_pauses_total``, ``hostpool_pause_delayed_total``,
  ``hostpool_fleet_waits_total``, ``hostpool_fleet_unavailable_total``,
  ``hostpool_fleet_leases_lost_total``;
- histogram ``hostpool_pool_wait_seconds`` (buckets
  :data:`hostpool._stats.WAIT_BUCKETS`): how long requests waited for a slot.

Router-wide, without labels: gauges ``hostpool_budget_connections``,
``hostpool_budget_keepalive_connections``, ``hostpool_shared_slots``,
``hostpool_shared_slots_in_use``, ``hostpool_partitions``,
``hostpool_partitions_other``; counters ``hostpool_partitions_created_total``,
``hostpool_partitions_dropped_total``.

At most ``max_partitions`` partitions get their own ``partition`` label: the
live ones with the most requests (ties broken by key). The rest are added up
in ``partition="other"`` (sums of gauges and counters, merged histogram
buckets). So a crawler with ``partition_by="host"`` exports at most
``max_partitions + 1`` series per metric.

Counters never go down within a series, and every increment is counted in
exactly one series, so ``rate()``, ``increase()`` and ``sum(rate(...))``
stay right however partitions come, go, or move in and out of ``other``:

- a partition moving between its own series and ``other`` leaves what it
  counted behind; only its later increments go to the other series;
- a series that goes away (partition dropped after
  ``partition_idle_timeout``, or moved into ``other``) ends; if its label
  comes back it continues from its last value (for the
  ``10 * max_partitions`` labels that went away most recently; an older one
  starts again from 0, which ``rate()`` handles as a counter reset);
- a dropped partition counts with the figures of the last scrape: keep the
  scrape interval shorter than ``partition_idle_timeout`` (a partition is
  dropped only after that long without requests) and nothing is lost.

For ``other``, gauges are sums too, ``hostpool_quota_*`` included.
``hostpool_quota_reserved`` is the reservation of the partition's quota
entry, which every partition under a wildcard (or the default quota) shares:
do not add it up across partitions.

The router is held weakly: once it is garbage-collected the collector
yields nothing. Unregister with ``registry.unregister(collector)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:
    raise ImportError(
        "hostpool.prometheus needs prometheus_client: pip install 'hostpool[prometheus]'"
    ) from exc

from ._export import (
    _COUNTER_INDEX,
    _DESCRIPTIONS,
    _GAUGE_INDEX,
    _ROUTER_VALUES,
    OTHER,
    PARTITION_FIGURES,
    ROUTER_FIGURES,
    _RouterSource,
    _View,
)
from ._router import HostRouter

__all__ = ["OTHER", "HostpoolCollector", "register"]

_NAMESPACE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

_LABELS = ("partition",)


class HostpoolCollector(Collector):
    """Collect a ``HostRouter``'s figures on every scrape (a ``prometheus_client`` collector).

    Register it yourself, or pass ``registry=``; one collector per router
    and registry (give a second router its own ``namespace``):

    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> registry = CollectorRegistry()
    >>> collector = HostpoolCollector(router, max_partitions=20, registry=registry)
    >>> print(generate_latest(registry).decode())

    Args:
        router: the router to report.
        namespace: prefix of every metric name.
        max_partitions: partitions shown under their own ``partition``
            label (the ones with the most requests); the others are added up
            under ``partition="other"``. ``0`` shows only ``other``.
        registry: if given, register the collector there.
    """

    def __init__(
        self,
        router: HostRouter,
        *,
        namespace: str = "hostpool",
        max_partitions: int = 50,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"namespace must match [a-zA-Z_][a-zA-Z0-9_]*; got {namespace!r}")
        self._source = _RouterSource(router, max_partitions)
        self.namespace = namespace
        if registry is not None:
            registry.register(self)

    @property
    def router(self) -> HostRouter | None:
        """The router reported on (None once it has been garbage-collected)."""
        return self._source.router

    @property
    def max_partitions(self) -> int:
        """How many partitions are shown under their own label."""
        return self._source.cap.max_partitions

    def describe(self) -> Iterator[Metric]:
        """Yield every metric family, without samples (so registering takes no snapshot)."""
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        """Take a ``stats()`` snapshot and yield every metric family."""
        view = self._source.view()
        if view is None:
            return iter(())
        return self._families(view)

    def _families(self, view: _View | None) -> Iterator[Metric]:
        ns = self.namespace
        series = () if view is None else view.series
        for figure in PARTITION_FIGURES:
            name = figure.prometheus
            if name is None:
                continue  # inside the wait histogram below
            if figure.kind == "gauge":
                family: GaugeMetricFamily | CounterMetricFamily = GaugeMetricFamily(
                    f"{ns}_{name}", figure.help, labels=_LABELS
                )
                index = _GAUGE_INDEX[figure.field]
                for s in series:
                    family.add_metric([s.label], s.gauges[index])
            else:
                family = CounterMetricFamily(f"{ns}_{name}", figure.help, labels=_LABELS)
                index = _COUNTER_INDEX[figure.field]
                for s in series:
                    family.add_metric([s.label], s.counters[index])
            yield family
        wait = HistogramMetricFamily(
            f"{ns}_pool_wait_seconds", _DESCRIPTIONS["wait"], labels=_LABELS
        )
        for s in series:
            buckets = [(str(float(bound)), n) for bound, n in s.wait_buckets()]
            buckets.append(("+Inf", s.counter("wait_count")))
            wait.add_metric([s.label], buckets, s.counter("wait_sum"))
        yield wait

        for figure in ROUTER_FIGURES:
            value = None if view is None else _ROUTER_VALUES[figure.field](view)
            name = f"{ns}_{figure.prometheus}"
            if figure.kind == "gauge":
                yield GaugeMetricFamily(name, figure.help, value=value)
            else:
                yield CounterMetricFamily(name, figure.help, value=value)


def register(
    router: HostRouter,
    registry: CollectorRegistry = REGISTRY,
    *,
    namespace: str = "hostpool",
    max_partitions: int = 50,
) -> HostpoolCollector:
    """Register a :class:`HostpoolCollector` for ``router`` and return it.

    >>> collector = register(router)  # prometheus_client's default REGISTRY
    >>> REGISTRY.unregister(collector)  # when the router goes away
    """
    return HostpoolCollector(
        router, namespace=namespace, max_partitions=max_partitions, registry=registry
    )

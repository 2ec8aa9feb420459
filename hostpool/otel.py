"""Report a ``HostRouter``'s figures as OpenTelemetry metrics.

Needs ``opentelemetry-api`` (``pip install hostpool[otel]``); pick an SDK and an
exporter yourself. :func:`instrument` registers observable instruments whose
callbacks read :meth:`HostRouter.stats() <hostpool.HostRouter.stats>` once per
collection:

>>> from opentelemetry.sdk.metrics import MeterProvider
>>> from opentelemetry.sdk.metrics.export import InMemoryMetricReader
>>> reader = InMemoryMetricReader()
>>> handle = instrument(router, MeterProvider(metric_readers=[reader]))
>>> reader.get_metrics_data()  # every hostpool.* metric, per partition

Per-partition figures carry the attribute ``hostpool.partition``. At most
``max_partitions`` partitions get their own value, the live ones with the
most requests (ties broken by key); every other partition is added into
``hostpool.partition="other"``, so a crawler with ``partition_by="host"``
stays at ``max_partitions + 1`` attribute sets.

Counters stay monotonic per attribute set, so cumulative-to-delta conversion
and rates stay right, and every increment is counted in exactly one
attribute set, however partitions come, go, or move in and out of ``other``:

- a partition moving between its own attribute set and ``other`` leaves
  what it counted behind; only its later increments go to the other one;
- an attribute set that goes away (partition dropped after
  ``partition_idle_timeout``, or moved into ``other``) is remembered at its
  last value, and continues from there if it comes back (for the
  ``10 * max_partitions`` that went away most recently; an older one starts
  again from 0, a counter reset);
- a dropped partition counts with the figures last collected: keep the
  collection interval shorter than ``partition_idle_timeout`` (a partition
  is dropped only after that long without requests) and nothing is lost.

Pool-wait times: the OpenTelemetry API has no observable histogram, so wait
times are two counters, ``hostpool.pool.wait.time`` (seconds waited, in all)
and ``hostpool.pool.wait.count`` (waits recorded). Their rates give the mean
wait over any window, and they add up across partitions, which quantiles do
not. For the distribution, use :mod:`hostpool.prometheus` (a real histogram)
or :meth:`HostRouter.stats() <hostpool.HostRouter.stats>` (p50/p95/p99/max).

It imports ``opentelemetry`` only when :func:`instrument` is called.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from . import __version__
from ._export import (
    _COUNTER_INDEX,
    _GAUGE_INDEX,
    _ROUTER_VALUES,
    OTHER,
    PARTITION_FIGURES,
    ROUTER_FIGURES,
    _RouterSource,
    _Series,
    _View,
)
from ._router import HostRouter

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

__all__ = ["OTHER", "PARTITION_ATTRIBUTE", "Instrumentation", "instrument"]

#: Attribute naming the partition of a per-partition data point.
PARTITION_ATTRIBUTE = "hostpool.partition"

_INSTALL_HINT = (
    "hostpool.otel needs the OpenTelemetry API: pip install 'hostpool[otel]' "
    "(plus an SDK and an exporter, e.g. opentelemetry-sdk)"
)

# ---------------------------------------------------------------------------
# OpenTelemetry
# ---------------------------------------------------------------------------


def _partition_reader(field: str, counter: bool) -> Callable[[_Series], float]:
    if counter:
        index = _COUNTER_INDEX[field]
        return lambda s: s.counters[index]
    index = _GAUGE_INDEX[field]
    return lambda s: s.gauges[index]


class Instrumentation:
    """What :func:`instrument` returns: one router reporting through one meter provider.

    The instruments themselves cannot be removed (the OpenTelemetry API has
    no way to), so :meth:`uninstrument` makes them stop reporting this
    router. It also stops by itself once the router is garbage-collected.

    >>> handle = instrument(router)
    >>> handle.uninstrument()
    """

    def __init__(
        self,
        hub: _Hub,
        router: HostRouter,
        max_partitions: int,
        attributes: Mapping[str, str],
    ) -> None:
        self._hub = hub
        self._source = _RouterSource(router, max_partitions)
        self.attributes: dict[str, str] = dict(attributes)
        self._lock = threading.Lock()
        self._view: _View | None = None
        self._consumed: set[str] = set()
        self._active = True

    @property
    def router(self) -> HostRouter | None:
        """The instrumented router (None once garbage-collected)."""
        return self._source.router

    @property
    def max_partitions(self) -> int:
        """How many partitions are shown by name."""
        return self._source.cap.max_partitions

    @property
    def active(self) -> bool:
        """Whether the instruments still report this router."""
        return self._active and self._source.router is not None

    def uninstrument(self) -> None:
        """Stop reporting this router (idempotent).

        >>> handle.uninstrument()
        >>> handle.active
        False
        """
        self._active = False
        self._hub.remove(self)

    def _current_view(self, instrument_name: str) -> _View | None:
        """Return the snapshot ``instrument_name`` should report.

        One snapshot serves a whole collection: the first callback of a
        collection takes it, the others reuse it, and a callback that already
        had it starts the next collection. So the figures of one export come
        from a single ``stats()`` call, whatever the number of readers.
        """
        if not self._active:
            return None
        with self._lock:
            if self._view is None or instrument_name in self._consumed:
                self._view = self._source.view()
                self._consumed = set()
                if self._view is None:
                    self._active = False
                    self._hub.remove(self)
                    return None
            self._consumed.add(instrument_name)
            return self._view


class _Hub:
    """The instruments of one meter provider, shared by every router reporting there.

    The SDK keeps the first instrument registered under a name and ignores
    the callbacks of later registrations, so instruments are created once
    per provider and their callbacks go over every active
    :class:`Instrumentation`.
    """

    def __init__(self, meter: Meter) -> None:
        from opentelemetry.metrics import Observation

        self._observation = Observation
        self._lock = threading.Lock()
        self._members: list[Instrumentation] = []
        for figure in PARTITION_FIGURES:
            counter = figure.kind == "counter"
            create = (
                meter.create_observable_counter
                if counter
                else meter.create_observable_up_down_counter
            )
            reader = _partition_reader(figure.field, counter=counter)
            create(
                figure.otel,
                [self._partition_callback(figure.otel, reader)],
                figure.unit,
                figure.help,
            )
        for figure in ROUTER_FIGURES:
            create = (
                meter.create_observable_counter
                if figure.kind == "counter"
                else meter.create_observable_up_down_counter
            )
            create(
                figure.otel,
                [self._router_callback(figure.otel, _ROUTER_VALUES[figure.field])],
                figure.unit,
                figure.help,
            )

    def add(self, member: Instrumentation) -> None:
        with self._lock:
            for other in self._members:
                if other.active and other.attributes == member.attributes:
                    raise ValueError(
                        "another HostRouter already reports through this meter provider with "
                        f"attributes {member.attributes!r}; pass distinct attributes= "
                        "(e.g. {'hostpool.router': 'crawler'}) or uninstrument it first"
                    )
            self._members.append(member)

    def remove(self, member: Instrumentation) -> None:
        with self._lock:
            if member in self._members:
                self._members.remove(member)

    def _active(self) -> list[Instrumentation]:
        with self._lock:
            return list(self._members)

    def _partition_callback(
        self, name: str, read: Callable[[_Series], float]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            out: list[Observation] = []
            for member in self._active():
                view = member._current_view(name)
                if view is None:
                    continue
                for series in view.series:
                    attributes = {**member.attributes, PARTITION_ATTRIBUTE: series.label}
                    out.append(self._observation(read(series), attributes))
            return out

        return callback

    def _router_callback(
        self, name: str, read: Callable[[_View], float]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            out: list[Observation] = []
            for member in self._active():
                view = member._current_view(name)
                if view is not None:
                    out.append(self._observation(read(view), dict(member.attributes)))
            return out

        return callback


_hubs: weakref.WeakKeyDictionary[MeterProvider, _Hub] = weakref.WeakKeyDictionary()
_hubs_lock = threading.Lock()


def _hub_for(provider: MeterProvider) -> _Hub:
    with _hubs_lock:
        try:
            hub = _hubs.get(provider)
        except TypeError:  # a provider that cannot be weakly referenced
            return _Hub(provider.get_meter("hostpool", __version__))
        if hub is None:
            hub = _hubs[provider] = _Hub(provider.get_meter("hostpool", __version__))
        return hub


def instrument(
    router: HostRouter,
    meter_provider: MeterProvider | None = None,
    *,
    max_partitions: int = 50,
    attributes: Mapping[str, str] | None = None,
) -> Instrumentation:
    """Report ``router``'s figures through OpenTelemetry observable instruments.

    Instruments (meter ``hostpool``), each per partition with the attribute
    ``hostpool.partition``:

    - up-down counters: ``hostpool.requests.in_flight``,
      ``hostpool.requests.waiting`` (``{request}``),
      ``hostpool.connections.open``, ``hostpool.connections.idle``,
      ``hostpool.quota.max_connections``, ``hostpool.quota.reserved``
      (``{connection}``);
    - counters: ``hostpool.requests``, ``hostpool.requests.completed``,
      ``hostpool.requests.failed``, ``hostpool.pool.timeouts``,
      ``hostpool.pool.overflows``, ``hostpool.pool.reserved_admissions``,
      ``hostpool.pool.wait.count`` (``{request}``),
      ``hostpool.connections.opened``, ``hostpool.connections.evicted``
      (``{connection}``), ``hostpool.pool.wait.time`` (``s``).

    Router-wide, without ``hostpool.partition``: ``hostpool.budget.connections``,
    ``hostpool.budget.keepalive``, ``hostpool.shared_slots.limit``,
    ``hostpool.shared_slots.usage``, ``hostpool.partitions``,
    ``hostpool.partitions.other`` (up-down counters) and
    ``hostpool.partitions.created``, ``hostpool.partitions.dropped`` (counters).

    At most ``max_partitions`` partitions are reported by name, the live ones
    with the most requests (ties broken by key); the others are added up in
    ``hostpool.partition="other"``. Counters never go down for an attribute
    set, and count every increment once, as partitions move or are dropped
    (see the module documentation).

    ``meter_provider`` defaults to the global one. Several routers may
    report through one provider if each passes distinct ``attributes``
    (added to every data point).

    >>> handle = instrument(router, max_partitions=20, attributes={"hostpool.router": "api"})

    Raise ``ImportError`` if ``opentelemetry-api`` is not installed.
    """
    try:
        from opentelemetry.metrics import get_meter_provider
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    provider = get_meter_provider() if meter_provider is None else meter_provider
    hub = _hub_for(provider)
    member = Instrumentation(hub, router, max_partitions, attributes or {})
    hub.add(member)
    return member

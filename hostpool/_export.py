"""Exporter-neutral bookkeeping shared by :mod:`hostpool.prometheus` and :mod:`hostpool.otel`.

The partition cap (at most ``max_partitions`` series by name, the rest summed
into ``other``) and the offsets that keep every counter monotonic per series
while partitions come, go, or move in and out of ``other``. Needs neither
metrics library.
"""

from __future__ import annotations

import heapq
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from ._router import HostRouter
from ._stats import WAIT_BUCKETS, PartitionStats, RouterStats

#: Label / attribute value of the series that adds up every partition not shown by name.
OTHER = "other"


_REQUEST = "{request}"
_CONNECTION = "{connection}"
_PARTITION = "{partition}"


@dataclass(frozen=True)
class Figure:
    """One figure both exporters publish: the schema of the metrics, in one place.

    ``field`` names it in :class:`~hostpool.PartitionStats` (per-partition
    figures) or in the router view (router-wide ones); ``prometheus`` is its
    name after the namespace (None: published only inside the wait
    histogram), ``otel`` its instrument name, ``unit`` its OpenTelemetry unit.
    """

    field: str
    kind: Literal["gauge", "counter"]
    unit: str
    help: str
    prometheus: str | None
    otel: str


#: Per-partition figures, gauges first: the order of :attr:`_Series.gauges`
#: and :attr:`_Series.counters` (the cumulative wait-bucket counts, one per
#: bound of ``WAIT_BUCKETS``, follow the counters).
PARTITION_FIGURES: tuple[Figure, ...] = (
    Figure("in_flight", "gauge", _REQUEST,
           "Requests holding a slot of the partition's quota.",
           "requests_in_flight", "hostpool.requests.in_flight"),
    Figure("waiting", "gauge", _REQUEST,
           "Requests waiting for a slot of the partition's quota.",
           "requests_waiting", "hostpool.requests.waiting"),
    Figure("sockets_open", "gauge", _CONNECTION,
           "Open sockets of the partition, active and idle.",
           "connections_open", "hostpool.connections.open"),
    Figure("sockets_idle", "gauge", _CONNECTION,
           "Idle keep-alive sockets of the partition.",
           "connections_idle", "hostpool.connections.idle"),
    Figure("max_connections", "gauge", _CONNECTION,
           "The max_connections of the partition's quota.",
           "quota_max_connections", "hostpool.quota.max_connections"),
    Figure("reserved", "gauge", _CONNECTION,
           "Budget slots reserved for the partition's quota group.",
           "quota_reserved", "hostpool.quota.reserved"),
    Figure("paused", "gauge", _PARTITION,
           "1 while the partition is paused by its upstream's Retry-After.",
           "paused", "hostpool.paused"),
    Figure("requests", "counter", _REQUEST,
           "Requests that asked the partition for a slot.",
           "requests", "hostpool.requests"),
    Figure("requests_completed", "counter", _REQUEST,
           "Requests that released their slot normally.",
           "requests_completed", "hostpool.requests.completed"),
    Figure("requests_failed", "counter", _REQUEST,
           "Requests that released their slot with an error.",
           "requests_failed", "hostpool.requests.failed"),
    Figure("connections_opened", "counter", _CONNECTION,
           "Sockets opened by the partition.",
           "connections_opened", "hostpool.connections.opened"),
    Figure("pool_timeouts", "counter", _REQUEST,
           "Requests that gave up waiting for a slot (pool timeout).",
           "pool_timeouts", "hostpool.pool.timeouts"),
    Figure("overflows", "counter", _REQUEST,
           "Requests rejected at once because max_pending requests were waiting.",
           "pool_overflows", "hostpool.pool.overflows"),
    Figure("evictions", "counter", _CONNECTION,
           "Idle sockets of the partition closed to respect a keepalive or budget limit.",
           "connections_evicted", "hostpool.connections.evicted"),
    Figure("reserved_admissions", "counter", _REQUEST,
           "Requests admitted on a reserved slot, every shared slot being taken.",
           "pool_reserved_admissions", "hostpool.pool.reserved_admissions"),
    Figure("rate_delayed", "counter", _REQUEST,
           "Requests that waited for a start of the partition's local rate.",
           "rate_delayed", "hostpool.rate.delayed"),
    Figure("pauses", "counter", "{pause}",
           "Retry-After answers (429/503) that paused the partition.",
           "pauses", "hostpool.pauses"),
    Figure("pause_delayed", "counter", _REQUEST,
           "Requests held back by a Retry-After pause.",
           "pause_delayed", "hostpool.pause.delayed"),
    Figure("fleet_waits", "counter", _REQUEST,
           "Requests that waited for the fleet quota (connections or rate).",
           "fleet_waits", "hostpool.fleet.waits"),
    Figure("fleet_unavailable", "counter", _REQUEST,
           "Admissions that found the fleet's store unavailable.",
           "fleet_unavailable", "hostpool.fleet.unavailable"),
    Figure("fleet_leases_lost", "counter", _REQUEST,
           "Fleet leases that expired while their request still ran.",
           "fleet_leases_lost", "hostpool.fleet.leases_lost"),
    Figure("wait_count", "counter", _REQUEST,
           "Waits for a slot recorded (zero-length ones included).",
           None, "hostpool.pool.wait.count"),
    Figure("wait_sum", "counter", "s",
           "Time requests spent waiting for a slot.",
           None, "hostpool.pool.wait.time"),
)  # fmt: skip

#: Router-wide figures (values from ``_ROUTER_VALUES``).
ROUTER_FIGURES: tuple[Figure, ...] = (
    Figure("budget", "gauge", _CONNECTION,
           "The router's max_connections: sockets open at most across all partitions.",
           "budget_connections", "hostpool.budget.connections"),
    Figure("max_keepalive", "gauge", _CONNECTION,
           "The router's max_keepalive_connections.",
           "budget_keepalive_connections", "hostpool.budget.keepalive"),
    Figure("shared_slots", "gauge", _CONNECTION,
           "Budget slots not reserved by any quota, borrowable by every partition.",
           "shared_slots", "hostpool.shared_slots.limit"),
    Figure("shared_in_use", "gauge", _CONNECTION,
           "Shared (unreserved) budget slots in use.",
           "shared_slots_in_use", "hostpool.shared_slots.usage"),
    Figure("partitions", "gauge", _PARTITION,
           "Live partitions.",
           "partitions", "hostpool.partitions"),
    Figure("partitions_other", "gauge", _PARTITION,
           "Live partitions shown only as part of the 'other' series.",
           "partitions_other", "hostpool.partitions.other"),
    Figure("partitions_created", "counter", _PARTITION,
           "Partitions created.",
           "partitions_created", "hostpool.partitions.created"),
    Figure("partitions_dropped", "counter", _PARTITION,
           "Partitions dropped after partition_idle_timeout without use.",
           "partitions_dropped", "hostpool.partitions.dropped"),
)  # fmt: skip

_GAUGE_FIELDS: tuple[str, ...] = tuple(f.field for f in PARTITION_FIGURES if f.kind == "gauge")
_COUNTER_FIELDS: tuple[str, ...] = tuple(f.field for f in PARTITION_FIGURES if f.kind == "counter")
_GAUGE_INDEX = {name: i for i, name in enumerate(_GAUGE_FIELDS)}
_COUNTER_INDEX = {name: i for i, name in enumerate(_COUNTER_FIELDS)}
_BUCKETS_AT = len(_COUNTER_FIELDS)
_WIDTH = _BUCKETS_AT + len(WAIT_BUCKETS)
_ZEROS: tuple[float, ...] = (0,) * _WIDTH

#: How each per-partition figure is read off a snapshot (a field of the same
#: name, unless listed here).
_READERS: dict[str, Callable[[PartitionStats], float]] = {
    "max_connections": lambda p: p.quota.max_connections,
    "reserved": lambda p: p.quota.reserved,
    "paused": lambda p: int(p.paused_for > 0),
    "wait_count": lambda p: p.wait.count,
    "wait_sum": lambda p: p.wait.total,
}

#: One-line descriptions, shared by both exporters.
_DESCRIPTIONS: dict[str, str] = {
    **{f.field: f.help for f in (*PARTITION_FIGURES, *ROUTER_FIGURES)},
    "wait": "Time requests waited for a slot of the partition's quota.",
}


@dataclass(frozen=True)
class _Series:
    """The figures of one ``partition`` label: a partition, or ``other``."""

    label: str
    gauges: tuple[int, ...]
    counters: tuple[float, ...]

    def counter(self, name: str) -> float:
        return self.counters[_COUNTER_INDEX[name]]

    def wait_buckets(self) -> tuple[tuple[float, float], ...]:
        """Return ``(bound, waits <= bound)`` for each of ``WAIT_BUCKETS``."""
        return tuple(zip(WAIT_BUCKETS, self.counters[_BUCKETS_AT:], strict=True))


@dataclass(frozen=True)
class _View:
    """One collection: the router snapshot and the capped series."""

    stats: RouterStats
    series: tuple[_Series, ...]
    partitions_other: int


@dataclass
class _Track:
    """What the cap remembers of one live partition.

    Its series shows ``base + (counts - offset)``: ``offset`` is what the
    partition had counted before joining its series (or, in ``other``, what
    it counted elsewhere), ``base`` what its named series showed before
    (zero for ``other``, whose total lives in ``_PartitionCap._retired``).
    ``last`` is its counts at the previous collection, ``identity`` the
    router's object for it (a new one means the key was dropped and
    re-created in between).
    """

    named: bool
    offset: tuple[float, ...]
    last: tuple[float, ...]
    base: tuple[float, ...]
    identity: object


def _read(field: str) -> Callable[[PartitionStats], float]:
    reader = _READERS.get(field)
    if reader is not None:
        return reader
    return lambda p: float(getattr(p, field))


_GAUGE_READERS = tuple(_read(name) for name in _GAUGE_FIELDS)
_COUNTER_READERS = tuple(_read(name) for name in _COUNTER_FIELDS)


def _gauges(p: PartitionStats) -> tuple[int, ...]:
    return tuple(int(read(p)) for read in _GAUGE_READERS)


def _counters(p: PartitionStats) -> tuple[float, ...]:
    cumulative = dict(p.wait.buckets)
    return (
        *(read(p) for read in _COUNTER_READERS),
        *(cumulative.get(bound, 0) for bound in WAIT_BUCKETS),
    )


def _sub(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(x - y for x, y in zip(a, b, strict=True))


def _add_into(total: list[float], values: Iterable[float]) -> None:
    for i, value in enumerate(values):
        total[i] += value


def _rank(p: PartitionStats) -> tuple[int, str]:
    return (-p.requests, p.key)


def _check_max_partitions(max_partitions: int) -> int:
    """Return ``max_partitions`` if it is an int >= 0; raise otherwise."""
    if isinstance(max_partitions, bool) or not isinstance(max_partitions, int):
        raise TypeError(f"max_partitions must be an int, not {max_partitions!r}")
    if max_partitions < 0:
        raise ValueError(f"max_partitions must be >= 0; got {max_partitions}")
    return max_partitions


class _PartitionCap:
    """Turn router snapshots into at most ``max_partitions`` named series plus ``other``.

    At each :meth:`update`, the live partitions with the most requests (ties
    broken by key) are named; the rest are summed into ``other``. A partition
    keyed ``"other"`` is always in ``other``. ``other`` appears once a
    partition has been put in it, and stays.

    Counters: each series only ever grows, for the life of the exporter, and
    every increment of a partition's counters shows up in exactly one series,
    so ``rate()``/``increase()`` and cumulative-to-delta conversion stay right
    however partitions move:

    - a partition moving out of a series leaves what it counted there; the
      series it joins counts only its increments from then on;
    - a series whose label goes away (its partition dropped, or moved into
      ``other``) is remembered at its last value and, if the label comes
      back (the host is used again, or gets busy enough), continues from it.
      The memory keeps the ``10 * max_partitions`` labels that went away
      last; an older label that comes back starts again from 0, which
      Prometheus reads as a counter reset;
    - a dropped partition's counts are the ones last collected. Nothing is
      lost when collections come more often than ``partition_idle_timeout``,
      since a partition is dropped only after that long without requests;
    - a key dropped and re-created between two collections (the usual case:
      a partition idle for ``partition_idle_timeout`` is dropped by the very
      request that re-creates it) is handled as a drop followed by a new
      partition;
    - a partition created and dropped between two collections is never seen,
      so keep ``partition_idle_timeout`` longer than the collection interval.

    Thread-safe: scrapes may run in other threads than the router's.
    """

    def __init__(self, max_partitions: int) -> None:
        self.max_partitions = _check_max_partitions(max_partitions)
        self._lock = threading.Lock()
        self._tracked: dict[str, _Track] = {}
        # Last values of named series whose label went away, oldest first.
        self._carried: OrderedDict[str, tuple[float, ...]] = OrderedDict()
        self._carry_limit = 10 * self.max_partitions
        # What "other" counted for partitions no longer in it.
        self._retired: list[float] = list(_ZEROS)
        self._other_shown = False

    def update(self, stats: RouterStats, identities: Mapping[str, object]) -> _View:
        """Return the capped series of ``stats`` and remember what was shown.

        ``identities`` maps partition keys to objects that change when a key
        is dropped and re-created (the router's partition objects).
        """
        with self._lock:
            return self._update(stats, identities)

    def _carry(self, label: str, values: tuple[float, ...]) -> None:
        self._carried[label] = values
        self._carried.move_to_end(label)
        while len(self._carried) > self._carry_limit:
            self._carried.popitem(last=False)

    def _leave(self, label: str, track: _Track) -> None:
        """Take a partition out of its series, as of the previous collection."""
        shown = _sub(track.last, track.offset)
        if track.named:
            self._carry(label, tuple(a + b for a, b in zip(track.base, shown, strict=True)))
        else:
            _add_into(self._retired, shown)

    def _update(self, stats: RouterStats, identities: Mapping[str, object]) -> _View:
        live = stats.partitions
        eligible = (p for p in live.values() if p.key != OTHER)
        chosen = {p.key for p in heapq.nsmallest(self.max_partitions, eligible, key=_rank)}
        tracked = self._tracked
        for key in [k for k in tracked if k not in live]:
            self._leave(key, tracked.pop(key))
        named: list[_Series] = []
        other_gauges = [0] * len(_GAUGE_FIELDS)
        other_counters: list[float] = list(_ZEROS)
        in_other = 0
        for key, partition in live.items():
            now = _counters(partition)
            shown = key in chosen
            identity = identities.get(key)
            track = tracked.get(key)
            if track is not None and identity is not None and identity != track.identity:
                # Dropped and re-created since the previous collection.
                self._leave(key, track)
                track = None
            if track is None:
                track = tracked[key] = _Track(False, _ZEROS, _ZEROS, _ZEROS, identity)
                if shown:
                    track.named = True
                    track.base = self._carried.pop(key, _ZEROS)
            elif shown != track.named:
                # Increments up to the previous collection stay where they
                # were counted; later ones go to the new series.
                self._leave(key, track)
                track.offset = track.last
                track.named = shown
                track.base = self._carried.pop(key, _ZEROS) if shown else _ZEROS
            track.last = now
            values = _sub(now, track.offset)
            gauges = _gauges(partition)
            if shown:
                counters = tuple(a + b for a, b in zip(track.base, values, strict=True))
                named.append(_Series(key, gauges, counters))
            else:
                in_other += 1
                other_gauges = [a + b for a, b in zip(other_gauges, gauges, strict=True)]
                _add_into(other_counters, values)
        _add_into(other_counters, self._retired)
        if in_other:
            self._other_shown = True
        named.sort(key=lambda s: s.label)
        if self._other_shown:
            named.append(_Series(OTHER, tuple(other_gauges), tuple(other_counters)))
        return _View(stats, tuple(named), in_other)


#: Router-wide figures, by field.
_ROUTER_VALUES: dict[str, Callable[[_View], float]] = {
    "budget": lambda v: v.stats.budget,
    "max_keepalive": lambda v: v.stats.max_keepalive,
    "shared_slots": lambda v: v.stats.shared_slots,
    "shared_in_use": lambda v: v.stats.shared_in_use,
    "partitions": lambda v: len(v.stats.partitions),
    "partitions_other": lambda v: v.partitions_other,
    "partitions_created": lambda v: v.stats.partitions_created,
    "partitions_dropped": lambda v: v.stats.partitions_dropped,
}


class _RouterSource:
    """A router, held weakly, and the :class:`_PartitionCap` of one exporter."""

    def __init__(self, router: HostRouter, max_partitions: int) -> None:
        if not isinstance(router, HostRouter):
            raise TypeError(f"expected a hostpool.HostRouter, not {type(router).__name__}")
        self._router = weakref.ref(router)
        self.cap = _PartitionCap(max_partitions)

    @property
    def router(self) -> HostRouter | None:
        """The router, or None once it has been garbage-collected."""
        return self._router()

    def view(self) -> _View | None:
        """Take a snapshot; return None when the router is gone."""
        router = self._router()
        if router is None:
            return None
        # A partition dropped and created again has a new serial.
        stats = router.stats()
        identities = {key: p.serial for key, p in stats.partitions.items()}
        return self.cap.update(stats, identities)

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

from ._router import HostRouter
from ._stats import WAIT_BUCKETS, PartitionStats, RouterStats

#: Label / attribute value of the series that adds up every partition not shown by name.
OTHER = "other"


#: Per-partition gauges, in the order of :attr:`_Series.gauges`.
_GAUGE_FIELDS: tuple[str, ...] = (
    "in_flight",
    "waiting",
    "sockets_open",
    "sockets_idle",
    "max_connections",
    "reserved",
)

#: Per-partition counters, in the order of :attr:`_Series.counters`; the
#: cumulative wait-bucket counts (one per bound of ``WAIT_BUCKETS``) follow.
_COUNTER_FIELDS: tuple[str, ...] = (
    "requests",
    "requests_completed",
    "requests_failed",
    "connections_opened",
    "pool_timeouts",
    "overflows",
    "evictions",
    "reserved_admissions",
    "wait_count",
    "wait_sum",
)

_GAUGE_INDEX = {name: i for i, name in enumerate(_GAUGE_FIELDS)}
_COUNTER_INDEX = {name: i for i, name in enumerate(_COUNTER_FIELDS)}
_BUCKETS_AT = len(_COUNTER_FIELDS)
_WIDTH = _BUCKETS_AT + len(WAIT_BUCKETS)
_ZEROS: tuple[float, ...] = (0,) * _WIDTH

#: One-line descriptions, shared by both exporters.
_DESCRIPTIONS: dict[str, str] = {
    "in_flight": "Requests holding a slot of the partition's quota.",
    "waiting": "Requests waiting for a slot of the partition's quota.",
    "sockets_open": "Open sockets of the partition, active and idle.",
    "sockets_idle": "Idle keep-alive sockets of the partition.",
    "max_connections": "The max_connections of the partition's quota.",
    "reserved": "Budget slots reserved for the partition's quota group.",
    "requests": "Requests that asked the partition for a slot.",
    "requests_completed": "Requests that released their slot normally.",
    "requests_failed": "Requests that released their slot with an error.",
    "connections_opened": "Sockets opened by the partition.",
    "pool_timeouts": "Requests that gave up waiting for a slot (pool timeout).",
    "overflows": "Requests rejected at once because max_pending requests were waiting.",
    "evictions": "Idle sockets of the partition closed to respect a keepalive or budget limit.",
    "reserved_admissions": "Requests admitted on a reserved slot, every shared slot being taken.",
    "wait_count": "Waits for a slot recorded (zero-length ones included).",
    "wait_sum": "Time requests spent waiting for a slot.",
    "wait": "Time requests waited for a slot of the partition's quota.",
    "budget": "The router's max_connections: sockets open at most across all partitions.",
    "max_keepalive": "The router's max_keepalive_connections.",
    "shared_slots": "Budget slots not reserved by any quota, borrowable by every partition.",
    "shared_in_use": "Shared (unreserved) budget slots in use.",
    "partitions": "Live partitions.",
    "partitions_other": "Live partitions shown only as part of the 'other' series.",
    "partitions_created": "Partitions created.",
    "partitions_dropped": "Partitions dropped after partition_idle_timeout without use.",
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


def _gauges(p: PartitionStats) -> tuple[int, ...]:
    return (
        p.in_flight,
        p.waiting,
        p.sockets_open,
        p.sockets_idle,
        p.quota.max_connections,
        p.quota.reserved,
    )


def _counters(p: PartitionStats) -> tuple[float, ...]:
    wait = p.wait
    cumulative = dict(wait.buckets)
    return (
        p.requests,
        p.requests_completed,
        p.requests_failed,
        p.connections_opened,
        p.pool_timeouts,
        p.overflows,
        p.evictions,
        p.reserved_admissions,
        wait.count,
        wait.total,
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

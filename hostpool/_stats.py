"""Counters kept per partition, and the immutable snapshots ``stats()`` returns.

Plain data, no I/O. Recording is O(1) per request and memory is bounded: the
pool-wait figures live in a fixed log-scale histogram, not a list of samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from ._quota import Quota

__all__ = [
    "WAIT_BUCKETS",
    "PartitionStats",
    "RequestCounts",
    "RouterStats",
    "WaitHistogram",
    "WaitSummary",
]

# Bucket i holds waits in [BASE * GROWTH**(i-1), BASE * GROWTH**i); bucket 0
# holds everything below BASE (including "no wait at all"). 10 µs to ~10 min
# at 10% resolution takes 190 buckets.
_BASE = 1e-5
_GROWTH = 1.1
_BUCKETS = 192
_LOG_GROWTH = math.log(_GROWTH)

#: Upper bounds (seconds) of the cumulative wait buckets in :class:`WaitSummary`,
#: the usual Prometheus latency buckets.
WAIT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def _bucket_upper(index: int) -> float:
    return _BASE * _GROWTH**index


@dataclass(frozen=True)
class WaitSummary:
    """Pool-wait times of one partition: how long requests waited for a slot.

    Quantiles come from a log-scale histogram and are accurate to about 10%.
    All figures are seconds. ``buckets`` pairs each bound of
    :data:`WAIT_BUCKETS` with the number of waits at or below it (cumulative,
    as a Prometheus histogram wants them; within the same 10%).
    """

    count: int = 0
    total: float = 0.0
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    buckets: tuple[tuple[float, int], ...] = ()

    @property
    def mean(self) -> float:
        """Mean wait in seconds (0 when nothing was recorded)."""
        return self.total / self.count if self.count else 0.0


class WaitHistogram:
    """A bounded, O(1)-per-sample histogram of wait times.

    Buckets are kept sparse, so a partition whose requests never wait costs
    one counter and no dict at all (most partitions of a crawler): waits
    below the first bucket's bound are counted in ``zero``, the rest in a
    dict created on the first real wait.
    """

    __slots__ = ("_waits", "count", "max", "total", "zero")

    def __init__(self) -> None:
        self._waits: dict[int, int] | None = None
        self.zero = 0
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    @property
    def buckets(self) -> dict[int, int]:
        """Samples per bucket index (a new dict; bucket 0 holds waits below 10 µs)."""
        out = {0: self.zero} if self.zero else {}
        if self._waits:
            out.update(self._waits)
        return out

    def record(self, seconds: float) -> None:
        """Add one wait of ``seconds``."""
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds
        if seconds < _BASE:
            self.zero += 1
            return
        index = min(_BUCKETS - 1, int(math.log(seconds / _BASE) / _LOG_GROWTH) + 1)
        waits = self._waits
        if waits is None:
            waits = self._waits = {}
        waits[index] = waits.get(index, 0) + 1

    def merge(self, other: WaitHistogram) -> None:
        """Add every sample of ``other`` to this histogram."""
        self.zero += other.zero
        if other._waits:
            waits = self._waits
            if waits is None:
                waits = self._waits = {}
            for i, n in other._waits.items():
                waits[i] = waits.get(i, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def quantiles(self, *qs: float) -> tuple[float, ...]:
        """Return the upper edge of the bucket holding each quantile (capped at the max)."""
        if not self.count:
            return tuple(0.0 for _ in qs)
        ranked = sorted(self.buckets.items())
        out: list[float] = []
        for q in qs:
            rank = q * self.count
            seen = 0
            value = self.max
            for i, n in ranked:
                seen += n
                if seen >= rank:
                    value = 0.0 if i == 0 else min(_bucket_upper(i), self.max)
                    break
            out.append(value)
        return tuple(out)

    def summary(self) -> WaitSummary:
        """Return an immutable summary."""
        if not self.count:
            return _EMPTY_SUMMARY
        p50, p95, p99 = self.quantiles(0.50, 0.95, 0.99)
        return WaitSummary(
            count=self.count,
            total=self.total,
            p50=p50,
            p95=p95,
            p99=p99,
            max=self.max,
            buckets=self.cumulative(WAIT_BUCKETS),
        )

    def cumulative(self, bounds: tuple[float, ...]) -> tuple[tuple[float, int], ...]:
        """Return ``(bound, waits <= bound)`` for each bound, from the log buckets."""
        ranked = sorted(self.buckets.items())
        out: list[tuple[float, int]] = []
        seen = 0
        position = 0
        for bound in bounds:
            while position < len(ranked) and _bucket_upper(ranked[position][0]) <= bound * 1.000001:
                seen += ranked[position][1]
                position += 1
            out.append((bound, seen))
        return tuple(out)


_EMPTY_SUMMARY = WaitSummary(buckets=tuple((bound, 0) for bound in WAIT_BUCKETS))


@dataclass(slots=True)
class RequestCounts:
    """What became of the requests of a partition (or of the partitions gone).

    Kept per partition on the request path, folded into the router's totals
    when a partition is dropped, and spread into both snapshots by name: the
    fields here are fields of :class:`PartitionStats` and :class:`RouterStats`.
    """

    requests: int = 0
    requests_completed: int = 0
    requests_failed: int = 0
    pool_timeouts: int = 0
    overflows: int = 0
    # The upstream's limits (README: "Limits that belong to the upstream").
    rate_delayed: int = 0
    pauses: int = 0
    pause_delayed: int = 0
    fleet_waits: int = 0
    fleet_unavailable: int = 0
    fleet_leases_lost: int = 0

    def add(self, other: RequestCounts) -> None:
        """Add ``other``'s counts to these."""
        for name in _COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_fields(self) -> dict[str, int]:
        """Return the counts by field name, to build a snapshot with."""
        return {name: getattr(self, name) for name in _COUNT_FIELDS}


_COUNT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RequestCounts))


@dataclass(frozen=True)
class PartitionStats:
    """A snapshot of one partition.

    ``connections_opened / requests_completed`` is the churn ratio: near 0
    means sockets are reused, near 1 means almost every request pays for a
    new connection. ``reserved_admissions`` counts requests admitted only
    thanks to the reservation, while every shared slot was in use.
    ``peak_in_flight`` and ``peak_waiting`` are highs since the partition was
    created. The upstream's limits: ``rate_delayed`` requests waited for a
    start of the local rate, ``pauses`` Retry-After answers paused the
    partition (``paused_for``: seconds of pause left now), ``pause_delayed``
    requests waited out (or timed out in) a pause, ``fleet_waits`` requests
    waited for the fleet, ``fleet_unavailable`` admissions found the fleet's
    store unavailable, ``fleet_leases_lost`` leases expired while held.
    ``serial`` numbers partitions in order of creation: a partition
    dropped after ``partition_idle_timeout`` and created again has a new one.
    """

    key: str
    serial: int
    quota: Quota
    quota_key: str
    in_flight: int
    waiting: int
    sockets_open: int
    sockets_idle: int
    connections_opened: int
    requests: int
    requests_completed: int
    requests_failed: int
    pool_timeouts: int
    overflows: int
    evictions: int
    peak_in_flight: int
    peak_waiting: int
    reserved_admissions: int
    wait: WaitSummary = field(default_factory=WaitSummary)
    rate_delayed: int = 0
    pauses: int = 0
    pause_delayed: int = 0
    fleet_waits: int = 0
    fleet_unavailable: int = 0
    fleet_leases_lost: int = 0
    paused_for: float = 0.0

    @property
    def churn(self) -> float:
        """Connections opened per completed request."""
        return self.connections_opened / self.requests_completed if self.requests_completed else 0.0


@dataclass(frozen=True)
class RouterStats:
    """A snapshot of a whole router: totals, and one entry per live partition.

    Partitions dropped after ``partition_idle_timeout`` no longer appear;
    their counts stay in the totals.
    """

    budget: int
    max_keepalive: int
    shared_slots: int
    shared_in_use: int
    in_flight: int
    waiting: int
    sockets_open: int
    sockets_idle: int
    connections_opened: int
    requests: int
    requests_completed: int
    requests_failed: int
    pool_timeouts: int
    overflows: int
    evictions: int
    partitions_created: int
    partitions_dropped: int
    wait: WaitSummary
    partitions: Mapping[str, PartitionStats]
    rate_delayed: int = 0
    pauses: int = 0
    pause_delayed: int = 0
    fleet_waits: int = 0
    fleet_unavailable: int = 0
    fleet_leases_lost: int = 0
    #: True while the fleet's store is unavailable and admission falls back
    #: (``on_unavailable="local"``) or fails (``"fail"``).
    fleet_degraded: bool = False

"""Turn a stats snapshot into findings in plain words, with a suggested setting.

Pure functions over :class:`~hostpool.RouterStats`: no I/O, no clock. The
signals are the warning signs of a connection pool: waits and timeouts (pool
too small), connection churn (keepalive too low or sockets dropped), keepalive
close to the cap, no pool timeout, and reservations that never helped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ._quota import Quota
from ._stats import PartitionStats, RouterStats

__all__ = ["Finding", "diagnose"]

Severity = Literal["warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One thing worth changing, for one partition (or ``"*"`` for the router).

    ``problem`` names the sign, ``figure`` the numbers behind it and
    ``suggestion`` a setting to try. ``str(finding)`` reads as one sentence.
    """

    partition: str
    problem: str
    figure: str
    suggestion: str
    severity: Severity = "warning"

    def __str__(self) -> str:
        return f"{self.partition}: {self.problem} ({self.figure}). {self.suggestion}"


def diagnose(
    stats: RouterStats,
    *,
    default_pool_timeout: float | None,
    min_requests: int = 20,
    reserved_keys: dict[str, Quota] | None = None,
) -> list[Finding]:
    """Return findings for a snapshot, most serious first.

    Partitions with fewer than ``min_requests`` requests are judged on hard
    failures only (timeouts, rejections): too little traffic to read more into.
    """
    findings: list[Finding] = []
    for partition in sorted(stats.partitions.values(), key=lambda p: p.key):
        findings.extend(_pool_too_small(partition, stats))
        if partition.requests >= min_requests:
            findings.extend(_churn(partition))
            findings.extend(_reservation_unused(partition))
        findings.extend(_keepalive_near_cap(partition))
        findings.extend(_no_pool_timeout(partition, default_pool_timeout))
        findings.extend(_upstream_pushed_back(partition))
        findings.extend(_fleet_trouble(partition))
    for key, quota in (reserved_keys or {}).items():
        if quota.reserved and key not in stats.partitions:
            findings.append(
                Finding(
                    key,
                    "reservation held for a host that sent no request",
                    f"reserved={quota.reserved} of budget {stats.budget}",
                    f"If {key} is no longer called, drop its quota or set reserved=0 "
                    "to give those slots back to the shared pool.",
                    "info",
                )
            )
    findings.sort(key=lambda f: (f.severity != "warning", f.partition))
    return findings


def _pool_too_small(p: PartitionStats, stats: RouterStats) -> list[Finding]:
    failed = p.pool_timeouts + p.overflows
    waited_often = p.wait.count >= 20 and p.wait.p95 >= 0.05
    if not failed and not waited_often:
        return []
    cap = p.quota.max_connections
    wanted = max(cap + 1, p.peak_in_flight + p.peak_waiting)
    # Suggest what the partition asked for, within the budget it shares.
    suggested = min(wanted, stats.budget)
    if failed:
        figure = (
            f"{p.pool_timeouts} pool timeouts, {p.overflows} rejected over max_pending, "
            f"of {p.requests} requests"
        )
    else:
        figure = f"pool wait p95 {p.wait.p95 * 1000:.0f} ms, p99 {p.wait.p99 * 1000:.0f} ms"
    limited_by = "its quota" if p.peak_in_flight >= cap else "the router budget"
    if limited_by == "its quota":
        suggestion = (
            f"Requests queued behind {limited_by} ({cap} in flight): try "
            f"max_connections={suggested} for {p.quota_key!r}, if the upstream can take it."
        )
    else:
        suggestion = (
            f"Requests queued behind {limited_by} ({stats.budget} in all, "
            f"{stats.shared_slots} shared): raise limits.max_connections, or give this "
            f"host reserved slots (reserved={min(cap, max(1, p.peak_in_flight))})."
        )
    return [Finding(p.key, "pool too small: requests wait for a slot", figure, suggestion)]


def _churn(p: PartitionStats) -> list[Finding]:
    if not p.requests_completed or p.churn < 0.5:
        return []
    keepalive = p.quota.keepalive
    figure = (
        f"{p.connections_opened} connections opened for {p.requests_completed} requests "
        f"({p.churn:.0%}), {p.evictions} idle sockets evicted"
    )
    if keepalive < p.peak_in_flight:
        suggestion = (
            f"Keepalive ({keepalive}) is below the concurrency seen ({p.peak_in_flight}): "
            f"try max_keepalive_connections={p.peak_in_flight} for {p.quota_key!r}."
        )
    elif p.evictions:
        suggestion = (
            "Idle sockets were closed to stay under the router's limits: raise "
            "limits.max_keepalive_connections (or limits.max_connections)."
        )
    else:
        suggestion = (
            "Sockets are not reused although keepalive allows it: the upstream may close "
            "them (Connection: close, a short idle timeout); check its keep-alive settings, "
            "or raise limits.keepalive_expiry if idle gaps are longer than it."
        )
    return [Finding(p.key, "connection churn: few sockets are reused", figure, suggestion)]


def _keepalive_near_cap(p: PartitionStats) -> list[Finding]:
    cap = p.quota.max_connections
    keepalive = p.quota.keepalive
    if cap < 10 or keepalive < 0.9 * cap:
        return []
    suggested = max(1, math.ceil(cap / 4), min(cap, p.peak_in_flight // 2))
    return [
        Finding(
            p.key,
            "keepalive close to max_connections: idle sockets stay open after every burst",
            f"max_keepalive_connections={keepalive} of max_connections={cap}",
            f"Keep a fraction warm: try max_keepalive_connections={suggested} for {p.quota_key!r}.",
            "info",
        )
    ]


def _no_pool_timeout(p: PartitionStats, default: float | None) -> list[Finding]:
    if p.quota.pool_timeout is not None or (default is not None and not p.wait.count):
        return []
    if default is not None and p.wait.p99 < default / 2:
        return []
    if default is None:
        figure = "no quota pool_timeout and the client's timeout.pool is None"
        problem = "no pool timeout: a request may wait for a slot forever"
    else:
        figure = f"pool wait p99 {p.wait.p99:.2f}s against the client default of {default}s"
        problem = "no explicit pool timeout: waits run close to the client default"
    seen = max(p.wait.p99, 0.1)
    return [
        Finding(
            p.key,
            problem,
            figure,
            f"Set Quota(pool_timeout=...) for {p.quota_key!r}, e.g. {min(10.0, 3 * seen):.1f}s "
            "(three times the p99 wait seen), so overload fails fast and visibly.",
        )
    ]


def _reservation_unused(p: PartitionStats) -> list[Finding]:
    if not p.quota.reserved or p.reserved_admissions:
        return []
    return [
        Finding(
            p.key,
            "reservation never needed: shared slots were always free when it sent",
            f"reserved={p.quota.reserved}, {p.requests} requests, 0 admitted on the reservation",
            "The reservation is insurance for overload; keep it if this host must never "
            f"starve, otherwise reserved=0 for {p.quota_key!r} frees shared slots.",
            "info",
        )
    ]


def _upstream_pushed_back(p: PartitionStats) -> list[Finding]:
    """Retry-After pauses: the upstream says this process (or fleet) asks too fast."""
    if not p.pauses:
        return []
    now = f", paused for another {p.paused_for:.1f}s" if p.paused_for > 0 else ""
    if p.quota.rate is None:
        suggestion = (
            f"Give {p.quota_key!r} a Quota(rate=Rate(...)) a little under the upstream's "
            "documented limit, so requests are paced instead of refused."
        )
    else:
        suggestion = (
            f"Lower the rate of {p.quota_key!r} (now {p.quota.rate}); if several processes "
            "call this upstream, share it with fleet=FleetQuota(rate=...)."
        )
    return [
        Finding(
            p.key,
            "the upstream pushed back with Retry-After",
            f"{p.pauses} pauses, {p.pause_delayed} requests held back{now}",
            suggestion,
        )
    ]


def _fleet_trouble(p: PartitionStats) -> list[Finding]:
    """The fleet's store was unavailable, or leases expired under running requests."""
    findings: list[Finding] = []
    if p.fleet_unavailable:
        findings.append(
            Finding(
                p.key,
                "the fleet's store (Redis) was unavailable",
                f"{p.fleet_unavailable} admissions without it",
                "Check Redis; while it is away, each process applies only its local "
                "quota (on_unavailable='local'), so the fleet may exceed its FleetQuota.",
            )
        )
    if p.fleet_leases_lost:
        findings.append(
            Finding(
                p.key,
                "fleet leases expired while their requests ran",
                f"{p.fleet_leases_lost} leases lost",
                "The process stalled (or Redis restarted) for longer than lease_ttl: "
                "raise RedisFleet(lease_ttl=...) above the longest stall you expect.",
            )
        )
    return findings

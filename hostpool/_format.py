"""Text formatting shared by the command line (``__main__``) and the demo.

Durations, nearest-rank quantiles, aligned tables and ``router.stats()`` as
a few aligned lines. Plain functions of their arguments: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._stats import RouterStats

__all__ = ["fmt_seconds", "format_router_stats", "quantile", "table"]


def fmt_seconds(seconds: float) -> str:
    """``1.8 ms``, ``412 ms``, ``1.23 s``; ``-`` for nan."""
    if math.isnan(seconds):
        return "-"
    if seconds < 0.1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of ``values`` (``nan`` when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def table(rows: Sequence[Sequence[str]], indent: str = "  ", gap: str = "   ") -> list[str]:
    """Align ``rows``: first column left, the others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append((indent + gap.join(cells)).rstrip())
    return lines


def format_router_stats(stats: RouterStats, keys: Sequence[str] | None = None) -> list[str]:
    """A few aligned lines of ``router.stats()``: one per partition (all, or ``keys``)."""
    rows = [
        [
            "partition",
            "quota",
            "requests",
            "peak in flight",
            "waited",
            "wait p50",
            "wait max",
            "pool timeouts",
            "sockets opened",
        ]
    ]
    wanted = list(stats.partitions) if keys is None else [k for k in keys if k in stats.partitions]
    for key in wanted:
        p = stats.partitions[key]
        # waits of at most 1 ms count as admitted at once
        at_once = p.wait.buckets[0][1] if p.wait.buckets else p.wait.count
        rows.append(
            [
                key,
                str(p.quota.max_connections),
                str(p.requests),
                str(p.peak_in_flight),
                str(p.wait.count - at_once),
                fmt_seconds(p.wait.p50),
                fmt_seconds(p.wait.max),
                str(p.pool_timeouts + p.overflows),
                str(p.connections_opened),
            ]
        )
    return table(rows, gap="  ")

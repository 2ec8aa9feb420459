"""The demo's chart: the healthy host's latency over time, one line per client.

matplotlib is optional (``pip install 'hostpool[demo]'``): it is imported only
when the chart is drawn, and :func:`write_chart` returns False without it.
"""

from __future__ import annotations

from pathlib import Path

from .._format import fmt_seconds
from .config import DemoConfig
from .server import LoopbackUpstreams
from .workload import RunResult, summarize

__all__ = ["write_chart"]


def write_chart(
    path: Path,
    config: DemoConfig,
    upstreams: LoopbackUpstreams,
    shared: RunResult,
    routed: RunResult,
) -> bool:
    """Draw the healthy host's latency over time for both runs; False if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    healthy, slow = upstreams.host("healthy"), upstreams.host("slow")
    fig = Figure(figsize=(10, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axvspan(0, config.flood_end, color="0.92", zorder=0, label=f"flood being sent to {slow}")
    ax.axvline(config.slow_after, color="0.35", linestyle="--", linewidth=1)
    series = [
        (shared, "tab:red", f"shared httpx.AsyncClient (max_connections={config.budget})"),
        (
            routed,
            "tab:blue",
            f"HostRouter (budget {config.budget}, quota {config.quota} per host)",
        ),
    ]
    top, bottom = 10.0, 1.0
    for run, color, label in series:
        ok = [s for s in run.of("healthy") if s.latency is not None]
        xs = [s.at for s in ok]
        ys = [s.latency * 1000 for s in ok if s.latency is not None]
        top, bottom = max([top, *ys]), min([bottom, *ys])
        p99 = summarize(run.of("healthy")).p99
        ax.plot(
            xs,
            ys,
            color=color,
            marker="o",
            markersize=2.5,
            linewidth=0.9,
            label=f"{label}: p99 {fmt_seconds(p99)}",
        )
        failed = [s.at for s in run.of("healthy") if s.latency is None]
        if failed:
            ax.plot(
                failed,
                [config.timeout * 1000] * len(failed),
                color=color,
                marker="x",
                linestyle="none",
                label=f"{len(failed)} errors (drawn at the timeout)",
            )
            top = max(top, config.timeout * 1000)
    ax.set_yscale("log")
    ax.set_ylim(bottom=bottom / 2, top=top * 2)
    ax.annotate(
        f"{slow} turns slow\n({fmt_seconds(config.slow)} per response)",
        xy=(config.slow_after, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(4, -4),
        textcoords="offset points",
        va="top",
        fontsize=9,
        color="0.25",
    )
    ax.set_xlim(left=0)
    ax.set_xlabel("time since the start of the run (s), by scheduled send time")
    ax.set_ylabel(f"latency of requests to {healthy} (ms, log scale)")
    ax.set_title(
        f"Healthy host {healthy} while {slow} is slow and flooded: one shared pool vs HostRouter"
    )
    ax.grid(True, which="major", axis="y", color="0.85", linewidth=0.6)
    fig.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    fig.savefig(path, dpi=110)
    return True

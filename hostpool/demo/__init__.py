"""``python -m hostpool demo``: watch one slow upstream starve a shared pool, and not a HostRouter.

Two tiny HTTP/1.1 servers run on loopback in a background thread
(:mod:`.server`): ``127.0.0.1`` answers at once; ``127.0.0.2`` answers at once
too, until it turns slow a moment into the run. The same mixed workload
(:mod:`.workload`: a flood of requests to the slow host, paced requests to the
healthy one) runs twice: once through one shared ``httpx.AsyncClient`` and once
through a :class:`~hostpool.HostRouter` with the same connection budget. The
demo prints the healthy host's latency for both, a few lines of
``router.stats()`` (:mod:`.report`), and draws a chart (:mod:`.chart`, with
matplotlib if installed).

Nothing here touches the network beyond loopback. The demo uses hostpool's
public API only; the library never imports it.
"""

from __future__ import annotations

import sys
from typing import TextIO

import anyio

from .chart import write_chart
from .config import CHART_HINT, DEFAULT_CHART, DemoConfig, add_arguments, config_from_args
from .report import header
from .report import report as report_lines
from .server import LoopbackUpstreams
from .workload import run_both

__all__ = [
    "DEFAULT_CHART",
    "DemoConfig",
    "LoopbackUpstreams",
    "add_arguments",
    "config_from_args",
    "run",
]


def run(config: DemoConfig, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the demo and print its report; return the exit code."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        upstreams = LoopbackUpstreams(config.slow).start()
    except OSError as exc:
        print(f"hostpool demo: cannot listen on loopback: {exc}", file=err)
        return 1
    try:
        for line in header(config, upstreams):
            print(line, file=out)
        out.flush()
        shared, routed = anyio.run(run_both, config, upstreams, err, backend="asyncio")
    except KeyboardInterrupt:
        print("\nhostpool demo: interrupted", file=err)
        return 130
    finally:
        upstreams.stop()
    print("", file=out)
    for line in report_lines(config, upstreams, shared, routed):
        print(line, file=out)
    status = 1 if shared.cut_off or routed.cut_off else 0
    if config.chart is not None:
        try:
            drawn = write_chart(config.chart, config, upstreams, shared, routed)
        except OSError as exc:
            print(f"hostpool demo: cannot write the chart: {exc}", file=err)
            return 1
        if drawn:
            print(f"\nChart: {config.chart.resolve()}", file=out)
        else:
            print(f"\nChart skipped: matplotlib is not installed ({CHART_HINT})", file=out)
    out.flush()
    return status

"""The demo's knobs: :class:`DemoConfig` and its ``python -m hostpool demo`` options."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHART_HINT", "DEFAULT_CHART", "DemoConfig", "add_arguments", "config_from_args"]

DEFAULT_CHART = "hostpool-demo.png"
CHART_HINT = "pip install 'hostpool[demo]'"

_MAX_REQUESTS = 5000


@dataclass(frozen=True)
class DemoConfig:
    """The knobs of the demo (see ``python -m hostpool demo --help``)."""

    slow: float = 0.5
    slow_after: float = 0.5
    flood: int = 200
    flood_rate: float = 100.0
    healthy: int = 200
    pace: float = 0.03
    budget: int = 20
    quota: int = 10
    timeout: float = 10.0
    max_duration: float = 25.0
    chart: Path | None = Path(DEFAULT_CHART)
    seed: int = 1

    @property
    def flood_end(self) -> float:
        """When the last flood request is sent, in seconds from the start of a run."""
        return max(0, self.flood - 1) / self.flood_rate


def _number(
    kind: Callable[[str], float], *, minimum: float, strict: bool, maximum: float = math.inf
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        too_small = value <= minimum if strict else value < minimum
        if too_small or value > maximum or not math.isfinite(value):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            if math.isfinite(maximum):
                bound += f" and <= {maximum:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}; got {text}")
        return value

    return parse


def _count(maximum: int = _MAX_REQUESTS) -> Callable[[str], int]:
    parse = _number(int, minimum=1, strict=False, maximum=maximum)
    return lambda text: int(parse(text))


def _seconds(*, allow_zero: bool = False, maximum: float = 600.0) -> Callable[[str], float]:
    return _number(float, minimum=0.0, strict=not allow_zero, maximum=maximum)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    d = DemoConfig()
    work = parser.add_argument_group("workload")
    work.add_argument(
        "--slow",
        type=_seconds(maximum=30.0),
        default=d.slow,
        metavar="SECONDS",
        help="seconds the slow host takes per response once it has turned slow "
        f"(default: {d.slow:g})",
    )
    work.add_argument(
        "--slow-after",
        type=_seconds(allow_zero=True, maximum=60.0),
        default=d.slow_after,
        metavar="SECONDS",
        help="when the slow host turns slow, in seconds from the start of each run; "
        f"it answers at once before that (default: {d.slow_after:g})",
    )
    work.add_argument(
        "--flood",
        type=_count(),
        default=d.flood,
        metavar="N",
        help=f"requests sent to the slow host (default: {d.flood})",
    )
    work.add_argument(
        "--flood-rate",
        type=_number(float, minimum=0.0, strict=True, maximum=100_000.0),
        default=d.flood_rate,
        metavar="PER_SECOND",
        help="rate at which the flood is sent, from the start of the run "
        f"(default: {d.flood_rate:g}/s)",
    )
    work.add_argument(
        "--healthy",
        type=_count(),
        default=d.healthy,
        metavar="N",
        help=f"requests sent to the healthy host (default: {d.healthy})",
    )
    work.add_argument(
        "--pace",
        type=_seconds(maximum=10.0),
        default=d.pace,
        metavar="SECONDS",
        help=f"interval between two healthy-host requests (default: {d.pace:g})",
    )
    work.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        metavar="N",
        help="seed of the small jitter in send times; both clients get the same "
        f"schedule (default: {d.seed})",
    )
    limits = parser.add_argument_group("clients")
    limits.add_argument(
        "--budget",
        type=_count(10_000),
        default=d.budget,
        metavar="N",
        help="max_connections of both clients: httpx.Limits(max_connections=N) "
        f"(default: {d.budget})",
    )
    limits.add_argument(
        "--quota",
        type=_count(10_000),
        default=None,
        metavar="N",
        help="HostRouter quota (max connections) of each of the two hosts "
        "(default: half the budget)",
    )
    limits.add_argument(
        "--timeout",
        type=_seconds(),
        default=d.timeout,
        metavar="SECONDS",
        help=f"httpx timeout of every request, pool wait included (default: {d.timeout:g})",
    )
    limits.add_argument(
        "--max-duration",
        type=_seconds(),
        default=d.max_duration,
        metavar="SECONDS",
        help="hard bound on each of the two runs; requests still running then are "
        f"cancelled and counted as errors (default: {d.max_duration:g})",
    )
    out = parser.add_argument_group("output")
    chart = out.add_mutually_exclusive_group()
    chart.add_argument(
        "--chart",
        type=Path,
        default=Path(DEFAULT_CHART),
        metavar="PATH",
        help="where to write the PNG chart of the healthy host's latency over time "
        f"(default: ./{DEFAULT_CHART}; needs matplotlib: {CHART_HINT})",
    )
    chart.add_argument("--no-chart", action="store_true", help="do not draw the chart")


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> DemoConfig:
    """Build a :class:`DemoConfig`, reporting bad combinations through ``parser.error``."""
    budget: int = args.budget
    quota: int = args.quota if args.quota is not None else max(1, budget // 2)
    if quota > budget:
        parser.error(f"--quota ({quota}) must be <= --budget ({budget})")
    chart: Path | None = None if args.no_chart else args.chart
    if chart is not None:
        parent = chart.parent if str(chart.parent) else Path()
        if not parent.is_dir():
            parser.error(f"--chart: directory {str(parent)!r} does not exist")
        if chart.is_dir():
            parser.error(f"--chart: {str(chart)!r} is a directory")
    return DemoConfig(
        slow=args.slow,
        slow_after=args.slow_after,
        flood=args.flood,
        flood_rate=args.flood_rate,
        healthy=args.healthy,
        pace=args.pace,
        budget=budget,
        quota=quota,
        timeout=args.timeout,
        max_duration=args.max_duration,
        chart=chart,
        seed=args.seed,
    )

"""Command line: ``python -m hostpool demo`` and ``python -m hostpool stats URL...``."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import anyio
import httpx

from . import __version__
from ._format import fmt_seconds, format_router_stats, quantile
from ._quota import Quota
from ._router import HostRouter
from .demo import DEFAULT_CHART, add_arguments, config_from_args, run
from .demo.fleet import add_fleet_arguments, fleet_config_from_args, run_fleet

__all__ = ["build_parser", "main"]

_DEMO_DESCRIPTION = f"""\
Watch hostpool isolate a slow upstream. Two HTTP servers start on loopback:
127.0.0.1 answers at once; 127.0.0.2 answers at once too, then turns slow and
is flooded with requests. The same workload runs through one shared
httpx.AsyncClient and through a HostRouter with the same connection budget,
and the healthy host's latency is compared. Nothing leaves the machine; the
defaults take about 15 seconds and write ./{DEFAULT_CHART}.
"""

_STATS_DESCRIPTION = """\
Send N GET requests to each URL at once through a HostRouter (one partition
per host, under a shared budget), then print each URL's latency and the
router's per-partition stats: peak in flight, pool waits, pool timeouts,
sockets opened. Useful to see how a quota shapes traffic to real upstreams.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be > 0; got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m hostpool`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m hostpool",
        description="hostpool: per-host connection pools and quotas for httpx.AsyncClient.",
    )
    parser.add_argument("--version", action="version", version=f"hostpool {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run a local demo: a slow, flooded upstream vs a shared pool and a HostRouter",
        description=_DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(demo)
    add_fleet_arguments(demo)
    stats = commands.add_parser(
        "stats",
        help="send requests to URLs through a HostRouter and print router.stats()",
        description=_STATS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stats.add_argument("urls", nargs="+", metavar="URL", help="http:// or https:// URLs")
    stats.add_argument(
        "-n",
        "--requests",
        type=_positive_int,
        default=10,
        metavar="N",
        help="requests per URL (default: 10)",
    )
    stats.add_argument(
        "--budget",
        type=_positive_int,
        default=100,
        metavar="N",
        help="router-wide max_connections (default: 100, as httpx)",
    )
    stats.add_argument(
        "--quota",
        type=_positive_int,
        default=None,
        metavar="N",
        help="max connections per host (default: half the budget)",
    )
    stats.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="httpx timeout of every request (default: 10)",
    )
    stats.add_argument(
        "--max-duration",
        type=_positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="stop after this long; unfinished requests count as errors (default: 60)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        fleet = fleet_config_from_args(parser, args)
        if fleet is not None:
            return run_fleet(fleet)
        return run(config_from_args(parser, args))
    if args.command == "stats":
        return _stats(parser, args)
    parser.print_help(sys.stderr)
    return 2


# ---------------------------------------------------------------------------
# python -m hostpool stats URL...
# ---------------------------------------------------------------------------

_MAX_STATS_REQUESTS = 10_000


def _stats(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    urls: list[str] = args.urls
    for url in urls:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            parser.error(f"bad URL {url!r}: {exc}")
        if parsed.scheme not in ("http", "https") or not parsed.host:
            parser.error(f"not an http(s) URL: {url!r}")
    if args.requests * len(urls) > _MAX_STATS_REQUESTS:
        parser.error(f"at most {_MAX_STATS_REQUESTS} requests in all")
    if args.quota is not None and args.quota > args.budget:
        parser.error(f"--quota ({args.quota}) must be <= --budget ({args.budget})")
    result: int = anyio.run(_send_all, args, sys.stdout, backend="asyncio")
    return result


async def _send_all(args: argparse.Namespace, out: TextIO) -> int:
    urls: list[str] = args.urls
    default_quota = None if args.quota is None else Quota(max_connections=args.quota)
    latencies: dict[str, list[float]] = {url: [] for url in urls}
    statuses: dict[str, dict[str, int]] = {url: {} for url in urls}

    def count(url: str, outcome: str) -> None:
        statuses[url][outcome] = statuses[url].get(outcome, 0) + 1

    router = HostRouter(
        limits=httpx.Limits(max_connections=args.budget),
        default_quota=default_quota,
        timeout=httpx.Timeout(args.timeout),
    )
    async with router:

        async def one(url: str) -> None:
            start = time.monotonic()
            try:
                response = await router.get(url)
            except httpx.HTTPError as exc:
                count(url, type(exc).__name__)
                return
            latencies[url].append(time.monotonic() - start)
            count(url, str(response.status_code))

        with anyio.move_on_after(args.max_duration) as scope:
            async with anyio.create_task_group() as tg:
                for url in urls:
                    for _ in range(args.requests):
                        tg.start_soon(one, url)
        stats = router.stats()

    rows = [["url", "partition", "outcomes", "p50", "max"]]
    for url in urls:
        done = sum(statuses[url].values())
        if done < args.requests:
            count(url, "unfinished")
        outcomes = ", ".join(f"{n} x {k}" for k, n in sorted(statuses[url].items()))
        rows.append(
            [
                url,
                router.partition_key(url),
                outcomes,
                fmt_seconds(quantile(latencies[url], 0.5)),
                fmt_seconds(max(latencies[url], default=math.nan)),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  " + "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )
    print(
        f"\nrouter.stats(): budget {stats.budget}, {stats.requests} requests, "
        f"{stats.connections_opened} sockets opened, {stats.pool_timeouts} pool timeouts\n",
        file=out,
    )
    for line in format_router_stats(stats):
        print(line, file=out)
    if scope.cancelled_caught:
        print(f"\nstopped at --max-duration ({args.max_duration:g} s)", file=out)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m benchmarks``: run the suite, write results, RESULTS.md and charts."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import (
    fleet,
    footprint,
    isolation,
    large_body,
    many_hosts,
    overhead,
    profiling,
    scheduler,
    throughput,
)
from ._common import Settings, git_at_start
from .report import write_report
from .upstream import Upstream, raise_fd_limit

__all__ = ["main"]

Log = Callable[[str], None]
#: A scenario runs its own event loops (one per trial: ``throughput`` and
#: ``large_body`` interleave asyncio's loop and uvloop) and returns its result.
Scenario = Callable[[Settings, Any, Log], dict[str, Any]]


def _on_asyncio(
    scenario: Callable[[Settings, Any, Log], Awaitable[dict[str, Any]]],
) -> Scenario:
    """A scenario that runs whole in one ``asyncio.run`` (asyncio's default loop)."""

    def run(settings: Settings, upstream: Any, log: Log) -> dict[str, Any]:
        async def main() -> dict[str, Any]:
            return await scenario(settings, upstream, log)

        return asyncio.run(main())

    return run


#: In the order they run. Scenarios without sockets go first.
SCENARIOS: dict[str, Scenario] = {
    "scheduler": _on_asyncio(scheduler.run),
    "overhead": _on_asyncio(overhead.run),
    "throughput": throughput.run,
    "large_body": large_body.run,
    "isolation": _on_asyncio(isolation.run),
    "many_hosts": _on_asyncio(many_hosts.run),
    "footprint": _on_asyncio(footprint.run),
    "profile": _on_asyncio(profiling.run),
    "fleet": _on_asyncio(fleet.run),
}
_NEEDS_UPSTREAM = {
    "throughput",
    "large_body",
    "isolation",
    "many_hosts",
    "footprint",
    "profile",
    "fleet",
}
_NEEDS_MANY = {"many_hosts", "footprint", "profile"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="hostpool's benchmark suite (loopback only). Writes <out>/*.json, "
        "PNG charts in <out>, and RESULTS.md.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke: a few requests per scenario; writes to a new temp dir unless --out",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios: " + ",".join(SCENARIOS),
    )
    parser.add_argument("--repeats", type=int, help="interleaved repeats of every comparison")
    parser.add_argument(
        "--out",
        type=Path,
        help="results directory (default: benchmarks/results; RESULTS.md goes next to "
        "it, or into it with --quick)",
    )
    parser.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing; rebuild RESULTS.md and the charts from the JSON files in --out",
    )
    return parser.parse_args(argv)


def _settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        out = args.out or Path(tempfile.mkdtemp(prefix="hostpool-bench-"))
        settings = Settings.quick_settings(out)
    else:
        settings = Settings()
        if args.out is not None:
            settings.out = args.out
            settings.report = args.out.parent / "RESULTS.md"
    if args.repeats is not None:
        if args.repeats < 1:
            raise SystemExit("--repeats must be >= 1")
        settings.repeats = settings.isolation_repeats = settings.many_repeats = args.repeats
    return settings


def _selected(only: str) -> list[str]:
    if not only:
        return list(SCENARIOS)
    names = [n.strip().replace("-", "_") for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(
            f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    return [n for n in SCENARIOS if n in names]


class _CpuMeter:
    """CPU time other processes used while a scenario ran (noise on the machine)."""

    def __init__(self, upstream: Upstream | None) -> None:
        self._upstream = upstream
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal ...: busy excludes idle, iowait.
        busy = sum(fields[:3]) + sum(fields[5:8])
        ticks = os.sysconf("SC_CLK_TCK")
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        up = self._upstream.cpu_seconds() if self._upstream is not None else 0.0
        return busy / ticks, own, up or 0.0, time.monotonic()

    def result(self) -> dict[str, float] | None:
        end = self._read()
        if self._start is None or end is None:
            return None
        busy, own, up, wall = (b - a for a, b in zip(self._start, end, strict=True))
        if wall <= 0:
            return None
        return {
            "seconds": wall,
            "own_cpu_util": own / wall,
            "upstream_cpu_util": up / wall,
            "other_cpu_util": max(0.0, busy - own - up) / wall,
        }


def _annotate(settings: Settings, name: str, background: dict[str, float] | None) -> None:
    path = settings.out / f"{name}.json"
    if not path.exists():
        return
    data = json.loads(path.read_text())
    data["background"] = background
    path.write_text(json.dumps(data, indent=1) + "\n")


def _log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def _run(settings: Settings, names: list[str]) -> None:
    upstream: Upstream | None = None
    try:
        if any(n in _NEEDS_UPSTREAM for n in names):
            many = settings.many_listeners if any(n in _NEEDS_MANY for n in names) else 0
            upstream = Upstream([throughput.HOST, isolation.FAST_HOST], many=many)
            upstream.start()
            _log(
                f"upstream pid {upstream.pid}: {upstream.ports}, "
                f"{len(upstream.many_ports)} extra ports"
            )
        for name in names:
            _log(f"== {name}")
            meter = _CpuMeter(upstream)
            began = time.monotonic()
            SCENARIOS[name](settings, upstream, _log)
            background = meter.result()
            _annotate(settings, name, background)
            _log(
                f"== {name} done in {time.monotonic() - began:.1f} s"
                + (
                    f" (other processes used {background['other_cpu_util']:.0%} of a CPU)"
                    if background
                    else ""
                )
            )
    finally:
        if upstream is not None:
            upstream.stop()


def _print_targets(settings: Settings, names: list[str]) -> None:
    for name in names:
        path = settings.out / f"{name}.json"
        if not path.exists():
            continue
        for key, target in json.loads(path.read_text()).get("targets", {}).items():
            status = "met" if target["met"] else "NOT MET"
            print(f"{name:<11} {key:<32} {status:<8} {target['value']}  (want {target['target']})")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    settings = _settings(args)
    names = _selected(args.only)
    if args.report_only:
        report = write_report(settings, charts=not args.no_charts)
        _log(f"report: {report}")
        return 0
    raise_fd_limit()
    settings.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    _log(f"scenarios: {', '.join(names)}; results in {settings.out}; hostpool {git_at_start()}")
    _run(settings, names)
    report = write_report(settings, charts=not args.no_charts)
    _log(f"done in {time.monotonic() - began:.0f} s; report: {report}")
    _print_targets(settings, names)
    return 0

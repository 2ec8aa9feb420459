"""Shared pieces: settings, statistics, machine description, result files."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Settings",
    "machine_info",
    "median",
    "paired_ratio",
    "percentile",
    "read_results",
    "rss_bytes",
    "write_result",
]

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results"


@dataclasses.dataclass
class Settings:
    """What a run does: the CLI's options, and the sizes they imply."""

    quick: bool = False
    repeats: int = 5
    out: Path = DEFAULT_OUT
    report: Path = BENCH_DIR / "RESULTS.md"

    # throughput
    concurrency: tuple[int, ...] = (1, 10, 50, 200)
    trial_seconds: float = 2.0
    # large body (streamed), per (loop, client) trial
    large_body_bytes: int = 10 * 2**20
    large_trial_seconds: float = 2.0
    # isolation
    flood: int = 200
    flood_delay_ms: int = 500
    fast_requests: int = 100
    fast_interval_ms: float = 10.0
    isolation_repeats: int = 5
    # many hosts
    partitions: tuple[int, ...] = (1, 10, 100, 1000)
    many_concurrency: int = 50
    many_trial_seconds: float = 2.0
    many_repeats: int = 5
    # scheduler
    sched_partitions: tuple[int, ...] = (1, 100, 10_000)
    sched_waiters: tuple[int, ...] = (0, 100, 10_000)
    sched_cycles: int = 10_000
    sched_batches: int = 15
    # footprint
    footprint_partitions: int = 100_000
    footprint_idle: float = 0.5
    footprint_real: int = 1000
    # overhead (canned transport) and profile
    overhead_requests: int = 3000
    profile_requests: int = 5000
    # fleet (Redis): canned requests per cost trial, requests per round-trip count
    fleet_requests: int = 3000
    fleet_count_requests: int = 2000

    @classmethod
    def quick_settings(cls, out: Path) -> Settings:
        """The CI smoke: a few requests per scenario, a few seconds in all."""
        return cls(
            quick=True,
            repeats=1,
            out=out,
            report=out / "RESULTS.md",
            concurrency=(1, 50),
            trial_seconds=0.05,
            large_body_bytes=2 * 2**20,
            large_trial_seconds=0.05,
            flood=20,
            flood_delay_ms=100,
            fast_requests=10,
            fast_interval_ms=5.0,
            isolation_repeats=1,
            partitions=(1, 10),
            many_concurrency=5,
            many_trial_seconds=0.05,
            many_repeats=1,
            sched_partitions=(1, 100),
            sched_waiters=(0, 100),
            sched_cycles=500,
            sched_batches=2,
            footprint_partitions=500,
            footprint_idle=0.2,
            footprint_real=10,
            overhead_requests=50,
            profile_requests=100,
            fleet_requests=50,
            fleet_count_requests=50,
        )

    @property
    def many_listeners(self) -> int:
        return max(max(self.partitions), self.footprint_real)

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        data["report"] = str(self.report)
        return data


# -- statistics ----------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """Return the median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Return the ``q``-th percentile (0-100), linear between closest ranks."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def paired_ratio(
    a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], key: str = "rps"
) -> float:
    """Median over repeats of ``a[key] / b[key]``, pairing trials of the same repeat
    (they ran back to back)."""
    theirs = {t["repeat"]: t[key] for t in b}
    ratios = [t[key] / theirs[t["repeat"]] for t in a if theirs.get(t["repeat"])]
    return median(ratios)


# -- machine and memory ----------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict[str, Any]:
    """Describe the machine and the versions under test."""
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "versions": {
            name: _version(name)
            for name in (
                "hostpool",
                "httpx",
                "httpcore",
                "anyio",
                "h11",
                "httptools",
                "aiohttp",
                "uvloop",
            )
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # The tree as it was when the run began (its modules were imported then),
        # and as it is now when someone edited or committed hostpool/ meanwhile.
        "git": git_at_start(),
        **({"git_at_write": now} if (now := _git_state()) != git_at_start() else {}),
    }


@functools.cache
def git_at_start() -> str | None:
    """The hostpool tree at the first call (``cli.main`` makes it before any scenario)."""
    return _git_state()


def _git_state() -> str | None:
    """Describe the hostpool tree under test: commit, and whether hostpool/ has local edits."""
    import subprocess

    root = BENCH_DIR.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "hostpool"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    edited = len(dirty.splitlines())
    return f"{head}" + (f" + local edits to {edited} file(s) in hostpool/" if edited else "")


def rss_bytes() -> int:
    """Return this process's resident set size, in bytes (0 if unknown)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return 0 if sys.platform != "darwin" else resource.getrusage(0).ru_maxrss


def settle_memory() -> None:
    """Collect garbage (all generations, twice) before reading memory figures."""
    gc.collect()
    gc.collect()


# -- result files ----------------------------------------------------------------


def write_result(settings: Settings, scenario: str, data: dict[str, Any]) -> Path:
    """Write ``<out>/<scenario>.json`` with the machine and settings attached."""
    settings.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "scenario": scenario,
        "quick": settings.quick,
        "machine": machine_info(),
        "settings": settings.as_dict(),
        **data,
    }
    path = settings.out / f"{scenario}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def read_results(out: Path) -> dict[str, dict[str, Any]]:
    """Read every ``<scenario>.json`` in ``out``."""
    results: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "scenario" in data:
            results[str(data["scenario"])] = data
    return results


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:
        return None
    raise TypeError(f"not JSON serialisable: {value!r}")

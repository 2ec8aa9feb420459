"""Scenario 5: footprint. Touch 100,000 partitions once; is the memory given back?

Each measurement runs in a fresh child process (``python -m benchmarks.footprint
--worker ...``), so its baseline is not the benchmark process's history.

``mock``: 100,000 distinct hostnames (``127.x.y.z``, loopback addresses, though
nothing is ever connected) through a ``HostRouter`` over ``httpx.MockTransport``.
100,000 real sockets are not feasible on one machine, so this exercises the
partitions (creation, admission, idle sweep, quota and key caches) but not the
connection pools.

``real``: 1,000 origins on the upstream's many ports (``partition_by="origin"``),
with real sockets, so the pools and their idle keep-alive connections count.

Phases, memory read after ``gc.collect()`` at each:

1. ``start``: the router has served one request;
2. ``peak``: every partition has one response open (so none can be dropped
   while the others are being touched);
3. ``idle``: every response read and closed; the partitions are live and idle;
4. ``after``: ``partition_idle_timeout`` later, one more request (which runs
   the idle sweep).

Target: RSS ``after`` within 10% of ``start``. The Python heap (allocated
blocks, and with ``--trace`` the bytes ``tracemalloc`` sees, with the
allocation sites that still hold memory) tells leaks from allocator slack.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

import hostpool

from ._common import BENCH_DIR, Settings, rss_bytes, settle_memory, write_result
from .upstream import Upstream, raise_fd_limit

__all__ = ["run"]

_GUARD = 600.0


def _mock_host(i: int) -> str:
    return f"127.{1 + i // 65536}.{(i // 256) % 256}.{i % 256}"


class _Body(httpx.AsyncByteStream):
    """A streamed body: unlike ``content=b"ok"``, httpx does not read it up front,
    so the response (and its admission slot) stays open until it is read."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"ok"


def _canned(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, stream=_Body())


def _pymalloc_arenas() -> int | None:
    """CPython's count of pymalloc arenas (1 MiB each) now allocated, or None if unknown.

    An arena goes back to the OS only once every block in it is free, so a
    few long-lived objects allocated during a crawl keep whole arenas in RSS.
    """
    debug_stats = getattr(sys, "_debugmallocstats", None)
    if debug_stats is None:  # pragma: no cover - CPython has it
        return None
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as out:
            os.dup2(out.fileno(), 2)
            try:
                debug_stats()
            finally:
                os.dup2(saved, 2)
            out.seek(0)
            text = out.read().decode("ascii", "replace")
    finally:
        os.close(saved)
    match = re.search(r"# arenas allocated current\s*=\s*([\d,]+)", text)
    return int(match.group(1).replace(",", "")) if match else None


def _point(router: hostpool.HostRouter | None = None) -> dict[str, Any]:
    settle_memory()
    point: dict[str, Any] = {
        "rss": rss_bytes(),
        "blocks": sys.getallocatedblocks(),
        "objects": len(gc.get_objects()),
        "arenas": _pymalloc_arenas(),
    }
    if tracemalloc.is_tracing():
        point["traced"] = tracemalloc.get_traced_memory()[0]
    return point


def _short_path(path: str) -> str:
    for marker in ("site-packages/", "/hostpool/", "/lib/python3"):
        at = path.find(marker)
        if at < 0:
            continue
        rest = path[at + len(marker) :]
        if marker == "/hostpool/":
            return "hostpool/" + rest
        if marker == "/lib/python3":
            return "stdlib/" + rest.split("/", 1)[-1]
        return rest
    return path


def _malloc_trim() -> bool:
    """Ask glibc to return freed memory to the OS; False where that is not possible."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except (OSError, ImportError):
        return False
    libc.malloc_trim(0)
    return True


def _retained_sites(start: tracemalloc.Snapshot) -> list[dict[str, Any]]:
    """The allocation sites holding the most memory that was not there at the start."""
    settle_memory()
    diff = tracemalloc.take_snapshot().compare_to(start, "traceback")
    top = []
    for entry in diff[:12]:
        frames = [f"{_short_path(f.filename)}:{f.lineno}" for f in entry.traceback]
        top.append(
            {"size_diff": entry.size_diff, "count_diff": entry.count_diff, "where": frames[-4:]}
        )
    return top


async def _touch_all(router: hostpool.HostRouter, urls: list[str]) -> list[httpx.Response]:
    held = []
    for url in urls:
        held.append(await router.send(router.build_request("GET", url), stream=True))
    return held


async def _crawl(
    router: hostpool.HostRouter, urls: list[str], idle: float, first: str
) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Touch every URL (all partitions live at once), read them all, let the sweep run.

    Return the touch time and the memory points with every response open
    (``peak``) and once all were read (``idle``).
    """
    began = time.perf_counter()
    held = await asyncio.wait_for(_touch_all(router, urls), _GUARD)
    touch_seconds = time.perf_counter() - began
    peak = _point()
    for response in held:
        await response.aread()
    held.clear()
    idle_point = _point()
    idle_point["live_partitions"] = len(router.stats().partitions)
    await asyncio.sleep(idle * 1.2 + 0.05)
    await router.get(first)
    return touch_seconds, peak, idle_point


async def worker(
    mode: str, urls: list[str], idle: float, trace: bool, again: Callable[[], list[str]] | None
) -> dict[str, Any]:
    """Run the phases in this (fresh) process; return the figures."""
    if mode == "mock":
        router = hostpool.HostRouter(
            transport=httpx.MockTransport(_canned),
            partition_idle_timeout=idle,
            limits=httpx.Limits(max_connections=len(urls) + 10),
            default_quota=hostpool.Quota(max_connections=1),
        )
        first = "http://127.0.0.1/"
    else:
        router = hostpool.HostRouter(
            partition_by="origin",
            partition_idle_timeout=idle,
            limits=httpx.Limits(
                max_connections=len(urls) + 10, max_keepalive_connections=len(urls) + 10
            ),
            default_quota=hostpool.Quota(max_connections=1),
        )
        first = urls[0]
    points: dict[str, dict[str, Any]] = {}
    async with router:
        await router.get(first)
        if trace:
            tracemalloc.start(6)
        points["start"] = _point()
        start_snapshot = tracemalloc.take_snapshot() if trace else None
        touch_seconds, points["peak"], points["idle"] = await _crawl(router, urls, idle, first)
        live_idle = points["idle"]["live_partitions"]
        points["after"] = _point()
        stats = router.stats()
        live_after = len(stats.partitions)
        dropped = stats.partitions_dropped
        del stats
        if again is not None:
            # A second crawl over as many new partitions: does the process
            # reuse what the first one left, or grow again? (Its URL list is
            # built only now, and dropped before measuring.)
            urls_again = again()
            _, points["peak2"], points["idle2"] = await _crawl(router, urls_again, idle, first)
            del urls_again
            points["after2"] = _point()
        top = _retained_sites(start_snapshot) if start_snapshot is not None else []
        # Diagnostics (private attributes; figures only, never the target):
        # what if the partitioner's host -> key cache were dropped too, and
        # how much of the RSS left is the C allocator's slack?
        cache = getattr(getattr(router, "_hp_partitioner", None), "_cache", None)
        if isinstance(cache, dict):
            points["after"]["key_cache_entries"] = len(cache)
            cache.clear()
            points["after_cache_clear"] = _point()
        if _malloc_trim():
            points["after_trim"] = _point()
        if tracemalloc.is_tracing():
            tracemalloc.stop()
    n = len(urls)
    start, idle_point, after = points["start"], points["idle"], points["after"]
    return {
        "mode": mode,
        "partitions": n,
        "idle_timeout": idle,
        "touch_seconds": touch_seconds,
        "points": points,
        "live_partitions_idle": live_idle,
        "live_partitions_after": live_after,
        "partitions_dropped": dropped,
        "idle_partition_rss_bytes": (idle_point["rss"] - start["rss"]) / n,
        "idle_partition_blocks": (idle_point["blocks"] - start["blocks"]) / n,
        "rss_after_vs_start": after["rss"] / start["rss"],
        "rss_after2_vs_after": (
            points["after2"]["rss"] / after["rss"] if "after2" in points else None
        ),
        "rss_after_cache_clear_vs_start": (
            points["after_cache_clear"]["rss"] / start["rss"]
            if "after_cache_clear" in points
            else None
        ),
        "rss_after_trim_vs_start": (
            points["after_trim"]["rss"] / start["rss"] if "after_trim" in points else None
        ),
        "blocks_retained": after["blocks"] - start["blocks"],
        "blocks_after_vs_start": after["blocks"] / start["blocks"],
        "traced_retained": (after.get("traced", 0) - start.get("traced", 0)) if trace else None,
        "top_retained": top,
    }


def _spawn(args: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.footprint", "--worker", json.dumps(args)]
    proc = subprocess.run(
        cmd, cwd=BENCH_DIR.parent, capture_output=True, text=True, timeout=_GUARD, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"footprint worker failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


async def run(settings: Settings, upstream: Upstream, log: Any) -> dict[str, Any]:
    n = settings.footprint_partitions
    idle = settings.footprint_idle
    runs: dict[str, dict[str, Any]] = {}
    plan = [
        ("mock", {"mode": "mock", "count": n, "idle": idle, "trace": False, "again": True}),
        (
            "mock_traced",
            {"mode": "mock", "count": max(n // 20, 1), "idle": idle, "trace": True},
        ),
        (
            "real",
            {
                "mode": "real",
                "urls": upstream.many_urls(settings.footprint_real),
                "idle": idle,
                "trace": False,
                "again": True,
            },
        ),
    ]
    for name, args in plan:
        result = await asyncio.to_thread(_spawn, args)
        runs[name] = result
        log(
            f"footprint {name:<11} {result['partitions']:>7} partitions: RSS "
            f"{result['points']['start']['rss'] / 2**20:.1f} -> "
            f"{result['points']['peak']['rss'] / 2**20:.1f} (peak) -> "
            f"{result['points']['idle']['rss'] / 2**20:.1f} (idle) -> "
            f"{result['points']['after']['rss'] / 2**20:.1f} MiB (after sweep); "
            f"live after {result['live_partitions_after']}"
        )
    mock = runs["mock"]
    real = runs["real"]
    data = {
        "runs": runs,
        "targets": {
            "mock_rss_back_within_10pct": {
                "value": mock["rss_after_vs_start"],
                "target": "RSS after / start <= 1.10",
                "met": mock["rss_after_vs_start"] <= 1.10,
            },
            "real_rss_back_within_10pct": {
                "value": real["rss_after_vs_start"],
                "target": "RSS after / start <= 1.10",
                "met": real["rss_after_vs_start"] <= 1.10,
            },
            "mock_heap_back_within_10pct": {
                "value": mock["blocks_after_vs_start"],
                "target": "Python heap blocks after / start <= 1.10",
                "met": mock["blocks_after_vs_start"] <= 1.10,
            },
            "real_heap_back_within_10pct": {
                "value": real["blocks_after_vs_start"],
                "target": "Python heap blocks after / start <= 1.10",
                "met": real["blocks_after_vs_start"] <= 1.10,
            },
            "partitions_dropped": {
                "value": mock["live_partitions_after"],
                "target": "1 live partition after the sweep (the one just used)",
                "met": mock["live_partitions_after"] <= 1 and real["live_partitions_after"] <= 1,
            },
        },
    }
    write_result(settings, "footprint", data)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description="footprint worker (internal)")
    parser.add_argument("--worker", required=True, help="JSON arguments")
    args = json.loads(parser.parse_args().worker)
    raise_fd_limit()
    again: Callable[[], list[str]] | None = None
    if args["mode"] == "mock":
        count = int(args["count"])
        urls = [f"http://{_mock_host(i)}/" for i in range(count)]
        if args.get("again"):

            def again() -> list[str]:
                return [f"http://{_mock_host(count + i)}/" for i in range(count)]

    else:
        urls = list(args["urls"])
        if args.get("again"):

            def again() -> list[str]:
                # The same origins: new partitions, the old ones were dropped.
                return list(urls)

    result = asyncio.run(
        worker(args["mode"], urls, float(args["idle"]), bool(args["trace"]), again)
    )
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

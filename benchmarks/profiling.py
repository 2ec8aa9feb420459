"""Profiles of HostRouter (and, for contrast, httpx.AsyncClient) at concurrency 50.

cProfile over ``profile_requests`` requests against the upstream, written to
``profile_hostrouter_c50.txt``: the top 30 functions by cumulative time, then
hostpool's own functions with their cost per request. With pyinstrument
installed, its call tree goes to ``profile_hostrouter_c50_pyinstrument.txt``.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
import time
from pathlib import Path
from typing import Any

from . import clients
from ._common import Settings, write_result
from ._load import aclose_bounded
from .many_hosts import many_hosts_limits
from .throughput import HOST, LIMITS
from .upstream import Upstream

__all__ = ["run"]

CONCURRENCY = 50
_GUARD = 300.0


async def _drive(client: clients.Client, urls: list[str], total: int, concurrency: int) -> float:
    left = total
    count = len(urls)

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await client.get(urls[left % count])

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), _GUARD)
    return time.perf_counter() - start


async def _cprofile(
    factory: clients.ClientFactory, urls: list[str], total: int
) -> tuple[pstats.Stats, float]:
    client = factory()
    try:
        # Warm: open the connections (every origin at least once).
        await _drive(client, urls, max(CONCURRENCY * 2, len(urls)), CONCURRENCY)
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            elapsed = await _drive(client, urls, total, CONCURRENCY)
        finally:
            profiler.disable()
    finally:
        await aclose_bounded(client)
    return pstats.Stats(profiler), elapsed


def _short(path: str) -> str:
    for marker in ("site-packages/", "/hostpool/", "/lib/python3"):
        at = path.find(marker)
        if at >= 0:
            return (
                path[at + len(marker) :]
                if marker != "/hostpool/"
                else "hostpool/" + path[at + len(marker) :]
            )
    return path


def own_functions(stats: pstats.Stats, total: int, package: str) -> list[dict[str, Any]]:
    """Return ``package``'s functions by cumulative time, with µs per request."""
    rows = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    whole = stats.total_tt  # type: ignore[attr-defined]
    for (filename, line, func), (_cc, calls, tottime, cumtime, _callers) in raw.items():
        if f"/{package}/" not in filename.replace("\\", "/"):
            continue
        rows.append(
            {
                "function": f"{_short(filename)}:{func}",
                "line": line,
                "share": cumtime / whole if whole else 0.0,
                "calls_per_request": calls / total,
                "cum_us_per_request": cumtime / total * 1e6,
                "own_us_per_request": tottime / total * 1e6,
            }
        )
    rows.sort(key=lambda r: r["cum_us_per_request"], reverse=True)
    return rows


def _listing(stats: pstats.Stats, sort: str, limit: int) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats(sort).print_stats(limit)
    return out.getvalue()


def _write_profile(
    path: Path, title: str, stats: pstats.Stats, elapsed: float, total: int, package: str
) -> list[dict[str, Any]]:
    own = own_functions(stats, total, package)
    lines = [
        f"# {title}",
        f"# {total} requests at concurrency {CONCURRENCY} in {elapsed:.2f} s under cProfile "
        f"({total / elapsed:,.0f} req/s with the profiler's overhead)",
        "",
        "## top 30 by cumulative time",
        _listing(stats, "cumulative", 30),
        "## top 30 by own time (tottime)",
        _listing(stats, "tottime", 30),
        f"## {package}'s own functions, per request under the profiler. cum includes",
        "## callees; share = cum / all profiled time; a coroutine counts one call per",
        "## resumption, so calls/req of an async function also counts its awaits.",
        f"{'share':>6} {'cum us/req':>11} {'own us/req':>11} {'calls/req':>10}  function",
    ]
    for row in own[:40]:
        lines.append(
            f"{row['share']:6.1%} {row['cum_us_per_request']:11.1f} "
            f"{row['own_us_per_request']:11.1f} "
            f"{row['calls_per_request']:10.2f}  {row['function']} (line {row['line']})"
        )
    path.write_text("\n".join(lines) + "\n")
    return own


async def _pyinstrument(
    factory: clients.ClientFactory, urls: list[str], total: int, path: Path
) -> bool:
    try:
        from pyinstrument import Profiler
    except ImportError:
        return False
    client = factory()
    try:
        await _drive(client, urls, CONCURRENCY * 2, CONCURRENCY)
        # async_mode="disabled": sample every task on the loop, not only the
        # one that started the profiler.
        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
        try:
            await _drive(client, urls, total, CONCURRENCY)
        finally:
            profiler.stop()
    finally:
        await aclose_bounded(client)
    text = profiler.output_text(unicode=True, color=False, show_all=False)
    await asyncio.to_thread(path.write_text, text)
    return True


async def run(settings: Settings, upstream: Upstream, log: Any) -> dict[str, Any]:
    urls = [upstream.url(HOST, "/")]
    total = settings.profile_requests
    settings.out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    stats, elapsed = await _cprofile(lambda: clients.make_hostpool(LIMITS), urls, total)
    path = settings.out / "profile_hostrouter_c50.txt"
    hostpool_own = _write_profile(
        path, "HostRouter, concurrency 50, one host", stats, elapsed, total, "hostpool"
    )
    files["hostrouter_cprofile"] = path.name
    top_cum = _top_entries(stats, total, 30)
    log(f"profile HostRouter c=50 -> {path}")

    # httpx is ~10x slower at c=50: fewer requests give as many samples.
    total_httpx = max(total // 4, CONCURRENCY * 2)
    stats_httpx, elapsed_httpx = await _cprofile(
        lambda: clients.make_httpx(LIMITS), urls, total_httpx
    )
    path = settings.out / "profile_httpx_c50.txt"
    _write_profile(
        path,
        "httpx.AsyncClient, concurrency 50, one host",
        stats_httpx,
        elapsed_httpx,
        total_httpx,
        "httpcore",
    )
    files["httpx_cprofile"] = path.name
    log(f"profile httpx.AsyncClient c=50 -> {path}")

    path = settings.out / "profile_hostrouter_c50_pyinstrument.txt"
    if await _pyinstrument(lambda: clients.make_hostpool(LIMITS), urls, total, path):
        files["hostrouter_pyinstrument"] = path.name
        log(f"profile HostRouter c=50 (pyinstrument) -> {path}")
    else:
        log("profile: pyinstrument not installed, skipped")

    many = len(upstream.many_ports)
    hosts = 1000 if many >= 1000 else many
    if hosts > 1:
        limits = many_hosts_limits(hosts, CONCURRENCY)
        stats_many, elapsed_many = await _cprofile(
            lambda: clients.make_hostpool(limits), upstream.many_urls(hosts), total
        )
        path = settings.out / f"profile_hostrouter_c50_{hosts}hosts.txt"
        _write_profile(
            path,
            f"HostRouter, concurrency 50, round the {hosts} origins (partition_by='origin')",
            stats_many,
            elapsed_many,
            total,
            "hostpool",
        )
        files["hostrouter_many_cprofile"] = path.name
        log(f"profile HostRouter c=50 over {hosts} origins -> {path}")

    data = {
        "requests": total,
        "concurrency": CONCURRENCY,
        "seconds_under_profiler": elapsed,
        "files": files,
        "hostpool_functions": hostpool_own[:25],
        "top_cumulative": top_cum,
    }
    write_result(settings, "profile", data)
    return data


def _top_entries(stats: pstats.Stats, total: int, limit: int) -> list[dict[str, Any]]:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = [
        {
            "function": f"{_short(filename)}:{func}",
            "cum_us_per_request": cumtime / total * 1e6,
            "own_us_per_request": tottime / total * 1e6,
        }
        for (filename, _line, func), (_cc, _n, tottime, cumtime, _callers) in raw.items()
    ]
    rows.sort(key=lambda r: r["cum_us_per_request"], reverse=True)
    return rows[:limit]

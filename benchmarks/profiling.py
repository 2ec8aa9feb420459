"""Profiles of HostRouter (and, for contrast, httpx.AsyncClient and aiohttp) at concurrency 50.

cProfile over ``profile_requests`` requests against the upstream, written to
``profile_hostrouter_c50.txt``: the top 30 functions by cumulative time, then
hostpool's own functions with their cost per request. With pyinstrument
installed, its call tree goes to ``profile_hostrouter_c50_pyinstrument.txt``.

The breakdown: every profiled function's own time (tottime) goes to one
bucket by the file it is in (:data:`BUCKETS`): httpx's client layer,
hostpool's admission, the HTTP/1.1 connection (parse, serialise, pool,
stream), the event loop. Functions of no bucket (C builtins, other
standard-library modules such as ``contextlib`` or ``typing``, anyio,
sniffio) go to their callers' buckets, in proportion to the time each caller
spent in them (cProfile records it per caller): ``feed_data`` of httptools
counts for the parser, ``Context.run`` (where C Task steps run) and
``socket.recv`` for the event loop. The same for aiohttp's profile. cProfile
slows Python calls down more than C, so each bucket is shown as profiled
µs/request and, scaled by its share, as an estimate of the unprofiled cost:
the client CPU per request measured here without the profiler (interleaved
runs of hostpool and aiohttp, same load).
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import io
import pstats
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import clients
from ._common import Settings, median, write_result
from ._load import aclose_bounded
from .many_hosts import many_hosts_limits
from .throughput import HOST, LIMITS
from .upstream import Upstream

__all__ = ["run"]

CONCURRENCY = 50
_GUARD = 300.0

# -- the breakdown's buckets -----------------------------------------------------------

HTTPX = "httpx client layer"
ADMISSION = "hostpool admission"
HTTP11 = "HTTP/1.1 parse + serialise, pool, stream"
LOOP = "event loop"
AIOHTTP = "aiohttp (client, parser, yarl, multidict)"
DRIVER = "benchmark driver"
OTHER = "other"
#: In the order the table shows them.
BUCKETS = [HTTPX, ADMISSION, HTTP11, AIOHTTP, LOOP, DRIVER, OTHER]
BUCKET_FILES = {
    HTTPX: "httpx/ (the whole package: _client, _models, _urls, _urlparse, _transports, ...)",
    ADMISSION: "hostpool/_admission, _scheduler, _transport, _router, _compat, _stats, "
    "_quota, _limits, ... (hostpool but the three below)",
    HTTP11: "hostpool/_http11, _pool, _stream, _ledger; httptools; httpcore; h11",
    AIOHTTP: "aiohttp/, yarl/, multidict/, propcache/, frozenlist/, aiosignal/, attr/",
    LOOP: "asyncio/, selectors, socket, ssl, uvloop/; and the C work under them "
    "(Task steps in Context.run, epoll, send/recv)",
    DRIVER: "benchmarks/ (the load generator's workers and client wrappers)",
    OTHER: "time nothing above called",
}
_HOSTPOOL_HTTP11 = {"_http11.py", "_pool.py", "_stream.py", "_ledger.py"}
_PACKAGES = [
    ("/httpx/", HTTPX),
    ("/httptools/", HTTP11),
    ("/httpcore/", HTTP11),
    ("/h11/", HTTP11),
    ("/aiohttp/", AIOHTTP),
    ("/yarl/", AIOHTTP),
    ("/multidict/", AIOHTTP),
    ("/propcache/", AIOHTTP),
    ("/frozenlist/", AIOHTTP),
    ("/aiosignal/", AIOHTTP),
    ("/attr/", AIOHTTP),
    ("/asyncio/", LOOP),
    ("/uvloop/", LOOP),
    ("/benchmarks/", DRIVER),
]
_LOOP_MODULES = {"selectors.py", "socket.py", "ssl.py"}

FuncKey = tuple[str, int, str]


def _own_bucket(func: FuncKey) -> str | None:
    """The bucket of a function by its file, or None: its callers decide."""
    path = func[0].replace("\\", "/")
    if path == "~" or path.startswith("<"):
        return None  # a C builtin, or frozen/generated code
    if "/hostpool/" in path and "/benchmarks/" not in path:
        return HTTP11 if path.rsplit("/", 1)[-1] in _HOSTPOOL_HTTP11 else ADMISSION
    for marker, bucket in _PACKAGES:
        if marker in path:
            return bucket
    if path.rsplit("/", 1)[-1] in _LOOP_MODULES:
        return LOOP
    return None  # contextlib, typing, enum, anyio, sniffio, ...


def breakdown(stats: pstats.Stats, total: int) -> dict[str, Any]:
    """Profiled own time per bucket, µs per request (see the module docstring)."""
    raw: dict[FuncKey, Any] = stats.stats  # type: ignore[attr-defined]
    memo: dict[FuncKey, dict[str, float]] = {}

    def shares(func: FuncKey, seen: frozenset[FuncKey]) -> dict[str, float]:
        """Where ``func``'s own time goes: bucket -> fraction."""
        hit = memo.get(func)
        if hit is not None:
            return hit
        own = _own_bucket(func)
        if own is not None:
            result = {own: 1.0}
        else:
            callers = raw[func][4] if func in raw else {}
            weights: dict[str, float] = {}
            whole = 0.0
            for caller, edge in callers.items():
                # edge: (primitive calls, calls, tottime, cumtime) of func called from caller
                weight = float(edge[2]) if isinstance(edge, tuple) else 0.0
                if weight <= 0 or caller in seen:
                    continue
                whole += weight
                for bucket, part in shares(caller, seen | {func}).items():
                    weights[bucket] = weights.get(bucket, 0.0) + weight * part
            result = {b: w / whole for b, w in weights.items()} if whole > 0 else {OTHER: 1.0}
        if not seen:
            memo[func] = result
        return result

    seconds = dict.fromkeys(BUCKETS, 0.0)
    parts: dict[str, list[tuple[float, str]]] = {b: [] for b in BUCKETS}
    for func, (_cc, _nc, tottime, _ct, _callers) in raw.items():
        for bucket, part in shares(func, frozenset()).items():
            seconds[bucket] += tottime * part
            parts[bucket].append((tottime * part, f"{_short(func[0])}:{func[2]}"))
    whole = sum(seconds.values())
    return {
        "profiled_us_per_request": {b: v / total * 1e6 for b, v in seconds.items()},
        "share": {b: (v / whole if whole else 0.0) for b, v in seconds.items()},
        "profiled_total_us_per_request": whole / total * 1e6,
        "top": {
            b: [
                {"function": name, "profiled_us_per_request": t / total * 1e6}
                for t, name in sorted(rows, reverse=True)[:8]
            ]
            for b, rows in parts.items()
            if rows
        },
    }


def _append_breakdown(path: Path, bd: dict[str, Any]) -> None:
    """Append the buckets, and the largest functions in each, to a profile file."""
    lines = [
        "",
        "## breakdown: own time (tottime) per bucket; builtins and stdlib helpers go to "
        "their callers' buckets",
        f"## {'bucket':<45} {'us/req':>8} {'share':>6}  (profiled)",
    ]
    for b in BUCKETS:
        us = bd["profiled_us_per_request"][b]
        if us < 0.05:
            continue
        lines.append(f"   {b:<45} {us:8.1f} {bd['share'][b]:6.1%}")
        for row in bd["top"].get(b, []):
            lines.append(f"       {row['profiled_us_per_request']:8.1f}  {row['function']}")
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")


async def _cpu_per_request(
    factory: clients.ClientFactory, urls: list[str], total: int
) -> dict[str, float]:
    """Client CPU and wall time per request at concurrency 50, without the profiler."""
    gc.collect()
    client = factory()
    try:
        await _drive(client, urls, max(CONCURRENCY * 2, len(urls)), CONCURRENCY)
        cpu0 = time.process_time()
        elapsed = await _drive(client, urls, total, CONCURRENCY)
        cpu = time.process_time() - cpu0
    finally:
        await aclose_bounded(client)
    return {"cpu_us_per_request": cpu / total * 1e6, "rps": total / elapsed}


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
    stdlib = re.search(r"/lib/python3\.\d+/", path)
    if stdlib and "site-packages/" not in path:
        return path[stdlib.end() :]
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


async def _unprofiled(
    factories: dict[str, clients.ClientFactory],
    urls: list[str],
    total: int,
    repeats: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Interleaved unprofiled runs: client CPU per request (medians) and paired ratios."""
    names = list(factories)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            result = await _cpu_per_request(factories[name], urls, total)
            runs[name].append(result)
            log(
                f"profile unprofiled r{repeat + 1} {name:<9} "
                f"{result['cpu_us_per_request']:7.1f} us cpu/req, {result['rps']:8,.0f} req/s"
            )
    out: dict[str, Any] = {
        "runs": runs,
        "cpu_us_per_request": {
            name: median([r["cpu_us_per_request"] for r in rs]) for name, rs in runs.items()
        },
        "rps": {name: median([r["rps"] for r in rs]) for name, rs in runs.items()},
    }
    if "aiohttp" in runs:
        out["cpu hostpool/aiohttp"] = median(
            [
                a["cpu_us_per_request"] / b["cpu_us_per_request"]
                for a, b in zip(runs["hostpool"], runs["aiohttp"], strict=True)
            ]
        )
    return out


def _scaled(bd: dict[str, Any], real_us: float | None) -> None:
    """Add each bucket's estimated unprofiled µs/request (its share of ``real_us``)."""
    bd["real_cpu_us_per_request"] = real_us
    bd["us_per_request"] = {
        b: (share * real_us if real_us is not None else None) for b, share in bd["share"].items()
    }


async def run(settings: Settings, upstream: Upstream, log: Any) -> dict[str, Any]:
    urls = [upstream.url(HOST, "/")]
    total = settings.profile_requests
    settings.out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    compare: dict[str, clients.ClientFactory] = {"hostpool": lambda: clients.make_hostpool(LIMITS)}
    if clients.aiohttp_available():
        compare["aiohttp"] = lambda: clients.make_aiohttp(LIMITS)
    unprofiled = await _unprofiled(compare, urls, total, max(3, settings.repeats), log)

    stats, elapsed = await _cprofile(lambda: clients.make_hostpool(LIMITS), urls, total)
    path = settings.out / "profile_hostrouter_c50.txt"
    hostpool_own = _write_profile(
        path, "HostRouter, concurrency 50, one host", stats, elapsed, total, "hostpool"
    )
    files["hostrouter_cprofile"] = path.name
    top_cum = _top_entries(stats, total, 30)
    breakdowns = {"hostpool": breakdown(stats, total)}
    _scaled(breakdowns["hostpool"], unprofiled["cpu_us_per_request"].get("hostpool"))
    _append_breakdown(path, breakdowns["hostpool"])
    log(f"profile HostRouter c=50 -> {path}")

    if "aiohttp" in compare:
        stats_aio, elapsed_aio = await _cprofile(compare["aiohttp"], urls, total)
        path = settings.out / "profile_aiohttp_c50.txt"
        _write_profile(
            path, "aiohttp, concurrency 50, one host", stats_aio, elapsed_aio, total, "aiohttp"
        )
        files["aiohttp_cprofile"] = path.name
        breakdowns["aiohttp"] = breakdown(stats_aio, total)
        _scaled(breakdowns["aiohttp"], unprofiled["cpu_us_per_request"].get("aiohttp"))
        _append_breakdown(path, breakdowns["aiohttp"])
        log(f"profile aiohttp c=50 -> {path}")

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
        "loop": "asyncio",
        "seconds_under_profiler": elapsed,
        "files": files,
        "unprofiled": unprofiled,
        "buckets": BUCKETS,
        "bucket_files": BUCKET_FILES,
        "breakdown": breakdowns,
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

"""Scenario: one large response body (10 MiB), streamed, on both event loops.

The upstream answers ``/bytes?n=10485760`` with a 10 MiB body. Each client
reads it streamed, chunk by chunk as it comes, and drops the chunks:
httpx and hostpool through ``client.stream("GET", url)`` and
``aiter_bytes()``, aiohttp through ``resp.content.iter_chunked(64 KiB)``,
the bare client by counting the bytes its protocol receives. One request at
a time on one keep-alive connection.

Speed: every (loop, client) pair runs ``large_trial_seconds`` of reads in a
fresh loop with a fresh client (after one warm-up read), interleaved per
repeat; MB/s (10^6 bytes) is the median over repeats, ratios are medians of
per-repeat ratios.

Memory: then, once per (loop, client), under ``tracemalloc``: one warm-up
read, then the peak of the Python heap during one more read, above what
was allocated before it. A client that buffered the body would show ~10 MiB;
one that streams shows its read buffers (the socket read, the stream's
buffer). tracemalloc slows allocation, so this runs apart from the timed
trials.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from . import clients
from ._common import Settings, median, paired_ratio, write_result
from ._loops import loop_names, run_on
from .throughput import BEFORE, HOST, LIMITS, client_factories, rotated, spread_shift
from .upstream import Upstream

__all__ = ["run"]

_GUARD = 120.0
#: hostpool / aiohttp MB/s wanted, on every loop (the issue's).
SPEED_TARGET = 0.7
#: hostpool's heap peak during one read, at most (bounded by its read buffers).
MEMORY_TARGET = 2 * 2**20


async def _reads(
    factory: clients.ClientFactory, url: str, size: int, seconds: float, upstream: Upstream
) -> dict[str, Any]:
    gc.collect()
    client = factory()
    try:
        got = await asyncio.wait_for(client.read_streamed(url), _GUARD)  # warm: connect
        if got != size:
            raise RuntimeError(f"{client.name} read {got} bytes of {size}")
        up0 = upstream.cpu_seconds()
        cpu0 = time.process_time()
        start = time.perf_counter()
        deadline = start + seconds
        reads = 0
        total = 0
        while reads < 1 or time.perf_counter() < deadline:
            got = await asyncio.wait_for(client.read_streamed(url), _GUARD)
            if got != size:
                raise RuntimeError(f"{client.name} read {got} bytes of {size}")
            total += got
            reads += 1
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        up1 = upstream.cpu_seconds()
    finally:
        await asyncio.wait_for(client.aclose(), 30.0)
    return {
        "reads": reads,
        "bytes": total,
        "seconds": elapsed,
        "mb_per_s": total / elapsed / 1e6 if elapsed > 0 else 0.0,
        "cpu_ms_per_read": cpu / reads * 1e3,
        "client_cpu_util": cpu / elapsed if elapsed > 0 else None,
        "upstream_cpu_util": (
            (up1 - up0) / elapsed if up0 is not None and up1 is not None and elapsed > 0 else None
        ),
    }


async def _traced(factory: clients.ClientFactory, url: str, size: int) -> dict[str, Any]:
    """Peak traced heap during one streamed read, above what was allocated before it."""
    gc.collect()
    client = factory()
    tracemalloc.start()
    try:
        await asyncio.wait_for(client.read_streamed(url), _GUARD)
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        got = await asyncio.wait_for(client.read_streamed(url), _GUARD)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await asyncio.wait_for(client.aclose(), 30.0)
    if got != size:
        raise RuntimeError(f"{client.name} read {got} bytes of {size}")
    return {"peak_bytes": peak - before, "retained_bytes": current - before}


def run(settings: Settings, upstream: Upstream, log: Callable[[str], None]) -> dict[str, Any]:
    size = settings.large_body_bytes
    url = upstream.url(HOST, f"/bytes?n={size}")
    factories = client_factories(LIMITS, before=True)
    names = list(factories)
    loops = loop_names()
    variants = [(loop, name) for name in names for loop in loops]
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        loop: {name: [] for name in names} for loop in loops
    }
    for repeat in range(settings.repeats):
        for loop, name in rotated(variants, spread_shift(repeat, settings.repeats, len(variants))):
            trial = run_on(
                loop, _reads(factories[name], url, size, settings.large_trial_seconds, upstream)
            )
            trial["repeat"] = repeat
            samples[loop][name].append(trial)
            log(
                f"large_body r{repeat + 1} {loop:<7} {name:<12} {trial['mb_per_s']:8,.0f} MB/s "
                f"({trial['reads']} reads, {trial['cpu_ms_per_read']:.1f} ms cpu/read, "
                f"upstream cpu {_pct(trial['upstream_cpu_util'])})"
            )
    memory: dict[str, dict[str, dict[str, Any]]] = {loop: {} for loop in loops}
    for loop, name in variants:
        memory[loop][name] = run_on(loop, _traced(factories[name], url, size))
        log(
            f"large_body memory {loop:<7} {name:<12} peak "
            f"{memory[loop][name]['peak_bytes'] / 2**10:8,.0f} KiB during one read"
        )
    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    ratios: dict[str, dict[str, float]] = {}
    for loop in loops:
        by_client = samples[loop]
        medians[loop] = {
            name: {
                "mb_per_s": median([t["mb_per_s"] for t in by_client[name]]),
                "cpu_ms_per_read": median([t["cpu_ms_per_read"] for t in by_client[name]]),
                "upstream_cpu_util": median(
                    [
                        t["upstream_cpu_util"]
                        for t in by_client[name]
                        if t["upstream_cpu_util"] is not None
                    ]
                ),
            }
            for name in names
        }
        hp = by_client["hostpool"]
        ratios[loop] = {
            f"hostpool/{other}": paired_ratio(hp, by_client[other], key="mb_per_s")
            for other in ("aiohttp", "httpx", BEFORE, "bare")
            if other in by_client
        }
        ratios[loop].update(cpu_ratios(by_client))
    data = {
        "url": url,
        "body_bytes": size,
        "chunk_bytes": clients.CHUNK,
        "loop_names": loops,
        "clients": names,
        "samples": samples,
        "medians": medians,
        "ratios": ratios,
        "memory": memory,
        "targets": targets(ratios, memory),
    }
    write_result(settings, "large_body", data)
    return data


def cpu_ratios(by_client: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """hostpool's client CPU per read over aiohttp's (paired): the cost when the
    upstream, not the client, bounds the MB/s."""
    if "aiohttp" not in by_client:
        return {}
    return {
        "cpu hostpool/aiohttp": paired_ratio(
            by_client["hostpool"], by_client["aiohttp"], key="cpu_ms_per_read"
        )
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def targets(
    ratios: dict[str, dict[str, float]], memory: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if all("hostpool/aiohttp" in r for r in ratios.values()):
        value = {loop: r["hostpool/aiohttp"] for loop, r in ratios.items()}
        out["hostpool_vs_aiohttp_mb_per_s"] = {
            "value": value,
            "target": f">= {SPEED_TARGET} on every loop ({', '.join(ratios)})",
            "met": all(v >= SPEED_TARGET for v in value.values()),
        }
    peaks = {loop: float(m["hostpool"]["peak_bytes"]) for loop, m in memory.items()}
    out["hostpool_read_peak"] = {
        "value": peaks,
        "target": f"heap peak during one read <= {MEMORY_TARGET / 2**20:g} MiB on every loop",
        "met": all(v <= MEMORY_TARGET for v in peaks.values()),
    }
    return out

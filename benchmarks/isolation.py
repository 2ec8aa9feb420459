"""Scenario 1: isolation. A slow host is flooded; how fast is the other host?

The slow host (``127.0.0.1``) answers in ``flood_delay_ms`` (0.5 s) and gets
``flood`` (200) requests at once. The fast host (``127.0.0.2``, a different
hostname, so hostpool gives it its own partition) answers at once and gets
``fast_requests`` (100) requests, one every ``fast_interval_ms`` (open loop:
a request is sent on schedule whether or not the previous one finished).

Equal budgets, as in the README's opening measurement: 20 sockets in all;
hostpool and aiohttp cap each host at 10. Each client is measured alone (no
flood) and under the flood, all six runs interleaved per repeat.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from . import clients
from ._common import Settings, median, percentile, write_result
from ._load import aclose_bounded
from .upstream import Upstream

__all__ = ["run"]

SLOW_HOST = "127.0.0.1"
FAST_HOST = "127.0.0.2"
LIMITS = clients.Limits(total=20, per_host=10)
_FLOOD_HEAD_START = 0.05  # seconds between the flood and the first fast request
_GUARD = 120.0


def factories() -> dict[str, clients.ClientFactory]:
    out: dict[str, clients.ClientFactory] = {}
    if clients.aiohttp_available():
        out["aiohttp"] = lambda: clients.make_aiohttp(LIMITS)
    out["httpx"] = lambda: clients.make_httpx(LIMITS)
    out["hostpool"] = lambda: clients.make_hostpool(LIMITS)
    return out


async def trial(
    factory: clients.ClientFactory,
    slow_url: str,
    fast_url: str,
    settings: Settings,
    *,
    flood: bool,
) -> dict[str, Any]:
    """Return the fast host's latencies (seconds) with or without the flood."""
    gc.collect()
    client = factory()
    flood_tasks: list[asyncio.Task[int]] = []
    latencies: list[float] = []
    errors = 0
    try:
        await asyncio.wait_for(client.get(fast_url), _GUARD)  # open a connection
        if flood:
            flood_tasks = [asyncio.create_task(client.get(slow_url)) for _ in range(settings.flood)]
            await asyncio.sleep(_FLOOD_HEAD_START)

        async def one() -> None:
            nonlocal errors
            sent = time.perf_counter()
            try:
                await client.get(fast_url)
            except Exception:  # counted and reported
                errors += 1
                return
            latencies.append(time.perf_counter() - sent)

        loop = asyncio.get_running_loop()
        start = loop.time()
        interval = settings.fast_interval_ms / 1000.0
        fast_tasks = []
        for i in range(settings.fast_requests):
            delay = start + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            fast_tasks.append(asyncio.create_task(one()))
        await asyncio.wait_for(asyncio.gather(*fast_tasks), _GUARD)
        slow_done = sum(1 for t in flood_tasks if t.done() and not t.cancelled())
    finally:
        for task in flood_tasks:
            task.cancel()
        if flood_tasks:
            await asyncio.wait_for(asyncio.gather(*flood_tasks, return_exceptions=True), _GUARD)
        await aclose_bounded(client)
    return {
        "latencies": latencies,
        "errors": errors,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": max(latencies) if latencies else float("nan"),
        "slow_completed_meanwhile": slow_done if flood else None,
    }


async def run(settings: Settings, upstream: Upstream, log: Any) -> dict[str, Any]:
    slow_url = upstream.url(SLOW_HOST, f"/delay?ms={settings.flood_delay_ms}")
    fast_url = upstream.url(FAST_HOST, "/")
    made = factories()
    names = list(made)
    runs = [(name, flood) for flood in (False, True) for name in names]
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {"alone": [], "flood": []} for name in names
    }
    for repeat in range(settings.isolation_repeats):
        shift = repeat % len(runs)
        for name, flood in runs[shift:] + runs[:shift]:
            result = await trial(made[name], slow_url, fast_url, settings, flood=flood)
            samples[name]["flood" if flood else "alone"].append(result)
            log(
                f"isolation r{repeat + 1} {name:<8} {'flood' if flood else 'alone':<5} "
                f"p50 {result['p50'] * 1e3:8.2f} ms  p99 {result['p99'] * 1e3:8.2f} ms"
            )
    summary = summarize(samples)
    data = {
        "limits": LIMITS.__dict__,
        "slow_url": slow_url,
        "fast_url": fast_url,
        "samples": samples,
        **summary,
    }
    write_result(settings, "isolation", data)
    return data


def summarize(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_mode in samples.items():
        medians[name] = {
            mode: {
                "p50_ms": median([t["p50"] for t in trials]) * 1e3,
                "p99_ms": median([t["p99"] for t in trials]) * 1e3,
                "max_ms": median([t["max"] for t in trials]) * 1e3,
                # All runs' samples together: a steadier p99 than one run's 100.
                "p99_pooled_ms": percentile([x for t in trials for x in t["latencies"]], 99) * 1e3,
                "errors": float(sum(t["errors"] for t in trials)),
            }
            for mode, trials in by_mode.items()
        }
    hp = medians["hostpool"]
    own = hp["flood"]["p99_ms"] / hp["alone"]["p99_ms"]
    vs_httpx = medians["httpx"]["flood"]["p99_ms"] / hp["flood"]["p99_ms"]
    ratios = {"hostpool flood/alone p99": own, "httpx/hostpool flood p99": vs_httpx}
    if "aiohttp" in medians:
        ratios["aiohttp/hostpool flood p99"] = (
            medians["aiohttp"]["flood"]["p99_ms"] / hp["flood"]["p99_ms"]
        )
    return {
        "medians": medians,
        "ratios": ratios,
        "targets": {
            "hostpool_flood_vs_alone": {"value": own, "target": "<= 2", "met": own <= 2},
            "httpx_vs_hostpool_under_flood": {
                "value": vs_httpx,
                "target": ">= 20",
                "met": vs_httpx >= 20,
            },
        },
    }

"""Scenario 3: many hosts. Per-request cost with 1, 10, 100, 1,000 partitions.

One upstream process listens on 1,000 ports of ``127.0.0.1``; hostpool uses
``partition_by="origin"``, so every port is a partition. ``many_concurrency``
(50) workers go round the first ``P`` origins. Every client gets a budget
large enough to keep one socket per origin alive (2,000 sockets, 50 per
host), so the figures compare pooling, not reconnecting.

The per-request cost is the client process's CPU time per request (the
upstream runs elsewhere); wall time per request is reported too.

Then the memory one idle partition holds (with its idle keep-alive socket):
traced by ``tracemalloc``, touching ``P`` origins one after another.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any

from . import clients
from ._common import Settings, median, paired_ratio, rss_bytes, settle_memory, write_result
from ._load import aclose_bounded, closed_loop_trial
from .throughput import rotated
from .upstream import Upstream

__all__ = ["run"]

_GUARD = 120.0
_SLOW_TRIAL = 30.0  # seconds, warm-up included


def many_hosts_limits(top: int, concurrency: int) -> clients.Limits:
    """Limits with room for one idle socket per origin, and ``concurrency`` per origin."""
    return clients.Limits(
        total=2 * top + concurrency,
        per_host=concurrency,
        partition_by="origin",
        # Long enough that no socket expires while 1,000 origins are warmed.
        keepalive_expiry=120.0,
    )


def factories(limits: clients.Limits) -> dict[str, clients.ClientFactory]:
    out: dict[str, clients.ClientFactory] = {"bare": clients.make_bare}
    if clients.aiohttp_available():
        out["aiohttp"] = lambda: clients.make_aiohttp(limits)
    out["httpx"] = lambda: clients.make_httpx(limits)
    out["hostpool"] = lambda: clients.make_hostpool(limits)
    return out


async def memory_per_idle_origin(factory: clients.ClientFactory, urls: list[str]) -> dict[str, Any]:
    """Touch ``urls`` one by one; return the traced memory each idle origin holds.

    ``idle_sockets`` checks that every origin really kept its socket.
    """
    settle_memory()
    tracemalloc.start()
    client = factory()
    try:
        await asyncio.wait_for(client.get(urls[0]), _GUARD)
        settle_memory()
        base = tracemalloc.get_traced_memory()[0]
        rss0 = rss_bytes()
        for url in urls[1:]:
            await asyncio.wait_for(client.get(url), _GUARD)
        settle_memory()
        after = tracemalloc.get_traced_memory()[0]
        rss1 = rss_bytes()
        extra: dict[str, Any] = {"idle_sockets": client.idle_sockets()}
    finally:
        tracemalloc.stop()
        await aclose_bounded(client)
    n = max(len(urls) - 1, 1)
    return {
        "origins": len(urls),
        "traced_bytes_per_origin": (after - base) / n,
        "rss_bytes_per_origin": (rss1 - rss0) / n,
        **extra,
    }


async def run(settings: Settings, upstream: Upstream, log: Any) -> dict[str, Any]:
    limits = many_hosts_limits(max(max(settings.partitions), 1), settings.many_concurrency)
    made = factories(limits)
    names = list(made)
    all_urls = upstream.many_urls(max(settings.partitions))
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        str(p): {name: [] for name in names} for p in settings.partitions
    }
    # A cell whose trial takes minutes (httpx's pool warming 1,000 origins
    # polls every idle socket on every request) runs once, not every repeat.
    single: set[tuple[int, str]] = set()
    for repeat in range(settings.many_repeats):
        for p in settings.partitions:
            urls = all_urls[:p]
            for name in rotated(names, repeat):
                if (p, name) in single:
                    continue
                result = await closed_loop_trial(
                    made[name],
                    urls,
                    settings.many_concurrency,
                    settings.many_trial_seconds,
                    upstream,
                )
                result["repeat"] = repeat
                samples[str(p)][name].append(result)
                if result["seconds_with_warmup"] > _SLOW_TRIAL:
                    single.add((p, name))
                log(
                    f"many-hosts r{repeat + 1} P={p:<5} {name:<8} {result['rps']:>8,.0f} req/s "
                    f"cpu {result['cpu_us_per_request'] or 0:7.1f} us/req"
                    + (
                        f" (took {result['seconds_with_warmup']:.0f} s: not repeated)"
                        if (p, name) in single
                        else ""
                    )
                )
    memory: dict[str, Any] = {}
    for name in names:
        if name == "bare":
            continue
        # Every request to httpx's pool polls every idle socket, and under
        # tracemalloc 1,000 of them take minutes: 200 give the same per-origin figure.
        urls = all_urls[:200] if name == "httpx" else all_urls
        memory[name] = await memory_per_idle_origin(made[name], urls)
        gc.collect()
        log(
            f"many-hosts memory {name:<8} "
            f"{memory[name]['traced_bytes_per_origin'] / 1024:7.1f} KiB per idle origin"
        )
    summary = summarize(samples, names)
    data = {"limits": limits.__dict__, "samples": samples, "memory": memory, **summary}
    write_result(settings, "many_hosts", data)
    return data


def summarize(
    samples: dict[str, dict[str, list[dict[str, Any]]]], names: list[str]
) -> dict[str, Any]:
    medians: dict[str, dict[str, dict[str, float]]] = {}
    ratios: dict[str, dict[str, float]] = {}
    for p, by_client in samples.items():
        medians[p] = {
            name: {
                "rps": median([t["rps"] for t in by_client[name]]),
                "cpu_us_per_request": median(
                    [t["cpu_us_per_request"] for t in by_client[name] if t["cpu_us_per_request"]]
                ),
                "wall_us_per_request": median(
                    [t["wall_us_per_request"] for t in by_client[name] if t["wall_us_per_request"]]
                ),
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
        ratios[p] = {
            f"hostpool/{peer}": paired_ratio(by_client["hostpool"], by_client[peer])
            for peer in names
            if peer != "hostpool"
        }
    costs = [m["hostpool"]["cpu_us_per_request"] for m in medians.values()]
    spread = max(costs) / min(costs) - 1 if costs and min(costs) > 0 else float("nan")
    return {
        "medians": medians,
        "ratios": ratios,
        "targets": {
            "hostpool_cost_flat": {
                "value": spread,
                "target": "max/min CPU per request over partition counts <= 1.2",
                "met": spread <= 0.2,
            }
        },
    }

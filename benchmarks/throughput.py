"""Scenario 2: throughput against one host at concurrency 1, 10, 50, 200.

Clients run interleaved (bare, aiohttp, httpx, hostpool, then the next
repeat, starting one client later), each trial with a fresh client. The bare
asyncio client is the upstream's ceiling: while it (and aiohttp) go faster
than httpx and hostpool, the upstream is not what limits them.
"""

from __future__ import annotations

from typing import Any

from . import clients
from ._common import Settings, median, paired_ratio, write_result
from ._load import closed_loop_trial
from .upstream import Upstream

__all__ = ["run"]

HOST = "127.0.0.1"
LIMITS = clients.Limits(total=100, per_host=100)


def client_factories(limits: clients.Limits) -> dict[str, clients.ClientFactory]:
    """The four clients of the single-host comparisons, with equal limits."""
    factories: dict[str, clients.ClientFactory] = {"bare": clients.make_bare}
    if clients.aiohttp_available():
        factories["aiohttp"] = lambda: clients.make_aiohttp(limits)
    factories["httpx"] = lambda: clients.make_httpx(limits)
    factories["hostpool"] = lambda: clients.make_hostpool(limits)
    return factories


def rotated(names: list[str], shift: int) -> list[str]:
    """``names`` starting at position ``shift``: A B C, B C A, C A B, ..."""
    shift %= len(names)
    return names[shift:] + names[:shift]


async def run(settings: Settings, upstream: Upstream, log: Any) -> dict[str, Any]:
    url = upstream.url(HOST, "/")
    factories = client_factories(LIMITS)
    names = list(factories)
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        str(c): {name: [] for name in names} for c in settings.concurrency
    }
    for repeat in range(settings.repeats):
        for c in settings.concurrency:
            for name in rotated(names, repeat):
                trial = await closed_loop_trial(
                    factories[name], [url], c, settings.trial_seconds, upstream
                )
                trial["repeat"] = repeat
                samples[str(c)][name].append(trial)
                log(
                    f"throughput r{repeat + 1} c={c:<3} {name:<8} {trial['rps']:>9,.0f} req/s"
                    f"  upstream cpu {_pct(trial['upstream_cpu_util'])}"
                )
    summary = summarize(samples, names)
    data = {"limits": LIMITS.__dict__, "url": url, "samples": samples, **summary}
    write_result(settings, "throughput", data)
    return data


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def summarize(
    samples: dict[str, dict[str, list[dict[str, Any]]]], names: list[str]
) -> dict[str, Any]:
    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    ratios: dict[str, dict[str, float]] = {}
    for c, by_client in samples.items():
        medians[c] = {}
        for name in names:
            trials = by_client[name]
            medians[c][name] = {
                "rps": median([t["rps"] for t in trials]),
                "cpu_us_per_request": median(
                    [t["cpu_us_per_request"] for t in trials if t["cpu_us_per_request"]]
                ),
                "upstream_cpu_util": median(
                    [t["upstream_cpu_util"] for t in trials if t["upstream_cpu_util"] is not None]
                ),
                "errors": sum(t["errors"] for t in trials),
            }
        hp = by_client["hostpool"]
        ratios[c] = {"hostpool/httpx": paired_ratio(hp, by_client["httpx"])}
        if "aiohttp" in by_client:
            ratios[c]["hostpool/aiohttp"] = paired_ratio(hp, by_client["aiohttp"])
        ratios[c]["hostpool/bare"] = paired_ratio(hp, by_client["bare"])
    return {"medians": medians, "ratios": ratios, "targets": targets(medians, ratios)}


def targets(
    medians: dict[str, dict[str, dict[str, float | None]]], ratios: dict[str, dict[str, float]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "50" in ratios:
        r50 = ratios["50"]["hostpool/httpx"]
        out["hostpool_vs_httpx_at_50"] = {"value": r50, "target": ">= 4", "met": r50 >= 4}
    hp = [float(m["hostpool"]["rps"] or 0.0) for m in medians.values()]
    if hp and max(hp) > 0:
        spread = max(hp) / min(hp) - 1 if min(hp) > 0 else float("inf")
        out["hostpool_flat"] = {
            "value": spread,
            "target": "max/min req/s over concurrency <= 1.2 (within 20%)",
            "met": spread <= 0.2,
        }
    # The upstream is not the bottleneck when it serves someone else faster.
    faster = {}
    for c, m in medians.items():
        under_test = max(float(m["hostpool"]["rps"] or 0), float(m["httpx"]["rps"] or 0))
        peers = [float(m[n]["rps"] or 0) for n in ("bare", "aiohttp") if n in m]
        faster[c] = max(peers) > under_test
    out["upstream_not_bottleneck"] = {
        "value": faster,
        "target": "bare/aiohttp faster than httpx and hostpool at every concurrency",
        "met": all(faster.values()),
    }
    return out

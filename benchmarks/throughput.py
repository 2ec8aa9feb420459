"""Scenario 2: throughput against one host at concurrency 1, 10, 50, 200, on two loops.

Every client (bare, aiohttp, httpx, hostpool, and ``hostpool-h11``: hostpool
with its fast HTTP/1.1 path turned off, the "before" column) runs on
asyncio's default event loop and on uvloop. Each trial runs in an event loop
of its own (see ``_loops.py``) with a fresh client; the (loop, client) pairs
are interleaved, each repeat starting further along the list. The upstream
process is shared. The bare asyncio client is the upstream's ceiling: while
it (and aiohttp) go faster than httpx and hostpool, the upstream is not what
limits them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from . import clients
from ._common import Settings, median, paired_ratio, write_result
from ._load import closed_loop_trial
from ._loops import DEFAULT_LOOP, loop_names, run_on
from .upstream import Upstream

__all__ = ["run"]

HOST = "127.0.0.1"
LIMITS = clients.Limits(total=100, per_host=100)
BEFORE = "hostpool-h11"

#: hostpool / aiohttp req/s wanted at each concurrency, on every loop (the issue's).
AIOHTTP_TARGETS = {"1": 0.4, "50": 0.5, "200": 0.4}
#: hostpool's client CPU per request / aiohttp's at c=50, at most.
CPU_TARGET = 2.0

T = TypeVar("T")


def client_factories(
    limits: clients.Limits, *, before: bool = False
) -> dict[str, clients.ClientFactory]:
    """The clients of the single-host comparisons, with equal limits.

    ``before`` adds ``hostpool-h11`` (the fast HTTP/1.1 path off) when this
    hostpool has that path.
    """
    factories: dict[str, clients.ClientFactory] = {"bare": clients.make_bare}
    if clients.aiohttp_available():
        factories["aiohttp"] = lambda: clients.make_aiohttp(limits)
    factories["httpx"] = lambda: clients.make_httpx(limits)
    factories["hostpool"] = lambda: clients.make_hostpool(limits)
    if before and clients.fast_path_switch_available():
        factories[BEFORE] = lambda: clients.make_hostpool_h11(limits)
    return factories


def rotated(names: Sequence[T], shift: int) -> list[T]:
    """``names`` starting at position ``shift``: A B C, B C A, C A B, ..."""
    shift %= len(names)
    return [*names[shift:], *names[:shift]]


def spread_shift(repeat: int, repeats: int, count: int) -> int:
    """How far repeat ``repeat`` of ``repeats`` rotates a list of ``count``: evenly spread."""
    return (repeat * count) // max(repeats, 1) if repeats < count else repeat


Samples = dict[str, dict[str, dict[str, list[dict[str, Any]]]]]  # loop -> c -> client -> trials


def run(settings: Settings, upstream: Upstream, log: Callable[[str], None]) -> dict[str, Any]:
    url = upstream.url(HOST, "/")
    factories = client_factories(LIMITS, before=True)
    names = list(factories)
    loops = loop_names()
    variants = [(loop, name) for name in names for loop in loops]
    samples: Samples = {
        loop: {str(c): {name: [] for name in names} for c in settings.concurrency} for loop in loops
    }
    for repeat in range(settings.repeats):
        shift = spread_shift(repeat, settings.repeats, len(variants))
        for c in settings.concurrency:
            for loop, name in rotated(variants, shift):
                trial = run_on(
                    loop,
                    closed_loop_trial(factories[name], [url], c, settings.trial_seconds, upstream),
                )
                trial["repeat"] = repeat
                samples[loop][str(c)][name].append(trial)
                log(
                    f"throughput r{repeat + 1} c={c:<3} {loop:<7} {name:<12} "
                    f"{trial['rps']:>9,.0f} req/s {_us(trial['cpu_us_per_request'])} us cpu/req"
                    f"  upstream cpu {_pct(trial['upstream_cpu_util'])}"
                )
    by_loop = {loop: summarize(samples[loop], names) for loop in loops}
    default = by_loop[DEFAULT_LOOP]
    data = {
        "limits": LIMITS.__dict__,
        "url": url,
        "loop_names": loops,
        "clients": names,
        "samples": samples,
        # The default loop's figures at the top level too: other sections read them.
        "medians": default["medians"],
        "ratios": default["ratios"],
        "loops": by_loop,
        "targets": targets(by_loop),
    }
    write_result(settings, "throughput", data)
    return data


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:7.1f}"


def summarize(
    samples: dict[str, dict[str, list[dict[str, Any]]]], names: list[str]
) -> dict[str, Any]:
    """Medians per concurrency and client, and the paired ratios, for one loop."""
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
                "client_cpu_util": median(
                    [t["client_cpu_util"] for t in trials if t["client_cpu_util"] is not None]
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
        if BEFORE in by_client:
            ratios[c][f"hostpool/{BEFORE}"] = paired_ratio(hp, by_client[BEFORE])
            if "aiohttp" in by_client:
                ratios[c][f"{BEFORE}/aiohttp"] = paired_ratio(
                    by_client[BEFORE], by_client["aiohttp"]
                )
        if "aiohttp" in by_client:
            ratios[c]["cpu hostpool/aiohttp"] = paired_ratio(
                hp, by_client["aiohttp"], key="cpu_us_per_request"
            )
    return {"medians": medians, "ratios": ratios}


def targets(by_loop: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets; the older ones (hostpool vs httpx, flat) on the default loop."""
    default = by_loop[DEFAULT_LOOP]
    medians = default["medians"]
    ratios = default["ratios"]
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
    # hostpool / aiohttp on every loop, as the issue asks.
    if all("hostpool/aiohttp" in r for r in ratios.values()):
        for c, wanted in AIOHTTP_TARGETS.items():
            if c not in ratios:
                continue
            value = {loop: data["ratios"][c]["hostpool/aiohttp"] for loop, data in by_loop.items()}
            out[f"hostpool_vs_aiohttp_at_{c}"] = {
                "value": value,
                "target": f">= {wanted} on every loop ({', '.join(by_loop)})",
                "met": all(v >= wanted for v in value.values()),
            }
        if "50" in ratios:
            value = {
                loop: data["ratios"]["50"]["cpu hostpool/aiohttp"] for loop, data in by_loop.items()
            }
            out["hostpool_cpu_vs_aiohttp_at_50"] = {
                "value": value,
                "target": f"client CPU per request <= {CPU_TARGET:g}x aiohttp's on every loop",
                "met": all(v <= CPU_TARGET for v in value.values()),
            }
    # The upstream is not the bottleneck when it serves someone else faster.
    faster = {}
    for loop, data in by_loop.items():
        for c, m in data["medians"].items():
            under_test = max(float(m["hostpool"]["rps"] or 0), float(m["httpx"]["rps"] or 0))
            peers = [float(m[n]["rps"] or 0) for n in ("bare", "aiohttp") if n in m]
            faster[f"{loop} c={c}"] = max(peers) > under_test
    out["upstream_not_bottleneck"] = {
        "value": faster,
        "target": "bare/aiohttp faster than httpx and hostpool at every concurrency and loop",
        "met": all(faster.values()),
    }
    return out

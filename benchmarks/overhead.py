"""Layer costs without sockets: where a request's CPU time goes.

- ``httpx``: ``httpx.AsyncClient(transport=httpx.MockTransport(...))``, the
  cost of httpx's client layer alone (a canned response, no socket);
- ``hostpool``: ``HostRouter`` over the same canned transport (admission,
  partition lookup and stats on top of httpx's client layer; no pool);
- ``admission``: hostpool's admission layer alone (partition lookup,
  ``acquire``, ``release``), driven through its private API.

Sequential requests (concurrency 1), interleaved per repeat; medians of µs
per request.

Stats overhead (issue target: under 2% of throughput): stats are always on,
so there is no "off" run to compare with. Instead the exact bookkeeping a
request does for ``stats()`` (two wait-histogram samples, the request
counters, the peak check) is timed on its own and set against the whole
request's cost with a canned transport — the cheapest request there is, so
the share is an upper bound. The cost of taking a ``stats()`` snapshot (what
a metrics scrape does) is reported per live partition.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import httpx

import hostpool
from hostpool._stats import WaitHistogram

from ._common import Settings, median, write_result

__all__ = ["run"]

URL = "http://127.0.0.1:9/"  # never contacted: the transport is canned


def _canned(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b"ok")


async def _client_loop(client: httpx.AsyncClient, n: int) -> float:
    await client.get(URL)
    start = time.perf_counter()
    for _ in range(n):
        await client.get(URL)
    return (time.perf_counter() - start) / n * 1e6


async def _httpx(n: int) -> float:
    async with httpx.AsyncClient(transport=httpx.MockTransport(_canned)) as client:
        return await _client_loop(client, n)


async def _hostpool(n: int) -> float:
    async with hostpool.HostRouter(transport=httpx.MockTransport(_canned)) as router:
        return await _client_loop(router, n)


async def _admission(n: int) -> float:
    async with hostpool.HostRouter(transport=httpx.MockTransport(_canned)) as router:
        admission = router._hp_admission
        url = httpx.URL(URL)
        start = time.perf_counter()
        for _ in range(n):
            ticket = await admission.admit(url, None)
            admission.release(ticket)
        return (time.perf_counter() - start) / n * 1e6


class _Counters:
    __slots__ = ("peak", "requests", "requests_completed")

    def __init__(self) -> None:
        self.requests = 0
        self.requests_completed = 0
        self.peak = 0


def _stats_bookkeeping_us(n: int) -> float:
    """µs per request of the bookkeeping behind stats(), as acquire/release do it."""
    partition_wait, router_wait, counters = WaitHistogram(), WaitHistogram(), _Counters()
    in_flight = 1
    start = time.perf_counter()
    for _ in range(n):
        counters.requests += 1
        if in_flight > counters.peak:
            counters.peak = in_flight
        partition_wait.record(0.0)
        router_wait.record(0.0)
        counters.requests_completed += 1
    loop = time.perf_counter()
    for _ in range(n):
        pass
    end = time.perf_counter()
    return max(0.0, (loop - start) - (end - loop)) / n * 1e6


async def _snapshot_us_per_partition(partitions: int) -> float:
    async with hostpool.HostRouter(transport=httpx.MockTransport(_canned)) as router:
        for i in range(partitions):
            await router.get(f"http://h{i}.example/")
        router.stats()
        start = time.perf_counter()
        for _ in range(5):
            router.stats()
        return (time.perf_counter() - start) / 5 / partitions * 1e6


async def run(settings: Settings, upstream: object, log: Any) -> dict[str, Any]:
    layers = {"httpx": _httpx, "hostpool": _hostpool, "admission": _admission}
    samples: dict[str, list[float]] = {name: [] for name in layers}
    for repeat in range(settings.repeats):
        names = list(layers)
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            us = await layers[name](settings.overhead_requests)
            samples[name].append(us)
            log(f"overhead r{repeat + 1} {name:<9} {us:7.1f} us/request (canned transport)")
    medians = {name: median(values) for name, values in samples.items()}
    bookkeeping = median(
        [_stats_bookkeeping_us(settings.overhead_requests * 10) for _ in range(settings.repeats)]
    )
    snapshot = await _snapshot_us_per_partition(200 if settings.overhead_requests > 100 else 20)
    share = bookkeeping / medians["hostpool"]
    log(
        f"overhead stats bookkeeping {bookkeeping:.2f} us/request = {share:.2%} of a "
        f"canned request; stats() {snapshot:.1f} us per partition"
    )
    data = {
        "requests_per_trial": settings.overhead_requests,
        "samples_us": samples,
        "medians_us": medians,
        "ratios": {
            "hostpool/httpx": median(
                [a / b for a, b in zip(samples["hostpool"], samples["httpx"], strict=True)]
            )
        },
        "hostpool_added_us": medians["hostpool"] - medians["httpx"],
        "stats": {
            "bookkeeping_us_per_request": bookkeeping,
            "share_of_canned_request": share,
            "snapshot_us_per_partition": snapshot,
        },
        "targets": {
            "stats_overhead": {
                "value": share,
                "target": "stats bookkeeping <= 2% of a request (canned transport: upper bound)",
                "met": share <= 0.02,
            }
        },
    }
    write_result(settings, "overhead", data)
    return data

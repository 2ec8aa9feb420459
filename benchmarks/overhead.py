"""Layer costs without sockets: where a request's CPU time goes.

- ``httpx``: ``httpx.AsyncClient(transport=httpx.MockTransport(...))``, the
  cost of httpx's client layer alone (a canned response, no socket);
- ``hostpool``: ``HostRouter`` over the same canned transport (admission,
  partition lookup and stats on top of httpx's client layer; no pool);
- ``admission``: hostpool's admission layer alone (partition lookup,
  ``acquire``, ``release``), driven through its private API.

Sequential requests (concurrency 1), interleaved per repeat; medians of µs
per request.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import httpx

import hostpool

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
            key, name = admission.partitioner(url)
            partition = admission.partition(key, name)
            ticket = await admission.acquire(partition, None)
            admission.release(ticket)
        return (time.perf_counter() - start) / n * 1e6


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
    }
    write_result(settings, "overhead", data)
    return data

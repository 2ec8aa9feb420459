"""Closed-loop load: ``concurrency`` workers sending requests until a deadline.

Every loop is bounded by a deadline, by a cap on errors, and every await by a
timeout, so a misbehaving client cannot hang the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Sequence
from typing import Any

from .clients import Client, ClientFactory
from .upstream import Upstream

__all__ = ["closed_loop_trial", "aclose_bounded"]

_GUARD = 120.0  # seconds: the longest any single phase may take
#: Seconds per URL allowed for warming every URL one at a time (httpx.AsyncClient's
#: pool scans every idle socket on every request: warming 1,000 origins took 88 s
#: on one machine and over 120 s on a machine half as fast).
_WARM_PER_URL = 0.5
_MAX_ERRORS = 1000


async def aclose_bounded(client: Client) -> None:
    """Close a client, giving up after a while rather than hang the suite."""
    with contextlib.suppress(Exception):  # best effort, bounded
        await asyncio.wait_for(client.aclose(), 30.0)


async def closed_loop_trial(
    factory: ClientFactory,
    urls: Sequence[str],
    concurrency: int,
    seconds: float,
    upstream: Upstream | None,
    *,
    warm_all: bool = True,
) -> dict[str, Any]:
    """Run one trial with a fresh client; return requests/s and per-request costs.

    The client is warmed first: ``concurrency`` requests at once (so its
    connections are open), then with ``warm_all`` one request to every URL,
    one at a time (at concurrency, httpx's pool would take minutes to open
    1,000 connections, and that is not what the trial measures).
    Then ``concurrency`` workers send requests, going round the URLs, until
    ``seconds`` have passed; requests in flight at the deadline may complete
    (and count) for another ``seconds`` (at least 1 s), then are cancelled: a
    client whose requests each take seconds of CPU (httpx's pool with 1,000
    idle sockets) must not stretch a one-second trial into minutes.
    """
    gc.collect()
    began = time.perf_counter()
    client = factory()
    try:
        await _warm(client, urls, concurrency, warm_all)
        done = 0
        errors = 0
        turn = 0
        count = len(urls)
        first_error: str | None = None

        async def worker() -> None:
            nonlocal done, errors, turn, first_error
            while time.perf_counter() < deadline and errors < _MAX_ERRORS:
                url = urls[turn % count]
                turn += 1
                try:
                    await client.get(url)
                except Exception as exc:  # counted and reported
                    errors += 1
                    first_error = first_error or repr(exc)
                else:
                    done += 1

        up_cpu0 = upstream.cpu_seconds() if upstream is not None else None
        cpu0 = time.process_time()
        start = time.perf_counter()
        deadline = start + seconds
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=seconds + max(seconds, 1.0))
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        up_cpu1 = upstream.cpu_seconds() if upstream is not None else None
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_GUARD)
        for task in tasks:
            failure = None if task.cancelled() else task.exception()
            if failure is not None:
                raise failure
    finally:
        await aclose_bounded(client)
    result: dict[str, Any] = {
        "requests": done,
        "errors": errors,
        "cancelled_at_hard_stop": len(pending),
        "seconds_with_warmup": time.perf_counter() - began,
        "seconds": elapsed,
        "rps": done / elapsed if elapsed > 0 else 0.0,
        "wall_us_per_request": elapsed / done * 1e6 if done else None,
        "cpu_us_per_request": cpu / done * 1e6 if done else None,
        "client_cpu_util": cpu / elapsed if elapsed > 0 else None,
        "upstream_cpu_util": (
            (up_cpu1 - up_cpu0) / elapsed
            if up_cpu0 is not None and up_cpu1 is not None and elapsed > 0
            else None
        ),
    }
    if first_error is not None:
        result["first_error"] = first_error
    return result


async def _warm(client: Client, urls: Sequence[str], concurrency: int, warm_all: bool) -> None:
    first = urls[0]
    await asyncio.wait_for(asyncio.gather(*(client.get(first) for _ in range(concurrency))), _GUARD)
    if warm_all and len(urls) > 1:

        async def warm_each() -> None:
            for url in urls[1:]:
                await client.get(url)

        await asyncio.wait_for(warm_each(), max(_GUARD, _WARM_PER_URL * len(urls)))

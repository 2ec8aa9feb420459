"""The demo's workload: the schedule both clients run, running it, and its figures.

A flood of requests to the slow host and paced requests to the healthy one,
sent at the same planned instants through a shared ``httpx.AsyncClient`` and
through a :class:`~hostpool.HostRouter` with the same connection budget.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import anyio
import anyio.to_thread
import httpx

from .. import HostRouter, RouterStats
from .._format import quantile
from .config import DemoConfig
from .progress import Progress
from .server import Kind, LoopbackUpstreams, UpstreamCounters

__all__ = ["Planned", "RunResult", "Sample", "Summary", "plan", "run_both", "summarize"]

_JITTER = 0.4  # each planned send time moves by up to 40% of the interval
_TICK = 0.1  # seconds between live progress updates


@dataclass(frozen=True)
class Planned:
    """One request of the schedule: when to send it, and to which upstream."""

    at: float  # seconds from the start of the run
    kind: Kind


@dataclass(frozen=True)
class Sample:
    """One request as it went: sent at ``at`` (scheduled), took ``latency`` or failed."""

    at: float
    kind: Kind
    latency: float | None
    error: str | None = None


def plan(config: DemoConfig) -> list[Planned]:
    """Return the schedule both clients run: flood to the slow host, paced healthy requests."""
    rng = random.Random(config.seed)

    def times(count: int, interval: float) -> Iterator[float]:
        for i in range(count):
            jitter = rng.uniform(-_JITTER, _JITTER) * interval if i else 0.0
            yield max(0.0, i * interval + jitter)

    healthy = [Planned(at, "healthy") for at in times(config.healthy, config.pace)]
    slow = [Planned(at, "slow") for at in times(config.flood, 1.0 / config.flood_rate)]
    return sorted(healthy + slow, key=lambda p: p.at)


@dataclass
class RunResult:
    """One client's run of the schedule."""

    label: str
    samples: list[Sample]
    elapsed: float
    cut_off: bool
    upstream: dict[Kind, UpstreamCounters]
    router_stats: RouterStats | None = None

    def of(self, kind: Kind) -> list[Sample]:
        """The samples of one upstream, in schedule order."""
        return [s for s in self.samples if s.kind == kind]


async def _drive(
    client: httpx.AsyncClient,
    label: str,
    schedule: Sequence[Planned],
    upstreams: LoopbackUpstreams,
    config: DemoConfig,
    err: TextIO,
) -> RunResult:
    urls = {kind: upstreams.url(kind) for kind in ("healthy", "slow")}
    results: list[Sample | None] = [None] * len(schedule)
    progress = Progress(err, label, len(schedule))
    all_done = anyio.Event()
    # Requests a previous run gave up on may still be answered: let them end.
    await anyio.to_thread.run_sync(upstreams.wait_idle, config.slow + 1.0)
    upstreams.reset()
    progress.start()
    t0 = time.monotonic() + 0.05  # a moment to spawn the tasks first
    upstreams.arm(t0 + config.slow_after)

    async def one(index: int, planned: Planned) -> None:
        start = t0 + planned.at
        await anyio.sleep(max(0.0, start - time.monotonic()))
        error: str | None = None
        try:
            response = await client.get(urls[planned.kind])
            if response.status_code != 200:
                error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        latency = time.monotonic() - start
        results[index] = Sample(planned.at, planned.kind, None if error else latency, error)
        progress.record(planned.kind, None if error else latency)
        if progress.done == len(schedule):
            all_done.set()

    async def ticker() -> None:
        while not all_done.is_set():
            with anyio.move_on_after(_TICK):
                await all_done.wait()
            progress.tick(max(0.0, time.monotonic() - t0))

    with anyio.move_on_after(config.max_duration) as scope:
        async with anyio.create_task_group() as tg:
            if progress.live:
                tg.start_soon(ticker)
            for index, planned in enumerate(schedule):
                tg.start_soon(one, index, planned)
    elapsed = time.monotonic() - t0
    samples = [
        s if s is not None else Sample(p.at, p.kind, None, "unfinished")
        for s, p in zip(results, schedule, strict=True)
    ]
    progress.errors = sum(s.error is not None for s in samples)  # unfinished ones too
    progress.finish(elapsed, scope.cancelled_caught)
    return RunResult(
        label=label,
        samples=samples,
        elapsed=elapsed,
        cut_off=scope.cancelled_caught,
        upstream={kind: upstreams.counters(kind) for kind in ("healthy", "slow")},
    )


async def run_both(
    config: DemoConfig, upstreams: LoopbackUpstreams, err: TextIO
) -> tuple[RunResult, RunResult]:
    """Run the schedule through a shared client, then a HostRouter; return both results."""
    schedule = plan(config)
    limits = httpx.Limits(max_connections=config.budget)
    timeout = httpx.Timeout(config.timeout)
    # trust_env=False: a proxy from the environment must not carry loopback traffic.
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        shared = await _drive(
            client, "[1/2] shared httpx.AsyncClient", schedule, upstreams, config, err
        )
    quotas = {upstreams.host("healthy"): config.quota, upstreams.host("slow"): config.quota}
    async with HostRouter(limits=limits, quotas=quotas, timeout=timeout, trust_env=False) as router:
        routed = await _drive(router, "[2/2] hostpool.HostRouter", schedule, upstreams, config, err)
        routed.router_stats = router.stats()
    return shared, routed


@dataclass(frozen=True)
class Summary:
    """Latency figures of one upstream in one run (seconds; ``nan`` when nothing succeeded)."""

    requests: int
    ok: int
    errors: int
    p50: float
    p95: float
    p99: float
    max: float
    throughput: float  # successful requests per second, first send to last answer
    finished_at: float  # last answer, seconds from the start of the run
    error_kinds: dict[str, int] = field(default_factory=dict)


def summarize(samples: Sequence[Sample]) -> Summary:
    """Return the latency figures of ``samples``."""
    latencies = [s.latency for s in samples if s.latency is not None]
    ends = [s.at + s.latency for s in samples if s.latency is not None]
    kinds: dict[str, int] = {}
    for s in samples:
        if s.error is not None:
            kinds[s.error] = kinds.get(s.error, 0) + 1
    first = min((s.at for s in samples), default=0.0)
    finished = max(ends, default=math.nan)
    span = finished - first
    return Summary(
        requests=len(samples),
        ok=len(latencies),
        errors=len(samples) - len(latencies),
        p50=quantile(latencies, 0.50),
        p95=quantile(latencies, 0.95),
        p99=quantile(latencies, 0.99),
        max=max(latencies, default=math.nan),
        throughput=len(latencies) / span if span > 0 else math.nan,
        finished_at=finished,
        error_kinds=kinds,
    )

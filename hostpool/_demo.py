"""``python -m hostpool demo``: watch one slow upstream starve a shared pool, and not a HostRouter.

Two tiny HTTP/1.1 servers run on loopback in a background thread:
``127.0.0.1`` answers at once; ``127.0.0.2`` answers at once too, until it
turns slow a moment into the run. The same mixed workload (a flood of requests
to the slow host, paced requests to the healthy one) runs twice: once through
one shared ``httpx.AsyncClient`` and once through a :class:`~hostpool.HostRouter`
with the same connection budget. The demo prints the healthy host's latency
for both, a few lines of ``router.stats()``, and draws a chart.

Nothing here touches the network beyond loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import os
import random
import shutil
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, TextIO

import anyio
import anyio.to_thread
import httpx

from ._router import HostRouter
from ._stats import RouterStats

__all__ = [
    "DemoConfig",
    "LoopbackUpstreams",
    "add_arguments",
    "config_from_args",
    "format_router_stats",
    "run",
]

Kind = Literal["healthy", "slow"]

DEFAULT_CHART = "hostpool-demo.png"
CHART_HINT = "pip install 'hostpool[demo]'"

_MAX_REQUESTS = 5000
_BACKLOG = 1024
_MAX_BODY = 1 << 20
_IDLE_TIMEOUT = 60.0  # seconds an upstream keeps an idle keep-alive connection
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_JITTER = 0.4  # each planned send time moves by up to 40% of the interval
_TICK = 0.1  # seconds between live progress updates


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """The knobs of the demo (see ``python -m hostpool demo --help``)."""

    slow: float = 0.5
    slow_after: float = 0.5
    flood: int = 200
    flood_rate: float = 100.0
    healthy: int = 200
    pace: float = 0.03
    budget: int = 20
    quota: int = 10
    timeout: float = 10.0
    max_duration: float = 25.0
    chart: Path | None = Path(DEFAULT_CHART)
    seed: int = 1

    @property
    def flood_end(self) -> float:
        """When the last flood request is sent, in seconds from the start of a run."""
        return max(0, self.flood - 1) / self.flood_rate


def _number(
    kind: Callable[[str], float], *, minimum: float, strict: bool, maximum: float = math.inf
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        too_small = value <= minimum if strict else value < minimum
        if too_small or value > maximum or not math.isfinite(value):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            if math.isfinite(maximum):
                bound += f" and <= {maximum:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}; got {text}")
        return value

    return parse


def _count(maximum: int = _MAX_REQUESTS) -> Callable[[str], int]:
    parse = _number(int, minimum=1, strict=False, maximum=maximum)
    return lambda text: int(parse(text))


def _seconds(*, allow_zero: bool = False, maximum: float = 600.0) -> Callable[[str], float]:
    return _number(float, minimum=0.0, strict=not allow_zero, maximum=maximum)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    d = DemoConfig()
    work = parser.add_argument_group("workload")
    work.add_argument(
        "--slow",
        type=_seconds(maximum=30.0),
        default=d.slow,
        metavar="SECONDS",
        help="seconds the slow host takes per response once it has turned slow "
        f"(default: {d.slow:g})",
    )
    work.add_argument(
        "--slow-after",
        type=_seconds(allow_zero=True, maximum=60.0),
        default=d.slow_after,
        metavar="SECONDS",
        help="when the slow host turns slow, in seconds from the start of each run; "
        f"it answers at once before that (default: {d.slow_after:g})",
    )
    work.add_argument(
        "--flood",
        type=_count(),
        default=d.flood,
        metavar="N",
        help=f"requests sent to the slow host (default: {d.flood})",
    )
    work.add_argument(
        "--flood-rate",
        type=_number(float, minimum=0.0, strict=True, maximum=100_000.0),
        default=d.flood_rate,
        metavar="PER_SECOND",
        help="rate at which the flood is sent, from the start of the run "
        f"(default: {d.flood_rate:g}/s)",
    )
    work.add_argument(
        "--healthy",
        type=_count(),
        default=d.healthy,
        metavar="N",
        help=f"requests sent to the healthy host (default: {d.healthy})",
    )
    work.add_argument(
        "--pace",
        type=_seconds(maximum=10.0),
        default=d.pace,
        metavar="SECONDS",
        help=f"interval between two healthy-host requests (default: {d.pace:g})",
    )
    work.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        metavar="N",
        help="seed of the small jitter in send times; both clients get the same "
        f"schedule (default: {d.seed})",
    )
    limits = parser.add_argument_group("clients")
    limits.add_argument(
        "--budget",
        type=_count(10_000),
        default=d.budget,
        metavar="N",
        help="max_connections of both clients: httpx.Limits(max_connections=N) "
        f"(default: {d.budget})",
    )
    limits.add_argument(
        "--quota",
        type=_count(10_000),
        default=None,
        metavar="N",
        help="HostRouter quota (max connections) of each of the two hosts "
        "(default: half the budget)",
    )
    limits.add_argument(
        "--timeout",
        type=_seconds(),
        default=d.timeout,
        metavar="SECONDS",
        help=f"httpx timeout of every request, pool wait included (default: {d.timeout:g})",
    )
    limits.add_argument(
        "--max-duration",
        type=_seconds(),
        default=d.max_duration,
        metavar="SECONDS",
        help="hard bound on each of the two runs; requests still running then are "
        f"cancelled and counted as errors (default: {d.max_duration:g})",
    )
    out = parser.add_argument_group("output")
    chart = out.add_mutually_exclusive_group()
    chart.add_argument(
        "--chart",
        type=Path,
        default=Path(DEFAULT_CHART),
        metavar="PATH",
        help="where to write the PNG chart of the healthy host's latency over time "
        f"(default: ./{DEFAULT_CHART}; needs matplotlib: {CHART_HINT})",
    )
    chart.add_argument("--no-chart", action="store_true", help="do not draw the chart")


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> DemoConfig:
    """Build a :class:`DemoConfig`, reporting bad combinations through ``parser.error``."""
    budget: int = args.budget
    quota: int = args.quota if args.quota is not None else max(1, budget // 2)
    if quota > budget:
        parser.error(f"--quota ({quota}) must be <= --budget ({budget})")
    chart: Path | None = None if args.no_chart else args.chart
    if chart is not None:
        parent = chart.parent if str(chart.parent) else Path()
        if not parent.is_dir():
            parser.error(f"--chart: directory {str(parent)!r} does not exist")
        if chart.is_dir():
            parser.error(f"--chart: {str(chart)!r} is a directory")
    return DemoConfig(
        slow=args.slow,
        slow_after=args.slow_after,
        flood=args.flood,
        flood_rate=args.flood_rate,
        healthy=args.healthy,
        pace=args.pace,
        budget=budget,
        quota=quota,
        timeout=args.timeout,
        max_duration=args.max_duration,
        chart=chart,
        seed=args.seed,
    )


# ---------------------------------------------------------------------------
# The upstreams: a minimal HTTP/1.1 keep-alive server on loopback
# ---------------------------------------------------------------------------


@dataclass
class _Listener:
    kind: Kind
    host: str  # the host name clients use in URLs
    address: str  # the address the socket is bound to
    port: int = 0
    delay: float = 0.0  # seconds per response once slow
    slow_from: float = math.inf  # time.monotonic() instant it turns slow
    requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    connections: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"


@dataclass(frozen=True)
class UpstreamCounters:
    """What one upstream saw since the last :meth:`LoopbackUpstreams.reset`."""

    requests: int
    peak_in_flight: int
    connections: int


class LoopbackUpstreams:
    """Two HTTP/1.1 servers on loopback, served by an asyncio loop in a daemon thread.

    ``healthy`` answers every request at once. ``slow`` answers at once until
    the instant given to :meth:`arm`, then waits ``slow_delay`` seconds before
    each response. Both keep connections alive (HTTP/1.1 rules), answer
    ``200 ok``, and count requests, connections and peak concurrency.

    The slow host listens on ``127.0.0.2`` so that it is a different host
    from ``127.0.0.1``; where that address is not configured (macOS by
    default), it listens on ``127.0.0.1`` and is called ``localhost``.

    >>> with LoopbackUpstreams(slow_delay=0.5) as upstreams:  # doctest: +SKIP
    ...     print(upstreams.url("healthy"))
    http://127.0.0.1:40123/
    """

    def __init__(self, slow_delay: float) -> None:
        self._listeners: dict[Kind, _Listener] = {
            "healthy": _Listener("healthy", "127.0.0.1", "127.0.0.1"),
            "slow": _Listener("slow", "127.0.0.2", "127.0.0.2", delay=slow_delay),
        }
        self._lock = threading.Condition()  # notified when a request ends
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # -- public API ------------------------------------------------------------

    def url(self, kind: Kind) -> str:
        """Return the base URL of one upstream."""
        return self._listeners[kind].url

    def host(self, kind: Kind) -> str:
        """Return the host name clients use for one upstream."""
        return self._listeners[kind].host

    def arm(self, slow_from: float) -> None:
        """Make the slow upstream slow from the ``time.monotonic()`` instant ``slow_from``."""
        with self._lock:
            self._listeners["slow"].slow_from = slow_from

    def reset(self) -> None:
        """Zero the counters and make the slow upstream fast again."""
        with self._lock:
            for listener in self._listeners.values():
                listener.slow_from = math.inf
                listener.requests = 0
                listener.peak_in_flight = listener.in_flight
                listener.connections = 0

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being answered; False if ``timeout`` passes first."""
        with self._lock:
            return self._lock.wait_for(
                lambda: not any(x.in_flight for x in self._listeners.values()), timeout
            )

    def counters(self, kind: Kind) -> UpstreamCounters:
        """Return what one upstream saw since the last :meth:`reset`."""
        with self._lock:
            listener = self._listeners[kind]
            return UpstreamCounters(
                listener.requests, listener.peak_in_flight, listener.connections
            )

    def start(self) -> LoopbackUpstreams:
        """Bind both listeners and start serving; raise ``OSError`` if loopback is unusable."""
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:
                failure.append(exc)
                loop.run_until_complete(self._close())
                loop.close()
                ready.set()
                return
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._close())
                loop.close()

        thread = threading.Thread(target=serve, name="hostpool-demo-upstreams", daemon=True)
        thread.start()
        if not ready.wait(_START_TIMEOUT):
            raise RuntimeError("the loopback upstreams did not start")
        if failure:
            thread.join(_STOP_TIMEOUT)
            raise failure[0]
        self._thread = thread
        return self

    def stop(self) -> None:
        """Close every connection and listener and stop the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already stopped
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_STOP_TIMEOUT)

    def __enter__(self) -> LoopbackUpstreams:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- server side (runs in the upstreams' thread) ---------------------------

    async def _open(self) -> None:
        for listener in self._listeners.values():
            sock = _bind(listener)
            server = await asyncio.start_server(
                functools.partial(self._serve, listener),
                sock=sock,
                backlog=_BACKLOG,
            )
            self._servers.append(server)

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), _STOP_TIMEOUT)
        self._servers.clear()

    async def _serve(
        self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        with self._lock:
            listener.connections += 1
        try:
            while await self._answer(listener, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass  # the client went away, or stayed idle too long
        except asyncio.CancelledError:
            # Shutting down (see _close). End quietly: asyncio's stream protocol
            # logs a cancelled connection task as an error on Python < 3.12.
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _answer(
        self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Read one request and answer it; return whether to keep the connection."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _IDLE_TIMEOUT)
        except asyncio.IncompleteReadError:
            return False  # closed by the client between requests
        except asyncio.LimitOverrunError:
            await _respond(writer, 431, b"request head too large\n", keep_alive=False)
            return False
        request_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        method, _, rest = request_line.partition(" ")
        _target, _, version = rest.partition(" ")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, colon, value = line.partition(":")
            if not colon:
                await _respond(writer, 400, b"bad header\n", keep_alive=False)
                return False
            headers[name.strip().lower()] = value.strip()
        if not version.startswith("HTTP/1.") or not method:
            await _respond(writer, 400, b"bad request line\n", keep_alive=False)
            return False
        if "transfer-encoding" in headers:
            await _respond(writer, 501, b"chunked bodies not supported\n", keep_alive=False)
            return False
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > _MAX_BODY:
            await _respond(writer, 400, b"bad content-length\n", keep_alive=False)
            return False
        if int(length):
            await reader.readexactly(int(length))
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            keep_alive = "keep-alive" in connection
        else:
            keep_alive = "close" not in connection
        with self._lock:
            listener.requests += 1
            listener.in_flight += 1
            listener.peak_in_flight = max(listener.peak_in_flight, listener.in_flight)
            slow = time.monotonic() >= listener.slow_from
        try:
            if slow:
                await asyncio.sleep(listener.delay)
            body = b"" if method == "HEAD" else b"ok\n"
            await _respond(writer, 200, body, keep_alive=keep_alive, upstream=listener.kind)
        finally:
            with self._lock:
                listener.in_flight -= 1
                self._lock.notify_all()
        return keep_alive


def _bind(listener: _Listener) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((listener.address, 0))
    except OSError:
        if listener.address == "127.0.0.1":
            sock.close()
            raise
        # 127.0.0.2 is not configured (macOS): same address, another name.
        sock.close()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        listener.address, listener.host = "127.0.0.1", "localhost"
    listener.port = sock.getsockname()[1]
    return sock


_REASONS = {
    200: "OK",
    400: "Bad Request",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
}


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    keep_alive: bool,
    upstream: str = "demo",
) -> None:
    close = "" if keep_alive else "Connection: close\r\n"
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Upstream: {upstream}\r\n"
        f"{close}\r\n"
    )
    writer.write(head.encode("latin-1") + body)
    await writer.drain()


# ---------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------


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
        return [s for s in self.samples if s.kind == kind]


class _Progress:
    """A one-line live counter on stderr when it is a terminal; plain lines otherwise."""

    def __init__(self, stream: TextIO, label: str, total: int) -> None:
        self.stream = stream
        self.label = label
        self.total = total
        self.done = 0
        self.errors = 0
        self.healthy_last = math.nan
        self.healthy_worst = math.nan
        self.live = _isatty(stream)
        self._width = 0

    def record(self, kind: Kind, latency: float | None) -> None:
        self.done += 1
        if latency is None:
            self.errors += 1
        elif kind == "healthy":
            self.healthy_last = latency
            self.healthy_worst = max(latency, self.healthy_worst, key=_not_nan)

    def start(self) -> None:
        if not self.live:
            self._print(f"{self.label}: {self.total} requests ...")

    def tick(self, elapsed: float) -> None:
        if not self.live:
            return
        line = (
            f"{self.label}  {elapsed:4.1f} s  {self.done}/{self.total} done  healthy host: "
            f"last {fmt_seconds(self.healthy_last)}, worst {fmt_seconds(self.healthy_worst)}"
            f"  errors {self.errors}"
        )
        # Never wrap: "\r" only returns to the start of the last screen line.
        line = line[: max(20, shutil.get_terminal_size().columns - 1)]
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def finish(self, elapsed: float, cut_off: bool) -> None:
        if self.live:
            self.tick(elapsed)
            self.stream.write("\n")
            self.stream.flush()
        else:
            self._print(
                f"{self.label}: {self.done}/{self.total} done in {elapsed:.1f} s, healthy host "
                f"worst {fmt_seconds(self.healthy_worst)}, errors {self.errors}"
            )
        if cut_off:
            self._print(f"{self.label}: stopped at --max-duration; unfinished requests are errors")

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def _not_nan(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


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
    progress = _Progress(err, label, len(schedule))
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


async def _run_both(
    config: DemoConfig, upstreams: LoopbackUpstreams, err: TextIO
) -> tuple[RunResult, RunResult]:
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


# ---------------------------------------------------------------------------
# Figures and report
# ---------------------------------------------------------------------------


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


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of ``values`` (``nan`` when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


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


def fmt_seconds(seconds: float) -> str:
    """``1.8 ms``, ``412 ms``, ``1.23 s``; ``-`` for nan."""
    if math.isnan(seconds):
        return "-"
    if seconds < 0.1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _times(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def _ratio(shared: float, routed: float, *, lower_is_better: bool = True) -> str:
    """Plain words: how HostRouter's figure compares to the shared client's."""
    if math.isnan(shared) or math.isnan(routed) or shared <= 0 or routed <= 0:
        return "-"
    ratio = shared / routed
    if 1 / 1.1 < ratio < 1.1:
        return "about the same"
    if lower_is_better:
        return f"{_times(ratio)} lower" if ratio > 1 else f"{_times(1 / ratio)} higher"
    return f"{_times(1 / ratio)} higher" if ratio < 1 else f"{_times(ratio)} lower"


def _table(rows: Sequence[Sequence[str]], indent: str = "  ", gap: str = "   ") -> list[str]:
    """Align ``rows``: first column left, the others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append((indent + gap.join(cells)).rstrip())
    return lines


def format_router_stats(stats: RouterStats, keys: Sequence[str] | None = None) -> list[str]:
    """A few aligned lines of ``router.stats()``: one per partition (all, or ``keys``)."""
    rows = [
        [
            "partition",
            "quota",
            "requests",
            "peak in flight",
            "waited",
            "wait p50",
            "wait max",
            "pool timeouts",
            "sockets opened",
        ]
    ]
    wanted = list(stats.partitions) if keys is None else [k for k in keys if k in stats.partitions]
    for key in wanted:
        p = stats.partitions[key]
        # waits of at most 1 ms count as admitted at once
        at_once = p.wait.buckets[0][1] if p.wait.buckets else p.wait.count
        rows.append(
            [
                key,
                str(p.quota.max_connections),
                str(p.requests),
                str(p.peak_in_flight),
                str(p.wait.count - at_once),
                fmt_seconds(p.wait.p50),
                fmt_seconds(p.wait.max),
                str(p.pool_timeouts + p.overflows),
                str(p.connections_opened),
            ]
        )
    return _table(rows, gap="  ")


def _baseline(runs: Sequence[RunResult], before: float) -> float:
    """Healthy-host p50 over requests sent before the slow host turned slow."""
    latencies = [
        s.latency
        for run in runs
        for s in run.of("healthy")
        if s.at + (s.latency or 0.0) < before and s.latency is not None
    ]
    return quantile(latencies, 0.5)


def conclusion(
    config: DemoConfig,
    upstreams: LoopbackUpstreams,
    shared: RunResult,
    routed: RunResult,
) -> str:
    """A few plain words on what the numbers show (computed, never canned)."""
    healthy, slow = upstreams.host("healthy"), upstreams.host("slow")
    hs, hr = summarize(shared.of("healthy")), summarize(routed.of("healthy"))
    ss, sr = summarize(shared.of("slow")), summarize(routed.of("slow"))
    base = _baseline([shared, routed], config.slow_after)
    base_text = (
        f" (before {slow} turned slow it answered in {fmt_seconds(base)})"
        if not (math.isnan(base))
        else ""
    )
    peak = shared.upstream["slow"].peak_in_flight
    took = (
        "every connection of the pool"
        if peak >= config.budget
        else f"{peak} of the pool's {config.budget} connections"
    )
    if shared.cut_off or routed.cut_off:
        return textwrap.fill(
            f"A run hit --max-duration ({config.max_duration:g} s), so these figures only "
            "cover the requests that finished; raise it or shrink the workload.",
            width=78,
        )
    words: list[str] = []
    if hs.errors + hr.errors:
        words.append(
            f"Errors on {healthy}: {hs.errors} with the shared client, {hr.errors} with "
            f"HostRouter ({_error_text(hs, hr)})."
        )
    if math.isnan(hs.p99) or math.isnan(hr.p99):
        words.append(f"Too few requests to {healthy} succeeded to compare latencies.")
    elif _clearly_above(hs.p99, hr.p99, config):
        words.append(
            f"With one shared pool, {slow}'s backlog held {took}, and requests to the "
            f"healthy {healthy} waited for connections: p50 {fmt_seconds(hs.p50)}, p99 "
            f"{fmt_seconds(hs.p99)}{base_text}. With HostRouter, {slow} could hold at "
            f"most {config.quota} connections and {healthy} kept its own: p99 "
            f"{fmt_seconds(hr.p99)}, {_times(hs.p99 / hr.p99)} lower."
        )
    elif _clearly_above(hr.p99, hs.p99, config):
        words.append(
            f"HostRouter did worse for {healthy} in this run: p99 {fmt_seconds(hr.p99)} "
            f"against {fmt_seconds(hs.p99)} for the shared client. Its quota of "
            f"{config.quota} may be too small for {healthy}'s own load (see --quota)."
        )
    else:
        words.append(
            f"No clear difference for {healthy} this time: p99 {fmt_seconds(hs.p99)} with "
            f"the shared client, {fmt_seconds(hr.p99)} with HostRouter; {slow}'s backlog "
            f"held {took}. To fill the shared pool, raise --flood or --flood-rate, lower "
            f"--budget, or keep the flood going past --slow-after."
        )
    if sr.finished_at > ss.finished_at * 1.1:  # False when either is nan
        words.append(
            f"The price: {slow}'s flood, held to its quota, was answered by "
            f"t={sr.finished_at:.1f} s instead of t={ss.finished_at:.1f} s; set a quota "
            f"(and pool_timeout or max_pending) to choose how much a slow host may take."
        )
    return "\n".join(textwrap.fill(w, width=78) for w in words)


def _clearly_above(worse: float, better: float, config: DemoConfig) -> bool:
    """``worse`` is well above ``better``: 3 times, and by a quarter of the slow latency."""
    return worse >= 3 * better and worse - better >= max(0.02, config.slow / 4)


def _error_text(*summaries: Summary) -> str:
    kinds: dict[str, int] = {}
    for summary in summaries:
        for kind, n in summary.error_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + n
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))


def report(
    config: DemoConfig, upstreams: LoopbackUpstreams, shared: RunResult, routed: RunResult
) -> list[str]:
    """The results table, ``router.stats()`` lines and the conclusion."""
    healthy, slow = upstreams.host("healthy"), upstreams.host("slow")
    hs, hr = summarize(shared.of("healthy")), summarize(routed.of("healthy"))
    ss, sr = summarize(shared.of("slow")), summarize(routed.of("slow"))
    rows: list[list[str]] = [
        [f"healthy host {healthy}", "shared AsyncClient", "HostRouter", "HostRouter vs shared"],
    ]
    for name in ("p50", "p95", "p99", "max"):
        a, b = getattr(hs, name), getattr(hr, name)
        rows.append([f"  latency {name}", fmt_seconds(a), fmt_seconds(b), _ratio(a, b)])
    rows.append(
        [
            "  throughput",
            f"{hs.throughput:.1f} req/s",
            f"{hr.throughput:.1f} req/s",
            _ratio(hs.throughput, hr.throughput, lower_is_better=False),
        ]
    )
    rows.append([f"  errors (of {hs.requests})", str(hs.errors), str(hr.errors), ""])
    rows.append([f"slow host {slow}", "", "", ""])
    rows.append(
        [
            "  last answer at",
            _at(ss.finished_at),
            _at(sr.finished_at),
            "",
        ]
    )
    rows.append(
        [
            "  most in flight (server side)",
            str(shared.upstream["slow"].peak_in_flight),
            str(routed.upstream["slow"].peak_in_flight),
            "",
        ]
    )
    rows.append([f"  errors (of {ss.requests})", str(ss.errors), str(sr.errors), ""])
    lines = ["Results (latency from the scheduled send time to the full response):", ""]
    lines += _table(rows)
    if hs.errors + hr.errors + ss.errors + sr.errors:
        lines.append(
            f"  errors: shared {_error_text(hs, ss) or 'none'}; HostRouter "
            f"{_error_text(hr, sr) or 'none'}"
        )
    if routed.router_stats is not None:
        lines += ["", "router.stats() after the HostRouter run:", ""]
        lines += format_router_stats(routed.router_stats, [healthy, slow])
        lines.append(
            "  (waited: requests that queued more than 1 ms for a slot of their partition)"
        )
    lines += ["", conclusion(config, upstreams, shared, routed)]
    return lines


def _at(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"t={seconds:.1f} s"


def _header(config: DemoConfig, upstreams: LoopbackUpstreams) -> list[str]:
    healthy, slow = upstreams.host("healthy"), upstreams.host("slow")
    budget = f"httpx.Limits(max_connections={config.budget})"
    lines = [
        "hostpool demo: one upstream turns slow and is flooded; does the other one suffer?",
        "",
        f"  healthy  {upstreams.url('healthy'):<28} answers at once; {config.healthy} "
        f"requests, one every {config.pace * 1000:g} ms",
        f"  slow     {upstreams.url('slow'):<28} {config.flood} requests at "
        f"{config.flood_rate:g}/s; from t={config.slow_after:g} s it takes "
        f"{fmt_seconds(config.slow)} per response",
        "",
        "  The same schedule runs through two clients with the same budget:",
        f"    [1/2] httpx.AsyncClient(limits={budget})",
        f"    [2/2] hostpool.HostRouter(limits={budget},",
        f'              quotas={{"{healthy}": {config.quota}, "{slow}": {config.quota}}})',
    ]
    if slow == "localhost":
        lines.append(
            "  (127.0.0.2 is not configured here, so the slow host is 'localhost' on "
            "127.0.0.1;\n   on macOS: sudo ifconfig lo0 alias 127.0.0.2 up)"
        )
    return [*lines, ""]


# ---------------------------------------------------------------------------
# The chart
# ---------------------------------------------------------------------------


def write_chart(
    path: Path,
    config: DemoConfig,
    upstreams: LoopbackUpstreams,
    shared: RunResult,
    routed: RunResult,
) -> bool:
    """Draw the healthy host's latency over time for both runs; False if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    healthy, slow = upstreams.host("healthy"), upstreams.host("slow")
    fig = Figure(figsize=(10, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axvspan(0, config.flood_end, color="0.92", zorder=0, label=f"flood being sent to {slow}")
    ax.axvline(config.slow_after, color="0.35", linestyle="--", linewidth=1)
    series = [
        (shared, "tab:red", f"shared httpx.AsyncClient (max_connections={config.budget})"),
        (
            routed,
            "tab:blue",
            f"HostRouter (budget {config.budget}, quota {config.quota} per host)",
        ),
    ]
    top, bottom = 10.0, 1.0
    for run, color, label in series:
        ok = [s for s in run.of("healthy") if s.latency is not None]
        xs = [s.at for s in ok]
        ys = [s.latency * 1000 for s in ok if s.latency is not None]
        top, bottom = max([top, *ys]), min([bottom, *ys])
        p99 = summarize(run.of("healthy")).p99
        ax.plot(
            xs,
            ys,
            color=color,
            marker="o",
            markersize=2.5,
            linewidth=0.9,
            label=f"{label}: p99 {fmt_seconds(p99)}",
        )
        failed = [s.at for s in run.of("healthy") if s.latency is None]
        if failed:
            ax.plot(
                failed,
                [config.timeout * 1000] * len(failed),
                color=color,
                marker="x",
                linestyle="none",
                label=f"{len(failed)} errors (drawn at the timeout)",
            )
            top = max(top, config.timeout * 1000)
    ax.set_yscale("log")
    ax.set_ylim(bottom=bottom / 2, top=top * 2)
    ax.annotate(
        f"{slow} turns slow\n({fmt_seconds(config.slow)} per response)",
        xy=(config.slow_after, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(4, -4),
        textcoords="offset points",
        va="top",
        fontsize=9,
        color="0.25",
    )
    ax.set_xlim(left=0)
    ax.set_xlabel("time since the start of the run (s), by scheduled send time")
    ax.set_ylabel(f"latency of requests to {healthy} (ms, log scale)")
    ax.set_title(
        f"Healthy host {healthy} while {slow} is slow and flooded: one shared pool vs HostRouter"
    )
    ax.grid(True, which="major", axis="y", color="0.85", linewidth=0.6)
    fig.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    fig.savefig(path, dpi=110)
    return True


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def run(config: DemoConfig, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the demo and print its report; return the exit code."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        upstreams = LoopbackUpstreams(config.slow).start()
    except OSError as exc:
        print(f"hostpool demo: cannot listen on loopback: {exc}", file=err)
        return 1
    try:
        for line in _header(config, upstreams):
            print(line, file=out)
        out.flush()
        shared, routed = anyio.run(_run_both, config, upstreams, err, backend="asyncio")
    except KeyboardInterrupt:
        print("\nhostpool demo: interrupted", file=err)
        return 130
    finally:
        upstreams.stop()
    print("", file=out)
    for line in report(config, upstreams, shared, routed):
        print(line, file=out)
    status = 1 if shared.cut_off or routed.cut_off else 0
    if config.chart is not None:
        try:
            drawn = write_chart(config.chart, config, upstreams, shared, routed)
        except OSError as exc:
            print(f"hostpool demo: cannot write the chart: {exc}", file=err)
            return 1
        if drawn:
            print(f"\nChart: {config.chart.resolve()}", file=out)
        else:
            print(f"\nChart skipped: matplotlib is not installed ({CHART_HINT})", file=out)
    out.flush()
    return status

"""``python -m hostpool demo --fleet``: several processes share one vendor's limit through Redis.

A loopback "vendor" (:class:`Vendor`) serves 20 requests at a time and answers
``429 Too Many Requests`` (``Retry-After: 1``) to any request that arrives
while 20 are being served. Four worker processes (this module run as
``python -m hostpool.demo.fleet --worker``), each with its own
:class:`~hostpool.HostRouter`, send it requests twice:

1. with a local ``Quota(max_connections=20)`` only: each process keeps to its
   20, none knows about the others, and the vendor sees about four times its
   limit and answers with 429s;
2. with ``Quota(max_connections=20, fleet=FleetQuota(max_connections=20))`` on
   a :class:`~hostpool.redis.RedisFleet`: the four routers share 20 slots, the
   vendor never sees more than 20 at once, and no request is refused.

A ``redis-server`` is started for the demo on a free loopback port, in a
temporary directory, without persistence, and stopped at the end (``--redis
URL`` uses a running server instead). The demo prints both runs side by side
and draws the vendor's requests in flight over time (with matplotlib if
installed). It uses hostpool's public API only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .._format import fmt_seconds, quantile, table
from .config import CHART_HINT

__all__ = [
    "DEFAULT_FLEET_CHART",
    "FleetDemoConfig",
    "PhaseResult",
    "RedisProcess",
    "Vendor",
    "VendorCounters",
    "add_fleet_arguments",
    "fleet_config_from_args",
    "redis_server_binary",
    "run_fleet",
]

DEFAULT_FLEET_CHART = "hostpool-fleet-demo.png"
#: Names a redis-server binary to use instead of the PATH's (as the test suite does).
REDIS_SERVER_ENV = "HOSTPOOL_REDIS_SERVER"

_PROG = "hostpool demo --fleet"
_LEASE_TTL = 5.0  # RedisFleet lease_ttl of the workers (seconds)
_STORE_TIMEOUT = 0.5  # RedisFleet timeout of the workers (seconds)
_READY_TIMEOUT = 60.0  # seconds a worker may take to start (imports on a slow machine)
_REDIS_START_TIMEOUT = 5.0
_STOP_TIMEOUT = 5.0
_IDLE_TIMEOUT = 60.0  # seconds the vendor keeps an idle keep-alive connection
_BACKLOG = 1024
_MAX_BODY = 1 << 20


# ---------------------------------------------------------------------------
# Configuration and command line
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetDemoConfig:
    """The knobs of ``python -m hostpool demo --fleet`` (see its ``--help``)."""

    workers: int = 4
    requests: int = 200  # per worker
    concurrency: int | None = None  # requests each worker keeps going (default: limit)
    limit: int = 20  # the vendor's limit, each router's local quota, and the FleetQuota
    service_time: float = 0.05  # seconds the vendor takes per answer
    timeout: float = 10.0  # httpx timeout of every request, pool wait included
    max_duration: float = 25.0  # hard bound on each of the two runs
    redis_url: str | None = None  # a running Redis to use instead of starting one
    chart: Path | None = Path(DEFAULT_FLEET_CHART)

    @property
    def per_worker(self) -> int:
        """Requests each worker keeps in flight (or waiting for a slot) at once."""
        return self.concurrency if self.concurrency is not None else self.limit


_FLEET_OPTIONS = {
    "workers": "--workers",
    "requests": "--requests",
    "concurrency": "--concurrency",
    "vendor_limit": "--vendor-limit",
    "service_time": "--service-time",
    "redis": "--redis",
}


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be >= {low} and <= {high}; got {value}")
        return value

    return parse


def _seconds_up_to(high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (0 < value <= high and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0 and <= {high:g}; got {text}")
        return value

    return parse


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--fleet`` and its options to the ``demo`` parser (next to :func:`add_arguments`)."""
    d = FleetDemoConfig()
    # The demo parser keeps descriptions as written (RawDescriptionHelpFormatter): wrap here.
    description = textwrap.fill(
        "With --fleet, another demo: worker processes, each with its own HostRouter, "
        "share a loopback vendor that allows N concurrent requests and answers 429 above "
        "that; first with local quotas only, then with a FleetQuota on Redis. It starts "
        "redis-server (apt-get install redis-server / brew install redis) unless --redis "
        "is given. --timeout, --max-duration, --chart and --no-chart apply to it too; "
        f"its chart goes to ./{DEFAULT_FLEET_CHART} by default.",
        width=76,
    )
    group = parser.add_argument_group("fleet demo (--fleet)", description)
    group.add_argument(
        "--fleet",
        action="store_true",
        help="run the fleet demo: a FleetQuota shared through Redis by several processes",
    )
    group.add_argument(
        "--workers",
        type=_int_in(1, 64),
        default=None,
        metavar="N",
        help=f"worker processes (default: {d.workers})",
    )
    group.add_argument(
        "--requests",
        type=_int_in(1, 5000),
        default=None,
        metavar="N",
        help=f"requests each worker sends (default: {d.requests})",
    )
    group.add_argument(
        "--concurrency",
        type=_int_in(1, 1000),
        default=None,
        metavar="N",
        help="requests each worker keeps going at once (default: the vendor's limit)",
    )
    group.add_argument(
        "--vendor-limit",
        type=_int_in(1, 500),
        default=None,
        metavar="N",
        help="concurrent requests the vendor serves; also each router's local quota and "
        f"the FleetQuota (default: {d.limit})",
    )
    group.add_argument(
        "--service-time",
        type=_seconds_up_to(10.0),
        default=None,
        metavar="SECONDS",
        help=f"seconds the vendor takes to answer, 200 or 429 alike (default: {d.service_time:g})",
    )
    group.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="use this running Redis (redis://host:port/db) instead of starting redis-server",
    )
    # Tells an explicit --chart from its default (the very object argparse hands back).
    parser.set_defaults(fleet_chart_default=parser.get_default("chart"))


def fleet_config_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> FleetDemoConfig | None:
    """Build the fleet demo's config; None without ``--fleet`` (errors through ``parser``)."""
    if not args.fleet:
        given = [flag for name, flag in _FLEET_OPTIONS.items() if getattr(args, name) is not None]
        if given:
            parser.error(f"{', '.join(given)}: only with --fleet")
        return None
    d = FleetDemoConfig()
    redis_url: str | None = args.redis
    if redis_url is not None:
        from ..redis import parse_redis_url

        try:
            parse_redis_url(redis_url)
        except ValueError as exc:
            parser.error(f"--redis: {exc}")
    chart: Path | None
    if args.no_chart:
        chart = None
    elif args.chart is getattr(args, "fleet_chart_default", None):
        chart = Path(DEFAULT_FLEET_CHART)
    else:
        chart = args.chart
    if chart is not None:
        parent = chart.parent if str(chart.parent) else Path()
        if not parent.is_dir():
            parser.error(f"--chart: directory {str(parent)!r} does not exist")
        if chart.is_dir():
            parser.error(f"--chart: {str(chart)!r} is a directory")
    return FleetDemoConfig(
        workers=args.workers if args.workers is not None else d.workers,
        requests=args.requests if args.requests is not None else d.requests,
        concurrency=args.concurrency,
        limit=args.vendor_limit if args.vendor_limit is not None else d.limit,
        service_time=args.service_time if args.service_time is not None else d.service_time,
        timeout=args.timeout,
        max_duration=args.max_duration,
        redis_url=redis_url,
        chart=chart,
    )


# ---------------------------------------------------------------------------
# The vendor: a loopback HTTP/1.1 server with a concurrency limit
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VendorCounters:
    """What the vendor saw since :meth:`Vendor.begin`.

    ``series`` holds ``(seconds since begin, requests in flight)`` after every
    change: an exact step function of the vendor's concurrency.
    """

    peak_in_flight: int
    ok: int
    refused: int
    series: tuple[tuple[float, int], ...]


class Vendor:
    """A loopback HTTP/1.1 server that serves ``limit`` requests at a time.

    A request that arrives while ``limit`` requests are being served is
    refused: ``429 Too Many Requests`` with ``Retry-After: 1``. Every answer,
    200 or 429, takes ``service_time`` (the vendor does its work before its
    limiter speaks), so the requests in flight show how much the clients
    asked for at once. Keeps connections alive; runs an asyncio loop in a
    daemon thread.
    """

    def __init__(self, limit: int, service_time: float) -> None:
        self.limit = limit
        self.service_time = service_time
        self.port = 0
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._in_flight = 0
        self._serving = 0
        self._peak = 0
        self._ok = 0
        self._refused = 0
        self._series: list[tuple[float, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def begin(self) -> None:
        """Zero the counters and start the time series now."""
        with self._lock:
            self._t0 = time.monotonic()
            self._peak = self._in_flight
            self._ok = self._refused = 0
            self._series = [(0.0, self._in_flight)]

    def counters(self) -> VendorCounters:
        """Return what the vendor saw since :meth:`begin`."""
        with self._lock:
            return VendorCounters(self._peak, self._ok, self._refused, tuple(self._series))

    def start(self) -> Vendor:
        """Bind a loopback port and start serving; raise ``OSError`` if loopback is unusable."""
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

        thread = threading.Thread(target=serve, name="hostpool-fleet-demo-vendor", daemon=True)
        thread.start()
        if not ready.wait(_STOP_TIMEOUT):
            raise OSError("the loopback vendor did not start")
        if failure:
            thread.join(_STOP_TIMEOUT)
            raise failure[0]
        self._thread = thread
        return self

    def stop(self) -> None:
        """Close every connection and the listener, and stop the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already stopped
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_STOP_TIMEOUT)

    # -- server side (runs in the vendor's thread) -------------------------------

    async def _open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._serve, sock=sock, backlog=_BACKLOG)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), _STOP_TIMEOUT)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while await self._answer(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass  # the client went away, or stayed idle too long
        except asyncio.CancelledError:
            pass  # shutting down (see _close): end quietly
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    def _record(self) -> None:
        """Note the current concurrency (the caller holds the lock)."""
        self._peak = max(self._peak, self._in_flight)
        self._series.append((time.monotonic() - self._t0, self._in_flight))

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request and answer it; return whether to keep the connection."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _IDLE_TIMEOUT)
        except asyncio.IncompleteReadError:
            return False  # closed by the client between requests
        except asyncio.LimitOverrunError:
            await _respond(writer, 431, b"request head too large\n", keep_alive=False)
            return False
        request_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        version = request_line.rpartition(" ")[2]
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length", "0")
        if not version.startswith("HTTP/1.") or "transfer-encoding" in headers:
            await _respond(writer, 400, b"bad request\n", keep_alive=False)
            return False
        if not length.isdigit() or int(length) > _MAX_BODY:
            await _respond(writer, 400, b"bad content-length\n", keep_alive=False)
            return False
        if int(length):
            await reader.readexactly(int(length))
        connection = headers.get("connection", "").lower()
        keep_alive = (
            "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
        )
        with self._lock:
            admitted = self._serving < self.limit
            self._serving += int(admitted)
            self._in_flight += 1
            self._record()
        try:
            await asyncio.sleep(self.service_time)
        finally:
            # Out of the count before the answer leaves: a client that sends
            # its next request on receiving this answer never finds it counted.
            with self._lock:
                self._serving -= int(admitted)
                self._in_flight -= 1
                if admitted:
                    self._ok += 1
                else:
                    self._refused += 1
                self._record()
        if admitted:
            await _respond(writer, 200, b"ok\n", keep_alive=keep_alive)
        else:
            body = f"more than {self.limit} concurrent requests\n".encode()
            await _respond(writer, 429, body, keep_alive=keep_alive, retry_after=1)
        return keep_alive


_REASONS = {
    200: "OK",
    400: "Bad Request",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
}


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    keep_alive: bool,
    retry_after: int | None = None,
) -> None:
    extra = "" if keep_alive else "Connection: close\r\n"
    if retry_after is not None:
        extra += f"Retry-After: {retry_after}\r\n"
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}\r\n"
    )
    writer.write(head.encode("latin-1") + body)
    await writer.drain()


# ---------------------------------------------------------------------------
# redis-server
# ---------------------------------------------------------------------------


def redis_server_binary() -> str | None:
    """The redis-server to start: ``$HOSTPOOL_REDIS_SERVER`` if set, else the PATH's; or None."""
    configured = os.environ.get(REDIS_SERVER_ENV)
    if configured:
        return shutil.which(configured)
    return shutil.which("redis-server")


def _no_redis_message() -> str:
    configured = os.environ.get(REDIS_SERVER_ENV)
    if configured:
        first = f"{REDIS_SERVER_ENV}={configured!r} is not an executable redis-server."
    else:
        first = "redis-server is not installed (the fleet demo starts one on loopback)."
    return (
        f"{_PROG}: {first}\n"
        "Install it, then run the demo again:\n"
        "  Debian/Ubuntu:  sudo apt-get install redis-server\n"
        "  macOS:          brew install redis\n"
        "or point the demo at a Redis that is already running:\n"
        "  python -m hostpool demo --fleet --redis redis://127.0.0.1:6379/0"
    )


class RedisProcess:
    """A ``redis-server`` child on a free port of 127.0.0.1, without persistence."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / f"redis-{self.port}.log"

    def start(self) -> RedisProcess:
        """Start the server and wait until it answers PING; ``RuntimeError`` if it does not."""
        # A free port may be taken between the probe and redis-server's bind: try a few.
        for attempt in range(5):
            self.port = _free_port()
            try:
                self._launch()
            except _PortInUse:
                if attempt == 4:
                    raise RuntimeError("redis-server found no free port") from None
                continue
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(self) -> None:
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + _REDIS_START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                self.process = None
                log_text = self.log_tail()
                if "Address already in use" in log_text:
                    raise _PortInUse(log_text)
                raise RuntimeError(f"redis-server exited at start:\n{log_text}")
            if _answers_ping(self.port):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server did not answer PING within {_REDIS_START_TIMEOUT:g} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.01)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers); idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _check_reachable(url: str) -> None:
    """Fail early (``_DemoError``) when nothing listens at a ``--redis`` TCP address."""
    from ..redis import parse_redis_url

    address = parse_redis_url(url)
    if address.host is None or address.port is None:
        return  # a Unix socket: the workers will tell
    try:
        with socket.create_connection((address.host, address.port), timeout=2.0):
            pass
    except OSError as exc:
        raise _DemoError(f"cannot connect to Redis at {address.describe()}: {exc}") from None


class _PortInUse(Exception):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(1)[:1] in (b"+", b"-")
    except OSError:
        return False


# ---------------------------------------------------------------------------
# The workers (main process side)
# ---------------------------------------------------------------------------


class _DemoError(Exception):
    """A step of the demo failed; the message says which (no traceback)."""


@dataclass(frozen=True)
class _Phase:
    label: str
    fleet: bool


@dataclass(frozen=True)
class PhaseResult:
    """One run: what the vendor saw and what the workers reported."""

    label: str
    fleet: bool
    elapsed: float  # from "go" to the last worker's report
    vendor: VendorCounters
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    fleet_waits: int = 0
    fleet_unavailable: int = 0
    fleet_leases_lost: int = 0

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())


class _Worker:
    """One worker process; its stdout lines are read by a thread into a queue."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        try:
            self.process = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=env,
                text=True,
                encoding="utf-8",
            )
        except BaseException:
            self._log.close()
            raise
        self._lines: queue.Queue[tuple[float, str | None]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for line in stdout:
                self._lines.put((time.monotonic(), line.rstrip("\n")))
        self._lines.put((time.monotonic(), None))

    def next_line(self, deadline: float, what: str) -> tuple[float, str]:
        """The next stdout line and when it came; ``_DemoError`` on exit or at ``deadline``."""
        try:
            at, line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise _DemoError(f"a worker took too long {what}") from None
        if line is None:
            self.process.wait()
            raise _DemoError(
                f"a worker exited (status {self.process.returncode}) {what}:\n{self.log_tail()}"
            )
        return at, line

    def go(self) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write("go\n")
        stdin.flush()

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(nothing on stderr)"

    def stop(self) -> None:
        """Make sure the process is gone (terminate, then kill); close its pipes."""
        process = self.process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
        self._reader.join(_STOP_TIMEOUT)
        self._log.close()


def _worker_env() -> dict[str, str]:
    """The environment of the workers: this one, with this very hostpool importable first."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _int_map(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): int(v) for k, v in value.items()}


def _run_phase(
    config: FleetDemoConfig,
    phase: _Phase,
    vendor: Vendor,
    redis_url: str,
    namespace: str,
    directory: Path,
    index: int,
) -> PhaseResult:
    argv = [
        sys.executable,
        "-m",
        "hostpool.demo.fleet",
        "--worker",
        "--url",
        vendor.url,
        "--requests",
        str(config.requests),
        "--concurrency",
        str(config.per_worker),
        "--local-cap",
        str(config.limit),
        "--timeout",
        repr(config.timeout),
    ]
    if phase.fleet:
        argv += ["--fleet-cap", str(config.limit), "--redis", redis_url, "--namespace", namespace]
    env = _worker_env()
    workers: list[_Worker] = []
    try:
        for n in range(config.workers):
            workers.append(_Worker(argv, env, directory / f"worker-{index}-{n}.log"))
        deadline = time.monotonic() + _READY_TIMEOUT
        for worker in workers:
            _, line = worker.next_line(deadline, "to start")
            if line != "ready":
                raise _DemoError(f"a worker said {line!r} instead of 'ready'")
        vendor.begin()
        start = time.monotonic()
        for worker in workers:
            worker.go()
        deadline = start + config.max_duration
        reports: list[dict[str, Any]] = []
        end = start
        for worker in workers:
            at, line = worker.next_line(
                deadline, f"(more than --max-duration, {config.max_duration:g} s)"
            )
            end = max(end, at)
            try:
                report = json.loads(line)
            except ValueError:
                raise _DemoError(f"a worker printed {line[:200]!r} instead of its report") from None
            reports.append(report)
    finally:
        for worker in workers:
            worker.stop()
    statuses: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    waits = unavailable = lost = 0
    for report in reports:
        statuses.update(_int_map(report.get("statuses")))
        errors.update(_int_map(report.get("errors")))
        latencies.extend(float(x) for x in report.get("latencies", []))
        waits += int(report.get("fleet_waits", 0))
        unavailable += int(report.get("fleet_unavailable", 0))
        lost += int(report.get("fleet_leases_lost", 0))
    return PhaseResult(
        label=phase.label,
        fleet=phase.fleet,
        elapsed=end - start,
        vendor=vendor.counters(),
        statuses=dict(statuses),
        errors=dict(errors),
        latencies=latencies,
        fleet_waits=waits,
        fleet_unavailable=unavailable,
        fleet_leases_lost=lost,
    )


# ---------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------


def run_fleet(config: FleetDemoConfig, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the fleet demo and print its report; return the exit code.

    0 when both runs finished, 1 when a step failed, 2 when redis-server is
    missing (and no ``--redis`` was given), 130 on Ctrl-C.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    binary: str | None = None
    if config.redis_url is None:
        binary = redis_server_binary()
        if binary is None:
            print(_no_redis_message(), file=err)
            return 2
    namespace = f"hostpool-fleet-demo-{os.getpid()}-{secrets.token_hex(3)}"
    limit = config.limit
    phases = [
        _Phase("local quotas only", fleet=False),
        _Phase(f"FleetQuota(max_connections={limit}) on Redis", fleet=True),
    ]
    results: list[PhaseResult] = []
    try:
        with contextlib.ExitStack() as stack:
            directory = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="hostpool-fleet-demo-"))
            )
            try:
                vendor = Vendor(limit, config.service_time).start()
            except OSError as exc:
                raise _DemoError(f"cannot listen on loopback: {exc}") from None
            stack.callback(vendor.stop)
            if binary is not None:
                redis = RedisProcess(binary, directory)
                stack.callback(redis.stop)
                try:
                    redis.start()
                except (OSError, RuntimeError) as exc:
                    raise _DemoError(f"cannot start {binary}: {exc}") from None
                redis_url, redis_note = redis.url, f"started for the demo: {binary}, no persistence"
            else:
                assert config.redis_url is not None
                _check_reachable(config.redis_url)
                redis_url, redis_note = (
                    config.redis_url,
                    f"given with --redis; namespace {namespace}",
                )
            for line in _header(config, vendor, redis_url, redis_note):
                print(line, file=out)
            out.flush()
            for index, phase in enumerate(phases, 1):
                print(
                    f"[{index}/{len(phases)}] {phase.label}: {config.workers} workers x "
                    f"{config.requests} requests ...",
                    file=err,
                    flush=True,
                )
                result = _run_phase(config, phase, vendor, redis_url, namespace, directory, index)
                print(
                    f"[{index}/{len(phases)}] {phase.label}: done in {result.elapsed:.1f} s",
                    file=err,
                    flush=True,
                )
                results.append(result)
    except KeyboardInterrupt:
        print(f"\n{_PROG}: interrupted", file=err)
        return 130
    except _DemoError as exc:
        print(f"{_PROG}: {exc}", file=err)
        return 1
    print("", file=out)
    for line in report(config, results[0], results[1]):
        print(line, file=out)
    if config.chart is not None:
        try:
            drawn = write_fleet_chart(config.chart, config, results)
        except OSError as exc:
            print(f"{_PROG}: cannot write the chart: {exc}", file=err)
            return 1
        if drawn:
            print(f"\nChart: {config.chart.resolve()}", file=out)
        else:
            print(f"\nChart skipped: matplotlib is not installed ({CHART_HINT})", file=out)
    out.flush()
    return 0


def _header(config: FleetDemoConfig, vendor: Vendor, redis_url: str, redis_note: str) -> list[str]:
    limit, n = config.limit, config.workers
    took = fmt_seconds(config.service_time)
    return [
        f"hostpool demo --fleet: {n} processes share a vendor that allows {limit} "
        "concurrent requests",
        "",
        f"  vendor   {vendor.url}",
        f"           serves {limit} requests at a time, {took} each; a request that arrives "
        f"while {limit}",
        f"           are being served gets 429 Too Many Requests (Retry-After: 1) after {took}",
        f"  redis    {redis_url}",
        f"           {redis_note}",
        f"  workers  {n} processes with a HostRouter each: {config.requests} requests each, "
        f"{config.per_worker} at a time",
        "",
        "  The same workload runs twice (respect_retry_after is off: every 429 shows):",
        f"    [1/2] Quota(max_connections={limit}): each process keeps to its {limit}, "
        "unaware of the others",
        f"    [2/2] Quota(max_connections={limit}, fleet=FleetQuota(max_connections={limit})) with",
        f"          RedisFleet(url, lease_ttl={_LEASE_TTL:g}, timeout={_STORE_TIMEOUT:g}): "
        f"{limit} at once across all {n}",
    ]


def _per_second(count: int, seconds: float) -> str:
    return f"{count / seconds:.0f}/s" if seconds > 0 else "-"


def report(config: FleetDemoConfig, local: PhaseResult, fleet: PhaseResult) -> list[str]:
    """The side-by-side table of both runs and a few computed words."""
    limit = config.limit
    runs = (local, fleet)
    rows: list[list[str]] = [["", local.label, fleet.label]]

    def row(name: str, cell: Callable[[PhaseResult], str]) -> None:
        rows.append([name, *(cell(r) for r in runs)])

    row(f"vendor peak in flight (limit {limit})", lambda r: str(r.vendor.peak_in_flight))
    row("vendor 200 OK", lambda r: str(r.vendor.ok))
    row("vendor 429 Too Many Requests", lambda r: str(r.vendor.refused))
    row("total time", lambda r: fmt_seconds(r.elapsed))
    row("requests/s (all answers)", lambda r: _per_second(r.answered, r.elapsed))
    row("200 OK/s", lambda r: _per_second(r.statuses.get("200", 0), r.elapsed))
    row("worker latency p50", lambda r: fmt_seconds(quantile(r.latencies, 0.5)))
    row("worker latency p99", lambda r: fmt_seconds(quantile(r.latencies, 0.99)))
    row("fleet waits", lambda r: str(r.fleet_waits) if r.fleet else "-")
    if any(r.errors for r in runs):
        row("worker errors", lambda r: _error_text(r.errors) or "0")
    if any(r.fleet_unavailable or r.fleet_leases_lost for r in runs):
        row("fleet store unavailable", lambda r: str(r.fleet_unavailable) if r.fleet else "-")
        row("fleet leases lost", lambda r: str(r.fleet_leases_lost) if r.fleet else "-")
    total = config.workers * config.requests
    lines = [
        f"Results: {config.workers} workers x {config.requests} requests = {total} "
        "(latency: from send to full response)",
        "",
        *table(rows),
        "",
    ]
    lines.append("\n\n".join(textwrap.fill(w, width=78) for w in _conclusion(config, local, fleet)))
    return lines


def _error_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(errors.items()))


def _conclusion(config: FleetDemoConfig, local: PhaseResult, fleet: PhaseResult) -> list[str]:
    """Plain words on what the numbers show (computed from them, never canned)."""
    limit, n = config.limit, config.workers
    words: list[str] = []
    lv, fv = local.vendor, fleet.vendor
    asked = n * config.per_worker
    if lv.peak_in_flight > limit or lv.refused:
        words.append(
            f"With local quotas only, each process kept to its own {limit}, but together "
            f"they sent the vendor up to {lv.peak_in_flight} requests at once "
            f"({lv.peak_in_flight / limit:.1f}x its limit): it refused {lv.refused} of "
            f"{lv.ok + lv.refused} with 429."
        )
    else:
        words.append(
            f"With local quotas only, the vendor saw at most {lv.peak_in_flight} requests "
            f"at once and refused none: the {n} workers never overlapped enough "
            f"({asked} asked for at most). Raise --workers or --concurrency."
        )
    if fv.peak_in_flight <= limit and not fv.refused:
        words.append(
            f"With FleetQuota(max_connections={limit}), the {n} routers shared {limit} "
            f"slots through Redis: the vendor never saw more than {fv.peak_in_flight} at "
            f"once and refused nothing. {fleet.fleet_waits} requests waited for a fleet "
            f"slot instead (latency p50 {fmt_seconds(quantile(fleet.latencies, 0.5))})."
        )
    else:
        why = (
            f" Redis did not answer in time {fleet.fleet_unavailable} times, and admission "
            "fell back to the local quota (on_unavailable='local')."
            if fleet.fleet_unavailable
            else ""
        )
        words.append(
            f"With FleetQuota(max_connections={limit}), the vendor still saw "
            f"{fv.peak_in_flight} at once and refused {fv.refused}.{why}"
        )
    return words


def write_fleet_chart(path: Path, config: FleetDemoConfig, results: Sequence[PhaseResult]) -> bool:
    """Draw the vendor's requests in flight over time for each run; False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(10, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = float(config.limit)
    for result, color in zip(results, ("tab:red", "tab:blue"), strict=False):
        series = [*result.vendor.series, (result.elapsed, result.vendor.series[-1][1])]
        xs = [t for t, _ in series]
        ys = [v for _, v in series]
        top = max(top, *ys)
        ax.step(
            xs,
            ys,
            where="post",
            color=color,
            linewidth=0.9,
            label=f"{result.label}: peak {result.vendor.peak_in_flight}, "
            f"{result.vendor.refused} x 429, done in {fmt_seconds(result.elapsed)}",
        )
    ax.axhline(
        config.limit,
        color="0.15",
        linestyle="--",
        linewidth=1.2,
        label=f"vendor limit: {config.limit} concurrent requests",
    )
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0, top=top * 1.12)
    ax.set_xlabel("time since the workers were told to go (s)")
    ax.set_ylabel("requests in flight at the vendor")
    ax.set_title(
        f"{config.workers} processes, one vendor: local quotas only vs "
        f"FleetQuota(max_connections={config.limit}) on Redis"
    )
    ax.grid(True, axis="y", color="0.85", linewidth=0.6)
    fig.legend(loc="outside lower center", ncols=1, fontsize=9, frameon=False)
    fig.savefig(path, dpi=110)
    return True


# ---------------------------------------------------------------------------
# The worker process: python -m hostpool.demo.fleet --worker ...
# ---------------------------------------------------------------------------


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hostpool.demo.fleet",
        description="One worker of `python -m hostpool demo --fleet` (started by the demo): "
        "prints 'ready', waits for 'go' on stdin, sends its requests, prints a JSON report.",
    )
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--local-cap", type=int, required=True)
    parser.add_argument("--fleet-cap", type=int, default=0)
    parser.add_argument("--redis", default=None)
    parser.add_argument("--namespace", default="hostpool-fleet-demo")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    try:
        import anyio

        result = anyio.run(_work, args, backend="asyncio")
    except KeyboardInterrupt:
        return 130
    if result is None:
        return 1
    print(json.dumps(result), flush=True)
    return 0


async def _work(args: argparse.Namespace) -> dict[str, object] | None:
    """Set up a router, say 'ready', wait for 'go', send; None if stdin says anything else."""
    # Everything slow (imports, the router) happens before "ready", so that
    # the workers start sending together when the demo says "go".
    import anyio
    import httpx

    from hostpool import FleetQuota, HostRouter, Quota
    from hostpool.redis import RedisFleet

    host = httpx.URL(args.url).host
    fleet_quota = FleetQuota(max_connections=args.fleet_cap) if args.fleet_cap else None
    fleet = None
    if fleet_quota is not None:
        fleet = RedisFleet(
            args.redis, namespace=args.namespace, lease_ttl=_LEASE_TTL, timeout=_STORE_TIMEOUT
        )
    router = HostRouter(
        quotas={host: Quota(max_connections=args.local_cap, fleet=fleet_quota)},
        fleet=fleet,
        timeout=httpx.Timeout(args.timeout),
        # A proxy from the environment must not carry loopback traffic.
        trust_env=False,
    )
    statuses: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    async with router:
        todo = iter(range(args.requests))

        async def sender() -> None:
            for _ in todo:
                start = time.perf_counter()
                try:
                    response = await router.get(args.url)
                except Exception as exc:
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append(round(time.perf_counter() - start, 6))
                statuses[str(response.status_code)] += 1

        print("ready", flush=True)
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
        if line.strip() != "go":
            return None
        async with anyio.create_task_group() as group:
            for _ in range(args.concurrency):
                group.start_soon(sender)
        stats = router.stats()
    return {
        "statuses": dict(statuses),
        "errors": dict(errors),
        "latencies": latencies,
        "fleet_waits": stats.fleet_waits,
        "fleet_unavailable": stats.fleet_unavailable,
        "fleet_leases_lost": stats.fleet_leases_lost,
    }


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))

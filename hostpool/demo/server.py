"""The demo's upstreams: a minimal HTTP/1.1 keep-alive server on loopback.

One asyncio loop in a daemon thread serves two listeners: a healthy host that
answers at once, and a slow one that turns slow at a chosen instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

__all__ = ["Kind", "LoopbackUpstreams", "UpstreamCounters"]

Kind = Literal["healthy", "slow"]

_BACKLOG = 1024
_MAX_BODY = 1 << 20
_IDLE_TIMEOUT = 60.0  # seconds an upstream keeps an idle keep-alive connection
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


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

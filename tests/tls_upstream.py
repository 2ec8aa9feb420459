"""Loopback TLS (HTTP/2 + HTTP/1.1) upstream, a forward HTTP proxy and a test CA.

Everything here runs in its own thread with its own :mod:`asyncio` loop, so it
can be used from tests running under asyncio *or* trio (anyio's pytest
plugin), and every counter is thread-safe.

- :func:`make_tls` builds a throw-away certificate authority with
  :mod:`trustme` and a server certificate for the loopback addresses and
  ``localhost``; :meth:`TestTLS.client_context` returns a fresh
  :class:`ssl.SSLContext` that trusts that CA only.  Use a fresh context per
  client: httpcore sets ALPN protocols *on* the context it is given.
- :class:`TLSUpstream` listens on several loopback addresses (one port for all
  of them when possible), negotiates ALPN ``h2`` or ``http/1.1`` and serves
  ``/ok`` and ``/hold?key=...`` over both, written with the ``h2`` library.
  It counts, per address and in total, TCP connections accepted, TLS
  connections open (and their peak), failed handshakes, connections per
  protocol, requests in flight (and peak), and HTTP/2 streams in flight
  (and peak).
- :class:`ForwardProxy` is a tiny HTTP proxy: absolute-form requests
  (``GET http://host:port/path``) are forwarded, ``CONNECT host:port`` is
  tunnelled.  It counts client connections, forwarded requests (with their
  in-flight peak) and tunnels, and records the target of each.

Counter semantics follow ``tests/upstream.py``: a request is in flight from
the moment its head is read until *just before* the final bytes of its
response are written (or it is abandoned), so the server's peak never exceeds
the concurrency the client really used.  A TLS connection counts as open from
the end of its handshake until the server's side of the socket is closed; a
connection whose handshake fails counts in ``accepted`` and
``handshake_failures`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import anyio
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trustme

__all__ = [
    "TLS_HOSTS",
    "ForwardProxy",
    "ProxyStats",
    "TLSStats",
    "TLSUpstream",
    "TestTLS",
    "make_tls",
]

logger = logging.getLogger("tests.tls_upstream")

#: The addresses :class:`TLSUpstream` listens on by default.
TLS_HOSTS: tuple[str, ...] = ("127.0.0.1", "127.0.0.2", "127.0.0.3")

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_HANDSHAKE_TIMEOUT = 5.0
_CLOSE_TIMEOUT = 2.0
_READ_SIZE = 65536
_MAX_HEAD = 64 * 1024


# --------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TestTLS:
    """A test certificate authority and a server certificate it issued."""

    __test__ = False  # not a pytest test class, whatever its name

    ca: trustme.CA
    server_cert: trustme.LeafCert
    identities: tuple[str, ...]

    def client_context(self) -> ssl.SSLContext:
        """A fresh client context that trusts the test CA (and nothing else)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        return ctx

    def server_context(self, alpn: Sequence[str] = ("h2", "http/1.1")) -> ssl.SSLContext:
        """A fresh server context with the server certificate and ALPN ``alpn``."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_cert.configure_cert(ctx)
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx


def make_tls(identities: Iterable[str] = (*TLS_HOSTS, "localhost")) -> TestTLS:
    """Make a CA and a server certificate for ``identities`` (IPs or host names)."""
    names = tuple(identities)
    ca = trustme.CA()
    return TestTLS(ca=ca, server_cert=ca.issue_cert(*names), identities=names)


# --------------------------------------------------------------------------
# A loop in a thread
# --------------------------------------------------------------------------


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Failed handshakes and peers that vanish are what these servers are for:
    # keep them out of the test output (they are counted instead).
    logger.debug("server loop: %s", context.get("message"), exc_info=context.get("exception"))


class _LoopThread:
    """An asyncio loop running in a daemon thread, and the tasks it serves."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_quiet_exception_handler)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._listeners: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _launch(self, coro: Coroutine[Any, Any, Any]) -> Any:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=_START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Start a connection task (loop thread only)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_socket(
        self,
        sock: socket.socket,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]],
    ) -> None:
        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._spawn(handler(reader, writer))

        server = await asyncio.start_server(on_connect, sock=sock, limit=_READ_SIZE, backlog=512)
        self._servers.append(server)

    async def _accept_forever(
        self, sock: socket.socket, handler: Callable[[socket.socket], Coroutine[Any, Any, None]]
    ) -> None:
        """Accept raw sockets on ``sock`` and hand each one to ``handler`` in its own task."""
        self._listeners.append(sock)
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError:
                return  # listener closed
            conn.setblocking(False)
            self._spawn(handler(conn))

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        tasks = list(self._tasks)
        for sock in self._listeners:
            sock.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.transport.abort()
        for server in self._servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5.0)
        for _ in range(3):
            await asyncio.sleep(0)

    def stop(self) -> None:
        """Close every listener and connection, stop the loop, join the thread. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            try:
                future.result(timeout=_STOP_TIMEOUT)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=_STOP_TIMEOUT)
            if self._thread.is_alive():
                raise RuntimeError(f"{self._thread.name} did not stop")
        elif not self._loop.is_closed():
            self._loop.close()

    async def _close_writer(self, writer: asyncio.StreamWriter) -> None:
        if not writer.transport.is_closing():
            writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT)
        except (asyncio.TimeoutError, Exception):
            # A TLS peer that never answers our close_notify: drop the socket.
            writer.transport.abort()
        self._writers.discard(writer)

    def describe(self) -> str:
        raise NotImplementedError

    async def wait_until(
        self,
        predicate: Callable[[], object],
        timeout: float = 5.0,  # noqa: ASYNC109 - bounded by default, message carries the stats
        *,
        interval: float = 0.005,
        what: str | None = None,
    ) -> None:
        """Poll ``predicate`` (with :func:`anyio.sleep`, any backend) until it is truthy.

        Raises :class:`TimeoutError` with the current counters after ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                if what is None:
                    try:
                        what = inspect.getsource(predicate).strip()
                    except (OSError, TypeError):
                        what = repr(predicate)
                raise TimeoutError(
                    f"condition not met within {timeout}s: {what}\n{self.describe()}"
                )
            await anyio.sleep(interval)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_same_port(hosts: Sequence[str], attempts: int = 20) -> list[socket.socket]:
    """One listening socket per host, all on one port (hosts then differ by address only)."""
    last: OSError | None = None
    for _ in range(attempts):
        socks: list[socket.socket] = []
        try:
            socks.append(_bind(hosts[0], 0))
            port = socks[0].getsockname()[1]
            for host in hosts[1:]:
                socks.append(_bind(host, port))
        except OSError as exc:
            for s in socks:
                s.close()
            last = exc
            continue
        return socks
    raise OSError(f"could not bind {hosts} on one port") from last


def _parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return method, target, version, headers


def _header(headers: Iterable[tuple[str, str]], name: str, default: str = "") -> str:
    for key, value in headers:
        if key.lower() == name:
            return value
    return default


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """Read up to the blank line; ``None`` on a clean EOF before any byte."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionResetError("connection closed inside a request head") from None
        return None


async def _unless_peer_closes(reader: asyncio.StreamReader, work: asyncio.Future[Any]) -> bool:
    """Await ``work`` unless the peer closes first (HTTP/1.1: nothing else may arrive meanwhile).

    Returns True if ``work`` finished without error; else cancels it and returns False.
    """
    eof = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait({work, eof}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, eof):
            if not task.done():
                task.cancel()
        await asyncio.gather(work, eof, return_exceptions=True)
    return work.done() and not work.cancelled() and work.exception() is None


# --------------------------------------------------------------------------
# TLS upstream
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSStats:
    """Snapshot of :class:`TLSUpstream` counters for one address or in total."""

    accepted: int = 0
    """TCP connections accepted (including ones whose handshake failed)."""
    handshake_failures: int = 0
    """Connections whose TLS handshake failed (e.g. the client rejected the cert)."""
    open_sockets: int = 0
    """TLS connections past their handshake whose server side is not closed yet."""
    peak_open_sockets: int = 0
    """Highest ``open_sockets`` since start or :meth:`TLSUpstream.reset_peaks`."""
    h2_connections: int = 0
    """Connections that negotiated ALPN ``h2``."""
    h1_connections: int = 0
    """Connections that negotiated ``http/1.1`` (or no ALPN at all)."""
    settings_acked: int = 0
    """HTTP/2 connections whose client acknowledged the server's SETTINGS.

    Once every connection's client has, a client waiting for responses has
    nothing left to write (wait on it before cancelling requests mid-flight).
    """
    requests: int = 0
    """Requests (HTTP/1.1) and streams (HTTP/2) whose head was read."""
    completed: int = 0
    """Responses written in full."""
    in_flight: int = 0
    """Requests and streams whose head was read and whose response is not written."""
    peak_in_flight: int = 0
    """Highest ``in_flight``."""
    streams_in_flight: int = 0
    """HTTP/2 streams in flight (a subset of ``in_flight``)."""
    peak_streams_in_flight: int = 0
    """Highest ``streams_in_flight``."""
    peak_streams_per_connection: int = 0
    """Most HTTP/2 streams in flight at once on a single connection."""


@dataclass
class _TLSCounter:
    accepted: int = 0
    handshake_failures: int = 0
    open_sockets: int = 0
    peak_open_sockets: int = 0
    h2_connections: int = 0
    h1_connections: int = 0
    settings_acked: int = 0
    requests: int = 0
    completed: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    streams_in_flight: int = 0
    peak_streams_in_flight: int = 0
    peak_streams_per_connection: int = 0

    def snapshot(self) -> TLSStats:
        return TLSStats(**{f.name: getattr(self, f.name) for f in fields(self)})


class _TLSStats:
    """Thread-safe counters per address and in total."""

    def __init__(self, hosts: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._hosts = {h: _TLSCounter() for h in hosts}
        self._total = _TLSCounter()

    def _both(self, host: str) -> tuple[_TLSCounter, _TLSCounter]:
        return self._hosts[host], self._total

    def accepted(self, host: str) -> None:
        with self._lock:
            for c in self._both(host):
                c.accepted += 1

    def handshake_failed(self, host: str) -> None:
        with self._lock:
            for c in self._both(host):
                c.handshake_failures += 1

    def opened(self, host: str, h2: bool) -> None:
        with self._lock:
            for c in self._both(host):
                c.open_sockets += 1
                c.peak_open_sockets = max(c.peak_open_sockets, c.open_sockets)
                if h2:
                    c.h2_connections += 1
                else:
                    c.h1_connections += 1

    def settings_acked(self, host: str) -> None:
        with self._lock:
            for c in self._both(host):
                c.settings_acked += 1

    def closed(self, host: str) -> None:
        with self._lock:
            for c in self._both(host):
                c.open_sockets -= 1

    def request_started(self, host: str, h2: bool, on_connection: int = 0) -> None:
        with self._lock:
            for c in self._both(host):
                c.requests += 1
                c.in_flight += 1
                c.peak_in_flight = max(c.peak_in_flight, c.in_flight)
                if h2:
                    c.streams_in_flight += 1
                    c.peak_streams_in_flight = max(c.peak_streams_in_flight, c.streams_in_flight)
                    c.peak_streams_per_connection = max(
                        c.peak_streams_per_connection, on_connection
                    )

    def request_finished(self, host: str, h2: bool, completed: bool) -> None:
        with self._lock:
            for c in self._both(host):
                c.in_flight -= 1
                if h2:
                    c.streams_in_flight -= 1
                if completed:
                    c.completed += 1

    def reset_peaks(self) -> None:
        with self._lock:
            for c in (*self._hosts.values(), self._total):
                c.peak_open_sockets = c.open_sockets
                c.peak_in_flight = c.in_flight
                c.peak_streams_in_flight = c.streams_in_flight
                c.peak_streams_per_connection = 0

    def get(self, host: str) -> TLSStats:
        with self._lock:
            return self._hosts[host].snapshot()

    def total(self) -> TLSStats:
        with self._lock:
            return self._total.snapshot()


class _InFlight:
    """One request/stream in flight: finishes its counter exactly once."""

    __slots__ = ("_done", "_h2", "_host", "_stats")

    def __init__(self, stats: _TLSStats, host: str, h2: bool, on_connection: int = 0) -> None:
        self._stats, self._host, self._h2, self._done = stats, host, h2, False
        stats.request_started(host, h2, on_connection)

    def finish(self, completed: bool) -> None:
        if not self._done:
            self._done = True
            self._stats.request_finished(self._host, self._h2, completed)


class TLSUpstream(_LoopThread):
    """An HTTPS server (ALPN ``h2`` and ``http/1.1``) on loopback addresses.

    Routes (first path segment; query string as in ``tests/upstream.py``):

    - ``/`` or ``/ok``: 200, body ``ok``.
    - ``/hold?key=abc``: 200 once :meth:`release` ("abc") or :meth:`release_all`.
    - anything else: 404.

    Every response carries ``x-upstream-addr`` (the address the connection
    arrived on), ``x-upstream-conn`` (a server-wide connection number) and
    ``x-upstream-proto`` (``h2`` or ``http/1.1``).
    """

    def __init__(
        self,
        tls: TestTLS,
        hosts: Sequence[str],
        max_concurrent_streams: int,
        alpn: Sequence[str],
    ) -> None:
        super().__init__(name=f"tls-upstream-{id(self):x}")
        self.tls = tls
        self.hosts = tuple(hosts)
        self.port = 0
        self.max_concurrent_streams = max_concurrent_streams
        self.alpn = tuple(alpn)
        self._server_ctx = tls.server_context(self.alpn)
        self._stats = _TLSStats(self.hosts)
        self._conn_ids = itertools.count(1)
        self._released: set[str] = set()
        self._release_everything = False
        self._held: dict[str, int] = {}
        self._events: dict[str, asyncio.Event] = {}  # loop thread only

    @classmethod
    def start(
        cls,
        tls: TestTLS,
        hosts: Sequence[str] = TLS_HOSTS,
        *,
        max_concurrent_streams: int = 100,
        alpn: Sequence[str] = ("h2", "http/1.1"),
    ) -> TLSUpstream:
        """Listen on every host (one port for all), serve in a new thread.

        ``max_concurrent_streams`` is the HTTP/2 setting the server announces;
        ``alpn=("http/1.1",)`` makes an HTTP/1.1-only server.
        """
        socks = _bind_same_port(hosts)
        server = cls(tls, hosts, max_concurrent_streams, alpn)
        server.port = socks[0].getsockname()[1]

        async def serve() -> None:
            for host, sock in zip(hosts, socks, strict=True):
                server._spawn(
                    server._accept_forever(sock, lambda conn, host=host: server._handle(host, conn))
                )

        try:
            server._launch(serve())
        except BaseException:
            for s in socks:
                s.close()
            raise
        return server

    def __enter__(self) -> TLSUpstream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release_all()
        self.stop()

    # -- addresses and counters ------------------------------------------------

    def url(self, host: str = "127.0.0.1", path: str = "/") -> str:
        """``https://host:port/path``."""
        if host not in self.hosts and host != "localhost":
            raise KeyError(f"TLS upstream does not listen on {host!r}; hosts={self.hosts}")
        return f"https://{host}:{self.port}{path}"

    def stats(self, host: str = "127.0.0.1") -> TLSStats:
        """Counters of one address."""
        return self._stats.get(host)

    def total(self) -> TLSStats:
        """Counters across every address (peaks are true global peaks)."""
        return self._stats.total()

    def reset_peaks(self) -> None:
        """Set every peak to the current value of its gauge."""
        self._stats.reset_peaks()

    def describe(self) -> str:
        lines = [f"total: {self.total()}"]
        lines += [f"  {h}: {self.stats(h)}" for h in self.hosts]
        with self._lock:
            lines.append(f"  held: { {k: v for k, v in self._held.items() if v} }")
        return "\n".join(lines)

    # -- hold / release (thread-safe) ------------------------------------------

    def release(self, key: str) -> None:
        """Release every current and future ``/hold?key=<key>``."""
        with self._lock:
            self._released.add(key)
        self._call_soon(self._wake, key)

    def release_all(self) -> None:
        """Release every current and future hold, whatever its key."""
        with self._lock:
            self._release_everything = True
        self._call_soon(self._wake_all)

    def held(self, key: str | None = None) -> int:
        """Requests currently held on ``key`` (or on any key)."""
        with self._lock:
            if key is None:
                return sum(self._held.values())
            return self._held.get(key, 0)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed
            self._loop.call_soon_threadsafe(fn, *args)

    def _wake(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    def _wake_all(self) -> None:
        for key in list(self._events):
            self._wake(key)

    async def _hold(self, key: str) -> None:
        # The check and the event creation happen in one loop step, and a
        # release updates the shared state before scheduling _wake: no missed wake.
        with self._lock:
            if self._release_everything or key in self._released:
                return
            self._held[key] = self._held.get(key, 0) + 1
        event = self._events.setdefault(key, asyncio.Event())
        try:
            await event.wait()
        finally:
            with self._lock:
                self._held[key] -= 1

    async def _route(self, target: str) -> tuple[int, bytes]:
        split = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
        route = split.path.strip("/").split("/", 1)[0]
        if route in ("", "ok"):
            return 200, b"ok"
        if route == "hold":
            await self._hold(query.get("key", ""))
            return 200, b"ok"
        return 404, b"not found"

    # -- connections ------------------------------------------------------------

    async def _handle(self, host: str, sock: socket.socket) -> None:
        self._stats.accepted(host)
        conn_id = next(self._conn_ids)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ_SIZE, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            # Not start_server + StreamWriter.start_tls: on Python 3.11 bytes of
            # the ClientHello already read into the StreamReader are lost.
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=self._server_ctx,
                ssl_handshake_timeout=_HANDSHAKE_TIMEOUT,
            )
        except (ssl.SSLError, OSError, asyncio.TimeoutError, EOFError) as exc:
            logger.debug("handshake on %s failed: %r", host, exc)
            self._stats.handshake_failed(host)
            sock.close()
            return
        except BaseException:  # cancelled (server stopping)
            sock.close()
            raise
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        self._writers.add(writer)
        opened = False
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            is_h2 = alpn == "h2"
            self._stats.opened(host, is_h2)
            opened = True
            if is_h2:
                await self._serve_h2(host, conn_id, reader, writer)
            else:
                await self._serve_h1(host, conn_id, reader, writer)
        except (ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            await self._close_writer(writer)
            if opened:
                self._stats.closed(host)

    def _extra_headers(self, host: str, conn_id: int, proto: str) -> list[tuple[str, str]]:
        return [
            ("server", "hostpool-tls-upstream"),
            ("x-upstream-addr", f"{host}:{self.port}"),
            ("x-upstream-conn", str(conn_id)),
            ("x-upstream-proto", proto),
        ]

    async def _serve_h1(
        self,
        host: str,
        conn_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        while True:
            head = await _read_head(reader)
            if head is None:
                return
            _method, target, version, headers = _parse_head(head)
            length = int(_header(headers, "content-length", "0") or 0)
            if length:
                await reader.readexactly(length)
            keep_alive = version == "HTTP/1.1" and _header(headers, "connection").lower() != "close"
            flight = _InFlight(self._stats, host, h2=False)
            try:
                route = asyncio.ensure_future(self._route(target))
                if not await _unless_peer_closes(reader, route):
                    return
                status, body = route.result()
                lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}"]
                extra = [*self._extra_headers(host, conn_id, "http/1.1")]
                extra.append(("content-length", str(len(body))))
                if not keep_alive:
                    extra.append(("connection", "close"))
                lines += [f"{k}: {v}" for k, v in extra]
                flight.finish(completed=True)
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
                await writer.drain()
            finally:
                flight.finish(completed=False)
            if not keep_alive:
                return

    async def _serve_h2(
        self,
        host: str,
        conn_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        conn = h2.connection.H2Connection(config=config)
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        conn.initiate_connection()
        streams: dict[int, asyncio.Task[None]] = {}
        acked = False

        def flush() -> None:
            data = conn.data_to_send()
            if data and not writer.transport.is_closing():
                writer.write(data)

        async def stream(stream_id: int, headers: list[tuple[str, str]]) -> None:
            flight = _InFlight(self._stats, host, h2=True, on_connection=len(streams))
            try:
                status, body = await self._route(_header(headers, ":path", "/"))
                response_headers = [
                    (":status", str(status)),
                    ("content-length", str(len(body))),
                    *self._extra_headers(host, conn_id, "h2"),
                ]
                flight.finish(completed=True)
                try:
                    conn.send_headers(stream_id, response_headers)
                    conn.send_data(stream_id, body, end_stream=True)
                except h2.exceptions.ProtocolError:
                    return  # the client reset the stream or closed the connection
                flush()
            finally:
                flight.finish(completed=False)
                streams.pop(stream_id, None)

        flush()
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    return
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    flush()
                    return
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        task = asyncio.ensure_future(
                            stream(event.stream_id, list(event.headers or []))
                        )
                        streams[event.stream_id] = task
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.SettingsAcknowledged):
                        if not acked:
                            acked = True
                            self._stats.settings_acked(host)
                    elif isinstance(event, h2.events.StreamReset):
                        task = streams.pop(event.stream_id, None)
                        if task is not None:
                            task.cancel()
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        flush()
                        return
                flush()
                await writer.drain()
        finally:
            tasks = list(streams.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------
# Forward proxy
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyStats:
    """Snapshot of :class:`ForwardProxy` counters."""

    connections: int = 0
    """Client connections accepted."""
    connections_open: int = 0
    """Client connections not closed yet."""
    forwarded: int = 0
    """Absolute-form requests forwarded to their target."""
    forwarded_in_flight: int = 0
    """Forwarded requests whose response is not relayed in full yet."""
    peak_forwarded_in_flight: int = 0
    """Highest ``forwarded_in_flight``."""
    tunnels: int = 0
    """CONNECT tunnels established."""
    tunnels_open: int = 0
    """CONNECT tunnels not closed yet."""
    failures: int = 0
    """Requests the proxy could not serve (bad request, target unreachable)."""
    targets: tuple[tuple[str, int], ...] = ()
    """``(target "host:port", requests + tunnels)``, sorted by target."""

    def to(self, target: str) -> int:
        """Requests forwarded plus tunnels opened to ``target`` ("host:port")."""
        return dict(self.targets).get(target, 0)


class ForwardProxy(_LoopThread):
    """A minimal HTTP/1.1 forward proxy: absolute-form forwarding and CONNECT tunnels."""

    def __init__(self, host: str) -> None:
        super().__init__(name=f"forward-proxy-{id(self):x}")
        self.host = host
        self.port = 0
        self._counts: dict[str, int] = {
            "connections": 0,
            "connections_open": 0,
            "forwarded": 0,
            "forwarded_in_flight": 0,
            "peak_forwarded_in_flight": 0,
            "tunnels": 0,
            "tunnels_open": 0,
            "failures": 0,
        }
        self._targets: dict[str, int] = {}

    @classmethod
    def start(cls, host: str = "127.0.0.1") -> ForwardProxy:
        """Listen on ``host`` (an ephemeral port), serve in a new thread."""
        sock = _bind(host, 0)
        proxy = cls(host)
        proxy.port = sock.getsockname()[1]
        try:
            proxy._launch(proxy._serve_socket(sock, proxy._handle))
        except BaseException:
            sock.close()
            raise
        return proxy

    def __enter__(self) -> ForwardProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://host:port`` of the proxy."""
        return f"http://{self.host}:{self.port}"

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(**self._counts, targets=tuple(sorted(self._targets.items())))

    def describe(self) -> str:
        return f"proxy: {self.stats()}"

    def _add(self, name: str, n: int = 1, target: str | None = None) -> None:
        with self._lock:
            self._counts[name] += n
            if name == "forwarded_in_flight":
                self._counts["peak_forwarded_in_flight"] = max(
                    self._counts["peak_forwarded_in_flight"], self._counts[name]
                )
            if target is not None:
                self._targets[target] = self._targets.get(target, 0) + 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self._add("connections")
        self._add("connections_open")
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                method, target, version, headers = _parse_head(head)
                if method == "CONNECT":
                    await self._tunnel(target, reader, writer)
                    return
                if not await self._forward(method, target, version, headers, reader, writer):
                    return
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            await self._close_writer(writer)
            self._add("connections_open", -1)

    async def _fail(self, writer: asyncio.StreamWriter, status: str) -> None:
        self._add("failures")
        writer.write(
            f"HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _tunnel(
        self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        host, _, port = target.rpartition(":")
        try:
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except (OSError, ValueError):
            await self._fail(writer, "502 Bad Gateway")
            return
        self._writers.add(up_writer)
        self._add("tunnels", target=target)
        self._add("tunnels_open")
        try:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(ConnectionError, OSError):
                    while data := await src.read(_READ_SIZE):
                        dst.write(data)
                        await dst.drain()

            a = asyncio.ensure_future(pipe(reader, up_writer))
            b = asyncio.ensure_future(pipe(up_reader, writer))
            try:
                # When either side closes, the tunnel is over.
                await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (a, b):
                    task.cancel()
                await asyncio.gather(a, b, return_exceptions=True)
        finally:
            await self._close_writer(up_writer)
            self._add("tunnels_open", -1)

    async def _forward(
        self,
        method: str,
        target: str,
        version: str,
        headers: list[tuple[str, str]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Forward one absolute-form request; return whether to keep the client connection."""
        url = urllib.parse.urlsplit(target)
        if url.scheme != "http" or not url.hostname:
            await self._fail(writer, "400 Bad Request")
            return False
        length = int(_header(headers, "content-length", "0") or 0)
        body = await reader.readexactly(length) if length else b""
        keep_alive = version == "HTTP/1.1" and _header(headers, "connection").lower() != "close"
        port = url.port or 80
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        path = urllib.parse.urlunsplit(("", "", url.path or "/", url.query, ""))
        hop = {"connection", "proxy-connection", "keep-alive", "proxy-authorization"}
        lines = [f"{method} {path} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in hop]
        lines.append("connection: close")
        self._add("forwarded", target=f"{host}:{port}")
        self._add("forwarded_in_flight")
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(url.hostname, port)
            except OSError:
                await self._fail(writer, "502 Bad Gateway")
                return False
            self._writers.add(up_writer)
            try:
                up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
                await up_writer.drain()
                response_head = await _read_head(up_reader)
                if response_head is None:
                    await self._fail(writer, "502 Bad Gateway")
                    return False
                status_line, *rest = response_head.decode("latin-1").split("\r\n")
                response_headers = [
                    (k.strip(), v.strip())
                    for k, _, v in (line.partition(":") for line in rest if line)
                ]
                declared = _header(response_headers, "content-length")
                if declared:
                    response_body = await up_reader.readexactly(int(declared))
                else:
                    response_body = await up_reader.read()
                out = [status_line]
                out += [
                    f"{k}: {v}"
                    for k, v in response_headers
                    if k.lower() not in ("connection", "keep-alive", "content-length")
                ]
                out.append(f"content-length: {len(response_body)}")
                if not keep_alive:
                    out.append("connection: close")
            finally:
                await self._close_writer(up_writer)
        finally:
            self._add("forwarded_in_flight", -1)
        writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + response_body)
        await writer.drain()
        return keep_alive

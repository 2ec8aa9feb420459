"""A real HTTP/1.1 upstream server on loopback, for asserting quotas server-side.

The :class:`Upstream` server runs its own :mod:`asyncio` event loop in a daemon
thread, so it can be used from tests running under *any* async backend (asyncio
or trio via anyio's pytest plugin) or from synchronous code.  It listens on one
or more loopback addresses (``127.0.0.1`` .. ``127.0.0.5``, ``::1``), possibly
on many ports per address, and keeps thread-safe counters per listener, per
address and in total.

Request behaviour is chosen by the first path segment and the query string
(``/hold/anything?key=a`` behaves like ``/hold?key=a``):

- ``/`` or ``/ok``: 200 with body ``ok``.
- ``/delay?ms=500``: wait, then 200.
- ``/hold?key=abc``: answer 200 only once :meth:`Upstream.release` ("abc") or
  :meth:`Upstream.release_all` has been called.
- ``/stall-headers``: read the request, never answer.
- ``/stall-body?bytes=10&length=1000``: send headers with
  ``Content-Length: <length>`` and ``bytes`` bytes of body, then stall.
- ``/reset``: abort the socket with a TCP RST (``SO_LINGER`` 0), no answer.
- ``/close-after?ms=0``: 200 with keep-alive headers, then close the socket
  from the server side ``ms`` milliseconds later (an idle keep-alive close).
- ``/close-now``: 200 with ``Connection: close``, then close.
- ``/garbage``: write ``NOT HTTP\\r\\n\\r\\n``, then close.
- ``/status?code=429&retry_after=2``: that status, plus ``Retry-After`` if given.
- ``/bytes?n=100000&chunk=8192&delay_ms=0``: ``n`` bytes (exactly
  :func:`expected_bytes` (n)) with ``Content-Length``, written ``chunk`` bytes at
  a time with ``delay_ms`` between chunks.
- ``/echo``: 200 with a JSON description of the request (method, target, path,
  query, headers, body length and SHA-256, server and client address, the
  connection id).
- ``/redirect?to=<url-encoded URL>&code=302``: redirect to that URL.
- anything else: 404.

Every route that answers also accepts ``close=1`` to answer with
``Connection: close``.  Request bodies may use ``Content-Length`` or chunked
encoding; keep-alive follows HTTP/1.0 and 1.1 rules.  Every response carries
``X-Upstream-Addr: <addr>:<port>`` (the listener the request arrived on) and
``X-Upstream-Conn: <n>`` (a server-wide sequential TCP connection id, handy to
detect connection re-use).

Counter semantics (see :class:`Stats`):

- ``in_flight`` is incremented once a request's head has been read and
  decremented *just before the final bytes of its response are handed to the
  socket* (or when the request is abandoned: client disconnected, ``/reset``,
  ``/garbage``, stalls, server stop).  So a request's server-side in-flight
  interval always lies within the client's own "request outstanding"
  interval: ``peak_in_flight`` never exceeds the concurrency the client really
  used, and once a client holds a full response, ``in_flight`` already
  reflects it.
- ``open_sockets`` is incremented when a connection is accepted and
  decremented only once the server's side of the socket is really closed.  A
  client closing one connection and at once opening another could make the
  server see both open; to avoid counting such phantom overlaps, a new
  connection is counted after a few event-loop turns, and one whose peer has
  already closed by then counts in ``accepted`` but never in ``open_sockets``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hashlib
import http
import inspect
import itertools
import json
import select
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

__all__ = [
    "DEFAULT_HOSTS",
    "IPv6UnavailableError",
    "Listener",
    "RequestRecord",
    "Stats",
    "Upstream",
    "expected_bytes",
    "format_url",
    "ipv6_available",
    "refused_address",
    "stalled_listener",
]

#: The loopback addresses the ``upstream`` fixture listens on.
DEFAULT_HOSTS: tuple[str, ...] = (
    "127.0.0.1",
    "127.0.0.2",
    "127.0.0.3",
    "127.0.0.4",
    "127.0.0.5",
)

_BACKLOG = 1024
_READ_SIZE = 65536
_MAX_HEAD = 64 * 1024
_BYTES_PATTERN = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
#: Event-loop turns a new connection waits before being counted (see module doc).
_ACCEPT_SETTLE_TURNS = 3


class IPv6UnavailableError(OSError):
    """Raised when ``::1`` is requested but IPv6 loopback cannot be bound."""


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def ipv6_available() -> bool:
    """Return True if a TCP socket can be bound (and connected) on ``::1``."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as srv:
            srv.bind(("::1", 0))
            srv.listen(1)
            with socket.create_connection(srv.getsockname()[:2], timeout=2.0):
                pass
    except OSError:
        return False
    return True


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def format_url(host: str, port: int, path: str = "/") -> str:
    """Build ``http://host:port/path``, bracketing IPv6 literals."""
    if not path.startswith("/"):
        path = "/" + path
    netloc = f"[{host}]" if ":" in host else host
    return f"http://{netloc}:{port}{path}"


def expected_bytes(n: int) -> bytes:
    """The exact body that ``/bytes?n=<n>`` sends (a repeating ASCII pattern)."""
    reps, rest = divmod(n, len(_BYTES_PATTERN))
    return _BYTES_PATTERN * reps + _BYTES_PATTERN[:rest]


def _bind_listening(host: str, port: int) -> socket.socket:
    """Bind *and listen* (so nobody else can grab the port meanwhile)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_group(hosts: Sequence[str], attempts: int = 20) -> list[socket.socket]:
    """Bind one listener per host, trying hard to use one port for all of them.

    The first host gets an ephemeral port; the other hosts try that same port.
    If that clashes (``EADDRINUSE``), try again with a fresh ephemeral port; after
    ``attempts`` failures, fall back to independent ephemeral ports.
    """
    for _ in range(attempts):
        socks: list[socket.socket] = []
        try:
            socks.append(_bind_listening(hosts[0], 0))
            port = socks[0].getsockname()[1]
            for host in hosts[1:]:
                socks.append(_bind_listening(host, port))
        except OSError as exc:
            for s in socks:
                s.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return socks
    socks = []
    try:
        for host in hosts:
            socks.append(_bind_listening(host, 0))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


@contextlib.contextmanager
def refused_address(host: str = "127.0.0.1") -> Iterator[tuple[str, int]]:
    """Yield ``(host, port)`` where TCP connections are refused (RST).

    The port is bound but never listened on for the duration of the context,
    so connecting gets ``ECONNREFUSED`` and no other process can grab it.
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        yield host, sock.getsockname()[1]
    finally:
        sock.close()


@contextlib.contextmanager
def stalled_listener(host: str = "127.0.0.1", *, fill: bool = True) -> Iterator[tuple[str, int]]:
    """Yield ``(host, port)`` of a listening socket whose ``accept`` is never called.

    With ``fill=True`` (default) the accept queue (backlog 0) is first filled
    with dummy connections, so that further connection attempts hang in the TCP
    handshake: use it to exercise *connect* timeouts.  With ``fill=False`` the
    first connection(s) complete the handshake but never get an answer.
    """
    listener = socket.socket(_family(host), socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind((host, 0))
        listener.listen(0)
        addr = listener.getsockname()[:2]
        if fill:
            for _ in range(16):
                filler = socket.socket(listener.family, socket.SOCK_STREAM)
                fillers.append(filler)
                filler.setblocking(False)
                filler.connect_ex(addr)
                # On loopback a handshake into a non-full accept queue
                # completes at once; one that stays pending means it is full.
                _, writable, _ = select.select([], [filler], [], 0.05)
                if not writable:
                    break
                if filler.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    break
        yield host, addr[1]
    finally:
        for f in fillers:
            f.close()
        listener.close()


# --------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Immutable snapshot of counters for a listener, an address or in total.

    Peaks are maxima of the gauge *at that level*: the total's
    ``peak_open_sockets`` is the most sockets open at one instant across all
    addresses, not a sum of per-address peaks.
    """

    in_flight: int = 0
    """Requests whose head was read and whose response is not fully written."""
    peak_in_flight: int = 0
    """Highest ``in_flight`` since start, :meth:`Upstream.reset_peaks` or reset."""
    open_sockets: int = 0
    """Accepted connections whose server side is not closed yet."""
    peak_open_sockets: int = 0
    """Highest ``open_sockets`` since start, reset_peaks or reset."""
    accepted: int = 0
    """Connections accepted."""
    requests: int = 0
    """Requests whose head was read."""
    completed: int = 0
    """Responses written in full."""


@dataclass
class _Counter:
    in_flight: int = 0
    peak_in_flight: int = 0
    open_sockets: int = 0
    peak_open_sockets: int = 0
    accepted: int = 0
    requests: int = 0
    completed: int = 0

    def snapshot(self) -> Stats:
        return Stats(
            in_flight=self.in_flight,
            peak_in_flight=self.peak_in_flight,
            open_sockets=self.open_sockets,
            peak_open_sockets=self.peak_open_sockets,
            accepted=self.accepted,
            requests=self.requests,
            completed=self.completed,
        )

    def reset_peaks(self) -> None:
        self.peak_in_flight = self.in_flight
        self.peak_open_sockets = self.open_sockets

    def reset(self) -> None:
        self.accepted = self.requests = self.completed = 0
        self.reset_peaks()


@dataclass(frozen=True)
class Listener:
    """One listening socket: ``host`` is the address string, e.g. ``"::1"``."""

    host: str
    port: int

    @property
    def url(self) -> str:
        """Base URL of this listener (``http://host:port/``)."""
        return format_url(self.host, self.port)


@dataclass(frozen=True)
class RequestRecord:
    """A request as seen by the server (kept in :meth:`Upstream.request_log`)."""

    conn_id: int
    host: str
    port: int
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    started_at: float = field(compare=False)


class _Stats:
    """Thread-safe counters at three levels: listener, address and total."""

    def __init__(self, listeners: Iterable[Listener]) -> None:
        self._lock = threading.Lock()
        self._by_listener = {(li.host, li.port): _Counter() for li in listeners}
        self._by_host = {host: _Counter() for host, _ in self._by_listener}
        self._total = _Counter()

    def _levels(self, key: tuple[str, int]) -> tuple[_Counter, ...]:
        return (self._by_listener[key], self._by_host[key[0]], self._total)

    def conn_opened(self, key: tuple[str, int]) -> None:
        with self._lock:
            for c in self._levels(key):
                c.accepted += 1
                c.open_sockets += 1
                c.peak_open_sockets = max(c.peak_open_sockets, c.open_sockets)

    def conn_accepted_dead(self, key: tuple[str, int]) -> None:
        with self._lock:
            for c in self._levels(key):
                c.accepted += 1

    def conn_closed(self, key: tuple[str, int]) -> None:
        with self._lock:
            for c in self._levels(key):
                c.open_sockets -= 1

    def request_started(self, key: tuple[str, int]) -> None:
        with self._lock:
            for c in self._levels(key):
                c.requests += 1
                c.in_flight += 1
                c.peak_in_flight = max(c.peak_in_flight, c.in_flight)

    def request_finished(self, key: tuple[str, int], *, completed: bool) -> None:
        with self._lock:
            for c in self._levels(key):
                c.in_flight -= 1
                if completed:
                    c.completed += 1

    def get(self, host: str, port: int | None) -> Stats:
        with self._lock:
            if port is None:
                return self._by_host[host].snapshot()
            return self._by_listener[(host, port)].snapshot()

    def total(self) -> Stats:
        with self._lock:
            return self._total.snapshot()

    def all_hosts(self) -> dict[str, Stats]:
        with self._lock:
            return {h: c.snapshot() for h, c in self._by_host.items()}

    def reset_peaks(self) -> None:
        with self._lock:
            for c in self._all():
                c.reset_peaks()

    def reset(self) -> None:
        with self._lock:
            for c in self._all():
                c.reset()

    def _all(self) -> Iterator[_Counter]:
        yield from self._by_listener.values()
        yield from self._by_host.values()
        yield self._total


# --------------------------------------------------------------------------
# HTTP/1.1 connection handling
# --------------------------------------------------------------------------


class _BadRequest(Exception):
    """The client sent something that is not a parseable HTTP/1.x request."""


class _PeerClosed(Exception):
    """The client closed (or reset) the connection while we were waiting."""


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def tokens(self, name: str) -> set[str]:
        name = name.lower()
        return {
            t.strip().lower()
            for k, v in self.headers
            if k.lower() == name
            for t in v.split(",")
            if t.strip()
        }

    @property
    def wants_keep_alive(self) -> bool:
        conn = self.tokens("connection")
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


class _Conn:
    """One accepted TCP connection with our own read buffer.

    Owning the buffer lets us watch for the peer closing the socket (by reading
    into the buffer) while a response is held, without losing pipelined bytes.
    """

    def __init__(
        self,
        conn_id: int,
        listener: Listener,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.conn_id = conn_id
        self.listener = listener
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.peer: tuple[str, int] = (str(peer[0]), int(peer[1]))

    async def _fill(self) -> bool:
        """Read more bytes into the buffer; False on EOF/reset."""
        if self.eof:
            return False
        try:
            data = await self.reader.read(_READ_SIZE)
        except ConnectionError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def read_head(self) -> bytes | None:
        """Return the next request head (without the blank line), None on EOF."""
        while True:
            # Tolerate stray CRLFs between requests (RFC 9112 section 2.2).
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
            idx = self.buf.find(b"\r\n\r\n")
            if idx >= 0:
                head = bytes(self.buf[:idx])
                del self.buf[: idx + 4]
                return head
            if len(self.buf) > _MAX_HEAD:
                raise _BadRequest("request head too large")
            if not await self._fill():
                if self.buf:
                    raise _PeerClosed("EOF inside request head")
                return None

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._fill():
                raise _PeerClosed("EOF inside request body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_line(self) -> bytes:
        while (idx := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > _MAX_HEAD:
                raise _BadRequest("line too long")
            if not await self._fill():
                raise _PeerClosed("EOF inside chunked body")
        line = bytes(self.buf[:idx])
        del self.buf[: idx + 2]
        return line

    async def read_request(self) -> _Request | None:
        head = await self.read_head()
        if head is None:
            return None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(f"bad request line {lines[0]!r}")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(f"bad header line {line!r}")
            headers.append((name, value.strip()))
        return _Request(method=parts[0], target=parts[1], version=parts[2], headers=headers)

    async def read_body(self, req: _Request) -> None:
        if "chunked" in req.tokens("transfer-encoding"):
            chunks: list[bytes] = []
            while True:
                size_line = await self.read_line()
                try:
                    size = int(size_line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise _BadRequest("bad chunk size") from None
                if size == 0:
                    while await self.read_line():  # trailers
                        pass
                    break
                chunks.append(await self.read_exact(size))
                if await self.read_exact(2) != b"\r\n":
                    raise _BadRequest("bad chunk terminator")
            req.body = b"".join(chunks)
            return
        length = req.header("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise _BadRequest("bad Content-Length") from None
            if n < 0:
                raise _BadRequest("negative Content-Length")
            req.body = await self.read_exact(n)

    async def wait_for_eof(self) -> None:
        """Return once the peer has closed the connection (buffering its data)."""
        while await self._fill():
            pass

    async def unless_peer_closes(self, aw: Awaitable[object]) -> None:
        """Await ``aw``; raise :class:`_PeerClosed` if the peer closes first."""
        main = asyncio.ensure_future(aw)
        watch = asyncio.ensure_future(self.wait_for_eof())
        try:
            await asyncio.wait({main, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (main, watch):
                t.cancel()
            await asyncio.gather(main, watch, return_exceptions=True)
        if main.done() and not main.cancelled():
            main.result()  # re-raise a failure of ``aw`` itself
            return
        raise _PeerClosed("peer closed while the response was pending")

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class Upstream:
    """A loopback HTTP/1.1 server in its own thread, with server-side counters.

    Create with :meth:`start`; always :meth:`stop` (or use it as a context
    manager).  All public methods are thread-safe and may be called from any
    thread or event loop; the async helpers use :mod:`anyio` so they work under
    asyncio and trio.
    """

    def __init__(self, listeners: Sequence[Listener], hosts: Sequence[str]) -> None:
        """Internal: use :meth:`start`."""
        self.listeners: tuple[Listener, ...] = tuple(listeners)
        self.hosts: tuple[str, ...] = tuple(hosts)
        self._stats = _Stats(self.listeners)
        self._lock = threading.Lock()
        self._released: set[str] = set()
        self._release_everything = False
        self._credits: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self._log: list[RequestRecord] = []
        self._conn_ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name=f"upstream-{id(self):x}", daemon=True
        )
        # Loop-thread-only state:
        self._waiters: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._servers: list[asyncio.Server] = []
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        # Connections counted as open, and the response each is working on:
        # see _reap_closed_peers.
        self._live: dict[_Conn, tuple[str, int]] = {}
        self._responding: dict[_Conn, _Response] = {}
        self._stopped = False

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def start(
        cls,
        hosts: Sequence[str] = DEFAULT_HOSTS,
        ports_per_host: int = 1,
        ipv6: bool = False,
    ) -> Upstream:
        """Start a server listening on every host, ``ports_per_host`` times each.

        ``ipv6=True`` adds ``::1`` to ``hosts``.  Port *i* of every host uses the
        same port number whenever possible (falling back to separate ports).
        Raises :class:`IPv6UnavailableError` if ``::1`` is wanted but unusable.
        """
        hosts = list(dict.fromkeys(hosts))
        if ipv6 and "::1" not in hosts:
            hosts.append("::1")
        if not hosts or ports_per_host < 1:
            raise ValueError("need at least one host and one port per host")
        if any(":" in h for h in hosts) and not ipv6_available():
            raise IPv6UnavailableError("IPv6 loopback (::1) is not available")
        socks: list[socket.socket] = []
        try:
            for _ in range(ports_per_host):
                socks.extend(_bind_group(hosts))
        except BaseException:
            for s in socks:
                s.close()
            raise
        # Group listeners by host, in the order hosts were given.
        order = {h: i for i, h in enumerate(hosts)}
        pairs = sorted(
            ((_host_of(s), s) for s in socks),
            key=lambda p: order[p[0]],
        )
        listeners = [Listener(h, s.getsockname()[1]) for h, s in pairs]
        upstream = cls(listeners, hosts)
        upstream._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            upstream._serve([s for _, s in pairs]), upstream._loop
        )
        try:
            fut.result(timeout=_START_TIMEOUT)
        except BaseException:
            for s in socks:
                s.close()
            upstream.stop()
            raise
        return upstream

    def stop(self) -> None:
        """Close all listening and accepted sockets, cancel tasks, join the thread.

        Idempotent.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            try:
                fut.result(timeout=_STOP_TIMEOUT)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=_STOP_TIMEOUT)
        if self._thread.is_alive():
            raise RuntimeError("upstream thread did not stop")
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> Upstream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(self._loop)
                for task in pending:
                    task.cancel()
                if pending:
                    self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            finally:
                self._loop.close()

    async def _serve(self, socks: Sequence[socket.socket]) -> None:
        for sock in socks:
            listener = Listener(_host_of(sock), sock.getsockname()[1])

            def on_connect(
                reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter,
                listener: Listener = listener,
            ) -> None:
                task = asyncio.ensure_future(self._handle(listener, reader, writer))
                self._conn_tasks.add(task)
                task.add_done_callback(self._conn_tasks.discard)

            server = await asyncio.start_server(
                on_connect, sock=sock, backlog=_BACKLOG, limit=_READ_SIZE
            )
            self._servers.append(server)

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        tasks = list(self._conn_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in list(self._writers):  # pragma: no cover - defensive
            writer.transport.abort()
        for server in self._servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5.0)
        # Let transports run connection_lost (which closes the fds).
        for _ in range(3):
            await asyncio.sleep(0)

    # ------------------------------------------------------------------- URLs

    def _resolve_host(self, host: int | str) -> str:
        if isinstance(host, int):
            return self.hosts[host]
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host not in self.hosts:
            raise KeyError(f"upstream does not listen on {host!r}; hosts={self.hosts}")
        return host

    def ports(self, host: int | str = 0) -> list[int]:
        """All ports listened on for ``host`` (an index into hosts or an address)."""
        addr = self._resolve_host(host)
        return [li.port for li in self.listeners if li.host == addr]

    def port(self, host: int | str = 0, port_index: int = 0) -> int:
        """The ``port_index``-th port of ``host``."""
        return self.ports(host)[port_index]

    def url(self, host: int | str = 0, path: str = "/", *, port_index: int = 0) -> str:
        """``http://<host>:<port><path>`` for a host index or address."""
        addr = self._resolve_host(host)
        return format_url(addr, self.port(addr, port_index), path)

    def urls(self, host: int | str = 0, path: str = "/") -> list[str]:
        """One URL per listening port of ``host`` (for origin-partition tests)."""
        addr = self._resolve_host(host)
        return [format_url(addr, p, path) for p in self.ports(addr)]

    # ------------------------------------------------------------------ stats

    def stats(self, host: int | str = 0, port: int | None = None) -> Stats:
        """Snapshot for one address (all its ports), or one ``(address, port)``."""
        addr = self._resolve_host(host)
        try:
            return self._stats.get(addr, port)
        except KeyError:
            raise KeyError(f"no listener on {addr}:{port}") from None

    def total(self) -> Stats:
        """Snapshot across all addresses; peaks are true global concurrent peaks."""
        return self._stats.total()

    def all_stats(self) -> dict[str, Stats]:
        """Snapshot per address, keyed by address string."""
        return self._stats.all_hosts()

    def reset_peaks(self) -> None:
        """Set every peak to the current value of its gauge."""
        self._stats.reset_peaks()

    def reset_counters(self) -> None:
        """Zero ``accepted``/``requests``/``completed``, reset peaks, clear the log.

        ``in_flight`` and ``open_sockets`` are live gauges and are kept.
        """
        self._stats.reset()
        with self._lock:
            self._log.clear()

    def request_log(self) -> list[RequestRecord]:
        """Every request received so far (oldest first)."""
        with self._lock:
            return list(self._log)

    def describe(self) -> str:
        """Human-readable dump of all counters (used in timeout messages)."""
        lines = [f"total: {self.total()}"]
        lines += [f"  {h}: {s}" for h, s in self.all_stats().items()]
        with self._lock:
            held = {k: v for k, v in self._held.items() if v}
            credits = {k: v for k, v in self._credits.items() if v}
        lines.append(f"  held: {held}; release_one credits: {credits}")
        return "\n".join(lines)

    # ------------------------------------------------------------ hold/release

    def release(self, key: str) -> None:
        """Release all current *and future* ``/hold?key=<key>`` requests.

        Stays in effect until :meth:`rearm` is called for that key.
        """
        with self._lock:
            self._released.add(key)
        self._call_in_loop(self._wake, key)

    def release_one(self, key: str, n: int = 1) -> None:
        """Release exactly ``n`` ``/hold?key=<key>`` requests, oldest first.

        Requests already held are released in the order their heads were read;
        if fewer than ``n`` are held, the next ones to arrive pass straight
        through until ``n`` have been let go (or :meth:`rearm` is called).
        """
        if n < 1:
            raise ValueError("n must be at least 1")
        with self._lock:
            self._credits[key] = self._credits.get(key, 0) + n
        self._call_in_loop(self._wake, key)

    def rearm(self, key: str) -> None:
        """Make future ``/hold?key=<key>`` requests block again.

        Undoes :meth:`release` and unused :meth:`release_one` credits for
        ``key``; requests already released are not affected.
        """
        with self._lock:
            self._released.discard(key)
            self._credits.pop(key, None)

    def release_all(self) -> None:
        """Release every current and future hold, whatever its key.

        Stays in effect until :meth:`rearm_all`.
        """
        with self._lock:
            self._release_everything = True
        self._call_in_loop(self._wake_all)

    def rearm_all(self) -> None:
        """Undo :meth:`release_all`, every :meth:`release` and all credits."""
        with self._lock:
            self._release_everything = False
            self._released.clear()
            self._credits.clear()

    def held(self, key: str | None = None) -> int:
        """Number of requests currently held on ``key`` (or on any key)."""
        with self._lock:
            if key is None:
                return sum(self._held.values())
            return self._held.get(key, 0)

    def _take_pass(self, key: str) -> bool:
        """Whether a hold on ``key`` may pass now (consumes a credit); lock held."""
        if self._release_everything or key in self._released:
            return True
        credits = self._credits.get(key, 0)
        if credits:
            self._credits[key] = credits - 1
            return True
        return False

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed
            self._loop.call_soon_threadsafe(fn, *args)

    def _wake(self, key: str) -> None:
        queue = self._waiters.get(key)
        while queue:
            if queue[0].done():  # cancelled, its hold has not dequeued it yet
                queue.popleft()
                continue
            with self._lock:
                if not self._take_pass(key):
                    return
            queue.popleft().set_result(None)

    def _wake_all(self) -> None:
        for key in list(self._waiters):
            self._wake(key)

    async def _hold(self, conn: _Conn, key: str) -> None:
        # The pass check and the enqueueing happen in one loop step, and every
        # release updates the shared state *before* scheduling _wake in the
        # loop, so a release can never be missed.
        with self._lock:
            if self._take_pass(key):
                return
            self._held[key] = self._held.get(key, 0) + 1
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault(key, collections.deque())
        queue.append(waiter)
        try:
            await conn.unless_peer_closes(waiter)
        finally:
            with self._lock:
                self._held[key] -= 1
            if not waiter.done() or waiter.cancelled():
                with contextlib.suppress(ValueError):
                    queue.remove(waiter)

    # ----------------------------------------------------------------- waiting

    async def wait_until(
        self,
        predicate: Callable[[], object],
        # A timeout argument (rather than anyio.fail_after) keeps every call
        # site bounded by default and lets the error message carry the stats.
        timeout: float = 5.0,  # noqa: ASYNC109
        *,
        interval: float = 0.005,
        what: str | None = None,
    ) -> None:
        """Poll ``predicate`` (with :func:`anyio.sleep`) until it is truthy.

        Works under asyncio and trio.  Raises :class:`TimeoutError` with the
        current counters if it is still false after ``timeout`` seconds of real
        (monotonic) time.
        """
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                raise TimeoutError(self._timeout_message(predicate, timeout, what))
            await anyio.sleep(interval)

    def wait_until_sync(
        self,
        predicate: Callable[[], object],
        timeout: float = 5.0,
        *,
        interval: float = 0.005,
        what: str | None = None,
    ) -> None:
        """Blocking variant of :meth:`wait_until` (for sync code and threads)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                raise TimeoutError(self._timeout_message(predicate, timeout, what))
            time.sleep(interval)

    def _timeout_message(
        self, predicate: Callable[[], object], timeout: float, what: str | None
    ) -> str:
        if what is None:
            try:
                what = inspect.getsource(predicate).strip()
            except (OSError, TypeError):
                what = repr(predicate)
        return f"condition not met within {timeout}s: {what}\n{self.describe()}"

    # ----------------------------------------------------------------- serving

    async def _handle(
        self,
        listener: Listener,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        key = (listener.host, listener.port)
        conn = _Conn(next(self._conn_ids), listener, reader, writer)
        self._writers.add(writer)
        counted = False
        try:
            # Give already-pending EOFs of older connections a chance to be
            # processed first (see the module docstring).
            for _ in range(_ACCEPT_SETTLE_TURNS):
                await asyncio.sleep(0)
            if reader.at_eof():
                # The client gave up on this connection before we looked at
                # it (e.g. a cancelled connect): it was never usable, so it
                # counts as accepted but never as open.
                self._stats.conn_accepted_dead(key)
                return
            self._reap_closed_peers()
            self._stats.conn_opened(key)
            self._live[conn] = key
            counted = True
            await self._serve_connection(conn, key)
        except (_PeerClosed, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if not writer.transport.is_closing():
                writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()
            self._writers.discard(writer)
            if counted and self._live.pop(conn, None) is not None:
                self._stats.conn_closed(key)

    def _reap_closed_peers(self) -> None:
        """Count as closed, now, every connection whose client has closed it.

        A client that closes a socket and at once opens another (or sends a
        request on another) can be seen by this server in either order: the
        new arrival may be handled before the close. On loopback the close is
        already in the kernel by then, so poll every counted socket for a
        hang-up first, and settle the counters of those that hung up: the
        peaks then never count a socket or request the client had let go.
        """
        if not self._live:
            return
        poller = select.poll()
        by_fd: dict[int, _Conn] = {}
        gone: list[_Conn] = []
        for conn in self._live:
            sock = conn.writer.get_extra_info("socket")
            fd = -1 if sock is None else sock.fileno()
            if fd < 0 or conn.reader.at_eof() or conn.writer.transport.is_closing():
                # asyncio already saw the EOF (and may have closed the socket)
                # but the connection's task has not run since.
                gone.append(conn)
                continue
            by_fd[fd] = conn
            poller.register(fd, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        gone.extend(by_fd[fd] for fd, _ in poller.poll(0))
        for conn in gone:
            key = self._live.pop(conn)
            self._stats.conn_closed(key)
            response = self._responding.get(conn)
            if response is not None:
                response.abandon()

    async def _serve_connection(self, conn: _Conn, key: tuple[str, int]) -> None:
        while True:
            try:
                req = await conn.read_request()
            except _BadRequest as exc:
                await self._send_simple(conn, 400, str(exc).encode(), close=True)
                return
            if req is None:
                return
            self._reap_closed_peers()
            if conn not in self._live:
                # The client hung up after sending this request (it was
                # cancelled): nobody is waiting for the answer.
                return
            self._stats.request_started(key)
            with self._lock:
                self._log.append(
                    RequestRecord(
                        conn_id=conn.conn_id,
                        host=conn.listener.host,
                        port=conn.listener.port,
                        method=req.method,
                        target=req.target,
                        headers=tuple(req.headers),
                        started_at=time.monotonic(),
                    )
                )
            resp = _Response(conn, req, self._stats, key)
            self._responding[conn] = resp
            try:
                try:
                    await conn.read_body(req)
                    keep_alive = await self._dispatch(conn, req, resp)
                except _BadRequest as exc:
                    await resp.send(400, str(exc).encode(), close=True)
                    keep_alive = False
            finally:
                resp.abandon()
                self._responding.pop(conn, None)
            if not keep_alive or not req.wants_keep_alive:
                return

    async def _send_simple(self, conn: _Conn, status: int, body: bytes, close: bool) -> None:
        head = _head(conn, status, [], len(body), close=close)
        await conn.write(head + body)

    async def _dispatch(self, conn: _Conn, req: _Request, resp: _Response) -> bool:
        """Serve one request; return False if the connection must be closed."""
        split = urllib.parse.urlsplit(req.target)
        query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
        route = split.path.strip("/").split("/", 1)[0]
        close = _qbool(query, "close") or not req.wants_keep_alive

        if route in ("", "ok"):
            await resp.send(200, b"ok", close=close)
        elif route == "delay":
            await conn.unless_peer_closes(asyncio.sleep(_qint(query, "ms", 0) / 1000))
            await resp.send(200, b"ok", close=close)
        elif route == "hold":
            await self._hold(conn, query.get("key", ""))
            await resp.send(200, b"ok", close=close)
        elif route == "stall-headers":
            await conn.wait_for_eof()
            return False
        elif route == "stall-body":
            n = _qint(query, "bytes", 10)
            total = max(_qint(query, "length", 1000), n + 1)
            await conn.write(_head(conn, 200, [], total, close=False) + expected_bytes(n))
            await conn.wait_for_eof()
            return False
        elif route == "reset":
            sock = conn.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.writer.transport.abort()
            return False
        elif route == "close-after":
            await resp.send(
                200,
                b"ok",
                close=False,
                extra=[("Connection", "keep-alive"), ("Keep-Alive", "timeout=60")],
            )
            ms = _qint(query, "ms", 0)
            if ms:
                with contextlib.suppress(_PeerClosed):
                    await conn.unless_peer_closes(asyncio.sleep(ms / 1000))
            return False
        elif route == "close-now":
            await resp.send(200, b"ok", close=True)
            return False
        elif route == "garbage":
            await conn.write(b"NOT HTTP\r\n\r\n")
            return False
        elif route == "status":
            code = _qint(query, "code", 200)
            extra = []
            if "retry_after" in query:
                extra.append(("Retry-After", query["retry_after"]))
            await resp.send(code, f"status {code}".encode(), close=close, extra=extra)
        elif route == "bytes":
            await resp.send_streamed(
                n=_qint(query, "n", 100_000),
                chunk=max(1, _qint(query, "chunk", 8192)),
                delay=_qint(query, "delay_ms", 0) / 1000,
                close=close,
            )
        elif route == "echo":
            info = {
                "method": req.method,
                "target": req.target,
                "path": split.path,
                "query": split.query,
                "http_version": req.version,
                "headers": [[k, v] for k, v in req.headers],
                "body_length": len(req.body),
                "body_sha256": hashlib.sha256(req.body).hexdigest(),
                "server": {"addr": conn.listener.host, "port": conn.listener.port},
                "client": {"addr": conn.peer[0], "port": conn.peer[1]},
                "conn_id": conn.conn_id,
            }
            body = json.dumps(info).encode()
            await resp.send(200, body, close=close, extra=[("Content-Type", "application/json")])
        elif route == "redirect":
            code = _qint(query, "code", 302)
            to = query.get("to", "/")
            await resp.send(code, b"", close=close, extra=[("Location", to)])
        else:
            await resp.send(404, b"not found", close=close)
        return not close


class _Response:
    """Writes one response, updating in_flight/completed before the final write."""

    def __init__(self, conn: _Conn, req: _Request, stats: _Stats, key: tuple[str, int]) -> None:
        self.conn = conn
        self.req = req
        self._stats = stats
        self._key = key
        self._finished = False

    def _finish(self, completed: bool) -> None:
        if not self._finished:
            self._finished = True
            self._stats.request_finished(self._key, completed=completed)

    def abandon(self) -> None:
        """Mark the request as no longer in flight (no-op if already finished)."""
        self._finish(completed=False)

    def _no_body(self, status: int) -> bool:
        return self.req.method == "HEAD" or status in (204, 304) or status < 200

    async def send(
        self,
        status: int,
        body: bytes,
        *,
        close: bool,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        head = _head(self.conn, status, extra, len(body), close=close)
        if self._no_body(status):
            body = b""
        self._finish(completed=True)
        await self.conn.write(head + body)

    async def send_streamed(self, n: int, chunk: int, delay: float, close: bool) -> None:
        head = _head(self.conn, 200, [], n, close=close)
        body = b"" if self._no_body(200) else expected_bytes(n)
        if not body:
            self._finish(completed=True)
            await self.conn.write(head)
            return
        await self.conn.write(head)
        for start in range(0, len(body), chunk):
            if start and delay:
                await self.conn.unless_peer_closes(asyncio.sleep(delay))
            piece = body[start : start + chunk]
            if start + chunk >= len(body):
                self._finish(completed=True)
            await self.conn.write(piece)


def _head(
    conn: _Conn,
    status: int,
    extra: Sequence[tuple[str, str]],
    content_length: int,
    *,
    close: bool,
) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    headers: list[tuple[str, str]] = [
        ("Server", "hostpool-test-upstream"),
        ("X-Upstream-Addr", f"{conn.listener.host}:{conn.listener.port}"),
        ("X-Upstream-Conn", str(conn.conn_id)),
        ("Content-Length", str(content_length)),
    ]
    if close:
        headers.append(("Connection", "close"))
    headers.extend(extra)
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _host_of(sock: socket.socket) -> str:
    return str(sock.getsockname()[0])


def _qint(query: dict[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise _BadRequest(f"query parameter {name}={raw!r} is not an integer") from None


def _qbool(query: dict[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("1", "true", "yes")

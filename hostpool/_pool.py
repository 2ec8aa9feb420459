"""Partition pools of httpcore connections, and the socket ledger across them.

Admission (``_admission.py``) already bounds the requests in flight per
partition and across the router, so a partition pool never queues: it hands
out the most recently used idle connection for the origin, or opens a new
one. Both are O(1) per request (httpcore 1.0.9's own pool rescans every
queued request against every connection on each change).

The :class:`SocketLedger` is shared by every partition pool of a router. It
keeps G2, the socket ceiling:

    open sockets (active + idle + connecting) <= max_connections
    idle sockets <= max_keepalive overall, <= the quota's keepalive per partition

Why the ceiling holds: a socket is counted from the moment we decide to open
it until the moment we decide to close it. Every active socket carries at
least one admitted request, and admission keeps requests in flight <=
max_connections, so when a new socket is needed at the ceiling at least one
idle socket exists, and the least recently used one is closed first. A
connection goes back to the pool (or is closed) *before* its admission slot
is released, so the next admitted request always sees the ledger up to date.

Connections are created by the httpcore pool that ``httpx.AsyncHTTPTransport``
builds from the router's arguments (``create_connection``), so TLS settings,
HTTP/2, proxies, retries and socket options are exactly httpx's; only the
pooling is ours.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Awaitable, Iterable, Mapping, MutableMapping
from typing import Any, Protocol, TypeVar, cast

import anyio
import httpcore
import httpx
from httpcore import AsyncConnectionInterface, Origin

from ._compat import (
    httpcore_request,
    httpx_error,
    keepalive_expiry,
    speaks_http1_only,
    tune_direct_connection,
)
from ._errors import RouterClosed
from ._ledger import SocketLedger
from ._scheduler import Ticket
from ._stream import AsyncioBackend

try:  # the fast HTTP/1.1 path needs httptools (a dependency; absent, httpcore's h11)
    from ._http11 import FastHTTP11Connection
except ImportError:  # pragma: no cover - httptools has no wheel for the platform
    FastHTTP11Connection = None  # type: ignore[assignment,misc]

# What ``send`` recognises (the name above is what checkout builds, and may
# be switched off: benchmarks' ``hostpool-h11``).
_FastConnection: type | None = FastHTTP11Connection

__all__ = ["PartitionPool", "PooledBody", "ResponseBody", "Slots", "close_connections"]

logger = logging.getLogger("hostpool")

#: The schemes a pool connects to, with their default ports (httpcore's).
_DEFAULT_PORTS = {b"http": 80, b"https": 443, b"ws": 80, b"wss": 443}

_T = TypeVar("_T")

# httpcore's Origin is not hashable; pools index connections by this tuple.
_OriginKey = tuple[bytes, bytes, int]


#: Longest time closing connections may take (a TLS close_notify to a peer that
#: stopped reading could otherwise block a shielded close for ever).
_CLOSE_TIMEOUT = 5.0


async def close_connections(conns: Iterable[AsyncConnectionInterface]) -> None:
    """Close every connection, shielded: a cancelled caller must not leak sockets.

    anyio's shield does not stop asyncio's own ``Task.cancel()`` (what
    ``asyncio.timeout()`` and ``wait_for`` use): such a cancellation is held
    until every connection is closed, then raised.
    """
    cancelled: BaseException | None = None
    with anyio.CancelScope(shield=True, deadline=anyio.current_time() + _CLOSE_TIMEOUT):
        for conn in conns:
            try:
                await conn.aclose()
            except Exception:  # pragma: no cover - closing is best effort
                logger.debug("error closing %r", conn, exc_info=True)
            except BaseException as exc:  # cancelled from outside the shield
                cancelled = cancelled or exc
    if cancelled is not None:
        raise cancelled


class PartitionPool:
    """The connections of one partition.

    ``send`` takes an ``httpx.Request`` and returns an ``httpx.Response``,
    as ``httpx.AsyncHTTPTransport`` does over its httpcore pool;
    ``handle_async_request`` is the same behind httpcore's pool interface.
    ``aclose`` and the async context manager close every connection.
    """

    def __init__(
        self,
        key: str,
        factory: httpcore.AsyncConnectionPool,
        ledger: SocketLedger,
        keepalive: int,
    ) -> None:
        self.key = key
        self._factory = factory
        self._ledger = ledger
        self._keepalive = keepalive
        # httpcore's own setting (httpx's limits.keepalive_expiry), for the
        # ledger's cheap clock-based sweep of idle sockets.
        expiry = keepalive_expiry(factory)
        self._expiry_setting = expiry
        self._expiry = math.inf if expiry is None else expiry
        # Idle connections per origin, most recently used last: the stacks a
        # checkout pops. The ledger's table (``SocketLedger.idle``) is the
        # one record of idle connections; these change only with it.
        self._idle: dict[_OriginKey, list[AsyncConnectionInterface]] = {}
        self._idle_count = 0
        # Connections carrying requests, with their number of streams.
        self._active: dict[AsyncConnectionInterface, int] = {}
        # Connections in use that can take another stream: HTTP/2 ones, and
        # new ones that may turn out HTTP/2 (httpcore sends concurrent first
        # requests to a connecting HTTP/2-capable connection the same way).
        self._shared: dict[_OriginKey, list[AsyncConnectionInterface]] = {}
        # Connections known to speak HTTP/2 (weak: closing one forgets it).
        self._multiplexed: weakref.WeakSet[AsyncConnectionInterface] = weakref.WeakSet()
        # Connections to close when their last stream ends.
        self._retiring: weakref.WeakSet[AsyncConnectionInterface] = weakref.WeakSet()
        # Cancel scopes of requests between checkout and response headers.
        self._sending: set[anyio.CancelScope] = set()
        self.opened = 0
        self.evictions = 0
        self.closed = False

    # -- figures -------------------------------------------------------------

    @property
    def sockets_idle(self) -> int:
        """Idle sockets of this partition."""
        return self._idle_count

    @property
    def sockets_open(self) -> int:
        """Open sockets of this partition, active and idle."""
        return self._idle_count + len(self._active)

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return (
            f"<PartitionPool {self.key!r}{state} [{len(self._active)} active, "
            f"{self._idle_count} idle | opened {self.opened}, evicted {self.evictions}]>"
        )

    # -- the request path ----------------------------------------------------

    async def send(
        self, request: httpx.Request, slots: Slots | None, ticket: Ticket | None
    ) -> httpx.Response:
        """Send ``request``; its body, once closed, gives back the connection, then the slot.

        What ``httpx.AsyncHTTPTransport.handle_async_request`` does over its
        own pool, over this one: httpcore's exceptions come out as httpx's,
        and so do those of the response body. On hostpool's HTTP/1.1
        connection the exchange takes the ``httpx.Request`` as it is (no
        ``httpcore.Request``, no ``httpcore.Response``); any other connection
        gets httpx's conversion (``_compat.httpcore_request``).

        ``slots`` and ``ticket`` are the admission slot the request holds (None
        outside a router): the body releases it after the connection is back.
        """
        url = request.url
        try:
            method = request.method.encode("ascii")
        except UnicodeEncodeError:
            # What httpcore.Request says (httpx passes it the str).
            raise TypeError("method strings may not include unicode characters.") from None
        try:
            conn, key, status, headers, content, extensions = await self._exchange(
                url.raw_scheme,
                url.raw_host,
                url.port,
                method,
                url.raw_path,
                request.headers.raw,
                request.stream,
                request.extensions,
                request,
            )
        except Exception as exc:
            mapped = httpx_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        return httpx.Response(
            status,
            headers=headers,
            stream=PooledBody(content, slots, ticket, self, conn, key),
            extensions=extensions,
        )

    async def handle_async_request(
        self,
        request: httpcore.Request,
        slots: Slots | None = None,
        ticket: Ticket | None = None,
    ) -> httpcore.Response:
        """:meth:`send` behind httpcore's pool interface: httpcore's request, response, errors.

        For ``httpx.AsyncHTTPTransport``'s own ``handle_async_request`` when
        a tracer wraps it (``_compat.is_traced``), so that the tracer sees
        every request as with ``httpx.AsyncClient``.
        """
        url = request.url
        conn, key, status, headers, content, extensions = await self._exchange(
            url.scheme,
            url.host,
            url.port,
            request.method,
            url.target,
            request.headers,
            request.stream,
            request.extensions,
            request,
        )
        return httpcore.Response(
            status,
            headers=headers,
            content=ResponseBody(content, slots, ticket, self, conn, key),
            extensions=extensions,
        )

    async def _exchange(
        self,
        scheme: bytes,
        host: bytes,
        port: int | None,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        content: Any,
        extensions: Mapping[str, Any],
        request: httpx.Request | httpcore.Request,
    ) -> tuple[
        AsyncConnectionInterface,
        _OriginKey,
        int,
        list[tuple[bytes, bytes]],
        Any,
        MutableMapping[str, Any],
    ]:
        """Send on an idle or new connection; return it, its origin and the response's parts.

        The request comes apart (httpx's or httpcore's: ``request`` is the
        whole, converted to an ``httpcore.Request`` only when a connection
        needs one). Raises httpcore's exceptions, and ``RouterClosed``. The caller wraps the body
        so that closing it gives the connection back (``_finish``).
        """
        if scheme not in _DEFAULT_PORTS:
            if not scheme:
                raise httpcore.UnsupportedProtocol(
                    "Request URL is missing an 'http://' or 'https://' protocol."
                )
            raise httpcore.UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{scheme.decode()}://'."
            )
        if self.closed:
            raise RouterClosed("the HostRouter has been closed")
        key: _OriginKey = (scheme, host, port or _DEFAULT_PORTS[scheme])
        fast = _fast_path_for(headers, extensions)
        core_request = request if isinstance(request, httpcore.Request) else None
        while True:
            conn, shareable, new = await self._checkout(key, fast)
            self._active[conn] = self._active.get(conn, 0) + 1
            if self._closed_meanwhile():
                # aclose() ran while the checkout made room: do not connect.
                await self._finish(conn, key)
                raise RouterClosed("the HostRouter was closed while this request was sent")
            if shareable:
                self._share(conn, key)
            try:
                if type(conn) is _FastConnection:
                    if new and core_request is None:
                        core_request = httpcore_request(cast(httpx.Request, request))
                    exchange = cast("FastHTTP11Connection", conn).exchange(
                        method,
                        target,
                        headers,
                        content,
                        extensions.get("timeout", {}),
                        core_request,
                    )
                    parts = await (self._send_on_new(exchange) if new else exchange)
                    return (conn, key, *parts)
                if core_request is None:
                    core_request = httpcore_request(cast(httpx.Request, request))
                sent = conn.handle_async_request(core_request)
                response = await (self._send_on_new(sent) if new else sent)
            except httpcore.ConnectionNotAvailable:
                # The connection was taken or closed under us (HTTP/2 stream
                # limits, a server that closed it): use another, as httpcore does.
                await self._finish(conn, key)
                continue
            except BaseException as exc:
                # A request that failed or was cancelled mid-exchange may leave
                # the connection in a state httpcore does not notice (an HTTP/2
                # write interrupted by cancellation still looks usable): never
                # hand it to another request; close it once its streams end.
                self._retiring.add(conn)
                self._unshare(conn, key)
                await self._finish(conn, key)
                if isinstance(exc, Exception) and self._closed_meanwhile():
                    # The socket was closed under it by aclose(): say so.
                    # (Cancellation is never turned into an error.)
                    raise RouterClosed(
                        "the HostRouter was closed while this request was sent"
                    ) from exc
                raise
            break
        if response.extensions.get("http_version") == b"HTTP/2":
            self._multiplexed.add(conn)
            self._share(conn, key)
        elif shareable:
            self._unshare(conn, key)
        return conn, key, response.status, response.headers, response.stream, response.extensions

    def _closed_meanwhile(self) -> bool:
        # A method, not the attribute: aclose() may have run during the await.
        return self.closed

    async def _send_on_new(self, sending: Awaitable[_T]) -> _T:
        """Await ``sending``, the exchange on a connection still to be opened.

        While it connects there is no socket that aclose() could close to
        stop it, so it runs in a cancel scope that aclose() cancels. (Once
        connected, closing the socket is enough: reused connections skip this.)
        """
        scope = anyio.CancelScope()
        self._sending.add(scope)
        try:
            with scope:
                result = await sending
        finally:
            self._sending.discard(scope)
        if scope.cancelled_caught:
            raise RouterClosed("the HostRouter was closed while this request was sent")
        return result

    def _share(self, conn: AsyncConnectionInterface, key: _OriginKey) -> None:
        if conn in self._retiring:
            return  # a failed exchange left it suspect: no new streams on it
        shared = self._shared.setdefault(key, [])
        if conn not in shared:
            shared.append(conn)

    def _unshare(self, conn: AsyncConnectionInterface, key: _OriginKey) -> None:
        shared = self._shared.get(key)
        if shared and conn in shared:
            shared.remove(conn)
            if not shared:
                del self._shared[key]

    async def _checkout(
        self, key: _OriginKey, fast: bool = True
    ) -> tuple[AsyncConnectionInterface, bool, bool]:
        """Return a connection, whether others may share it now, and whether it is new.

        ``fast``: the request may use hostpool's own HTTP/1.1 connection;
        when False (an upgrade, a trace) it gets a new httpcore connection.
        """
        shared = self._shared.get(key)
        if shared:
            for conn in shared:
                if conn.is_available():
                    return conn, False, False
        ledger = self._ledger
        if ledger.retired:
            retired = ledger.take_retired()
            try:
                await close_connections(retired)
            finally:
                ledger.closed(len(retired))
        idle = self._idle.get(key) if fast else None
        discard: list[AsyncConnectionInterface] = []
        chosen: tuple[AsyncConnectionInterface, bool, bool] | None = None
        try:
            while idle:
                conn = idle.pop()
                self._idle_count -= 1
                self._ledger.unpark(conn)
                if conn.is_available() and not conn.has_expired():
                    chosen = (conn, conn in self._multiplexed, False)
                    break
                # Expired, or the server closed it while idle: the next
                # request goes to a fresh connection, as httpx does.
                discard.append(conn)
                self._ledger.closed()
            if chosen is None:
                discard.extend(self._ledger.reserve())
                self.opened += 1
                origin = Origin(*key)
                try:
                    conn = self._factory.create_connection(origin)
                except BaseException:
                    self._ledger.closed()
                    raise
                tune_direct_connection(conn, AsyncioBackend)
                if fast and FastHTTP11Connection is not None and speaks_http1_only(conn):
                    conn = FastHTTP11Connection(conn, origin, self._expiry_setting)
                # True when HTTP/2 is possible (https, http2=True): let concurrent
                # requests wait on this connection rather than open their own.
                chosen = (conn, conn.is_available(), True)
        finally:
            if idle is not None and not idle:
                self._idle.pop(key, None)
            if discard:
                try:
                    await close_connections(discard)
                except BaseException:
                    # Cancelled (asyncio's own Task.cancel()) while closing
                    # what made room: the chosen connection, counted, is not
                    # handed out. Close and uncount it.
                    if chosen is not None:
                        self._ledger.closed()
                        await close_connections([chosen[0]])
                    raise
        return chosen

    async def _finish(self, conn: AsyncConnectionInterface, origin: _OriginKey) -> None:
        """One stream of ``conn`` ended: keep the connection idle, or close it."""
        streams = self._active[conn] - 1
        if streams:
            self._active[conn] = streams
            return
        del self._active[conn]
        self._unshare(conn, origin)
        closing: list[AsyncConnectionInterface] = []
        reusable = conn not in self._retiring
        # No has_expired() here: it polls the socket, and a connection that
        # just finished a response is fresh. Checkout checks before reuse.
        if reusable and not self.closed and conn.is_idle() and conn.is_available():
            self._idle.setdefault(origin, []).append(conn)
            self._idle_count += 1
            now = time.monotonic()
            closing.extend(self._ledger.park(conn, self, now, now + self._expiry, origin))
            while self._idle_count > self._keepalive:
                old, old_origin = self._least_recently_used()
                self._ledger.unpark(old)
                self.evicted(old, old_origin)
                self._ledger.closed()
                closing.append(old)
        else:
            self._ledger.closed()
            closing.append(conn)
        if closing:
            await close_connections(closing)

    def _least_recently_used(self) -> tuple[AsyncConnectionInterface, _OriginKey]:
        """The partition's idle connection parked longest ago, and its origin.

        The oldest of each origin's stack is its first; among those, the one
        parked first. O(origins of the partition), only past the cap.
        """
        idle = self._ledger.idle
        origin = min(self._idle, key=lambda o: idle[self._idle[o][0]].since)
        return self._idle[origin][0], origin

    def evicted(self, conn: AsyncConnectionInterface, origin: object) -> None:
        """Forget an idle connection that the ledger or the keepalive cap is closing."""
        key: Any = origin
        idle = self._idle[key]
        idle.remove(conn)
        if not idle:
            del self._idle[key]
        self._idle_count -= 1
        self.evictions += 1
        self._ledger.evictions += 1

    # -- closing -------------------------------------------------------------

    def retire(self) -> None:
        """Hand every idle connection to the ledger for closing (the partition is dropped).

        They stay counted until a later request (of any partition) or
        ``aclose()`` closes them: see :meth:`SocketLedger.retire`.
        """
        self._ledger.retire(self._take_idle())

    def _take_idle(self) -> list[AsyncConnectionInterface]:
        """Forget every idle connection (still counted in the ledger) and return them."""
        idle = self._ledger.idle
        # In the order they went idle, as the ledger has them.
        conns = sorted(
            (conn for stack in self._idle.values() for conn in stack),
            key=lambda conn: idle[conn].since,
        )
        for conn in conns:
            self._ledger.unpark(conn)
        self._idle.clear()
        self._idle_count = 0
        return conns

    async def aclose(self) -> None:
        """Close every connection, idle and active; in-flight requests fail."""
        self.closed = True
        for scope in self._sending:
            scope.cancel()
        idle = self._take_idle()
        try:
            await close_connections([*idle, *self._active])
        finally:
            # Active connections are uncounted when their streams finish.
            self._ledger.closed(len(idle))

    async def __aenter__(self) -> PartitionPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _fast_path_for(headers: list[tuple[bytes, bytes]], extensions: Mapping[str, Any]) -> bool:
    """Whether hostpool's HTTP/1.1 connection may carry a request with these.

    Not for a protocol upgrade (the connection becomes something else) nor
    when the caller traces httpcore's HTTP/1.1 events (``trace``): those
    keep httpcore's own connection.
    """
    if "trace" in extensions:
        return False
    return all(name.lower() != b"upgrade" for name, _ in headers)


class Slots(Protocol):
    """Where admission slots go back: the admission (``_admission.Admission``)."""

    open_bodies: set[Any]

    def release(self, ticket: Ticket, *, failed: bool = False) -> None:
        """Return a granted ticket's slot."""


class ResponseBody(httpx.AsyncByteStream):
    """The one response body wrapper: closed once, it gives back the connection, then the slot.

    Invariant (G2, G7): the connection is back in its pool (or closed)
    *before* the slot is released, so the next admitted request sees the
    socket ledger current; and the slot is released exactly once, whether
    the body is read to the end, closed early, fails while being read, or is
    closed by the router's ``aclose()`` (it is in ``slots.open_bodies`` until
    closed). Either part may be absent: a user's own transport has no
    pooled connection of ours, a pool used on its own holds no slot.
    """

    __slots__ = ("_chunks", "_conn", "_done", "_origin", "_pool", "_slots", "_stream", "_ticket")

    def __init__(
        self,
        stream: Any,
        slots: Slots | None,
        ticket: Ticket | None,
        pool: PartitionPool | None = None,
        conn: AsyncConnectionInterface | None = None,
        origin: _OriginKey | None = None,
    ) -> None:
        self._stream = stream
        self._slots = slots
        self._ticket = ticket
        self._pool = pool
        self._conn = conn
        self._origin = origin
        self._done = False
        if slots is not None:
            slots.open_bodies.add(self)

    def __aiter__(self) -> ResponseBody:
        # An iterator, not an async generator (see _http11._Body): iterated
        # once, as httpx iterates a response stream.
        self._chunks = self._stream.__aiter__()
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk: bytes = await self._chunks.__anext__()
        except StopAsyncIteration:
            raise
        except BaseException as exc:
            await self._close(failed=True)
            mapped = self._translate(exc)
            if mapped is None:
                raise
            raise mapped from exc
        return chunk

    @staticmethod
    def _translate(exc: BaseException) -> BaseException | None:
        """The exception to raise instead of ``exc`` from the body (None: ``exc`` itself)."""
        return None

    async def aclose(self) -> None:
        await self._close(failed=False)

    async def _close(self, *, failed: bool) -> None:
        if self._done:
            return
        self._done = True
        slots = self._slots
        if slots is not None:
            slots.open_bodies.discard(self)
        try:
            if hasattr(self._stream, "aclose"):
                await self._stream.aclose()
        finally:
            try:
                pool = self._pool
                if pool is not None and self._conn is not None and self._origin is not None:
                    # Runs even if the close above was cancelled: _finish sees
                    # the connection is not idle then, and closes it (shielded).
                    await pool._finish(self._conn, self._origin)
            finally:
                if slots is not None and self._ticket is not None:
                    slots.release(self._ticket, failed=failed)


class PooledBody(ResponseBody):
    """The body of a response from a partition pool: httpcore's errors come out as httpx's.

    (httpx's transport wraps every body in an async generator for this; a
    ``try`` costs nothing until something is raised.)
    """

    __slots__ = ()

    _translate = staticmethod(httpx_error)

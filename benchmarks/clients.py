"""The clients under test, behind one tiny interface: ``await client.get(url)``.

- ``hostpool``: :class:`hostpool.HostRouter`;
- ``httpx``: plain ``httpx.AsyncClient`` with the same ``limits``;
- ``aiohttp``: ``aiohttp.ClientSession`` over ``TCPConnector(limit=..., limit_per_host=...)``;
- ``bare``: a bare asyncio keep-alive client (one ``asyncio.Protocol`` per
  connection, no limits, no parsing beyond ``Content-Length``): the most the
  upstream can serve, to show it is not the bottleneck;
- ``hostpool-h11`` (the throughput and large-body scenarios only): a
  ``HostRouter`` with hostpool's own HTTP/1.1 connection turned off
  (``hostpool._pool.FastHTTP11Connection = None`` while the client lives),
  so its connections speak httpcore's h11 as before that fast path: the
  "before" column, measured in the same run.

Each ``get`` reads the whole body and returns the status code;
``read_streamed`` reads a body in chunks as they come (``stream`` +
``aiter_bytes``; aiohttp's ``iter_chunked``) and returns its length.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import httpx

import hostpool

__all__ = [
    "Client",
    "ClientFactory",
    "Limits",
    "aiohttp_available",
    "make_aiohttp",
    "make_bare",
    "make_hostpool",
    "make_hostpool_h11",
    "make_httpx",
]

_TIMEOUT = 60.0
#: aiohttp's ``iter_chunked`` size; hostpool reads 64 KiB at a time too.
CHUNK = 64 * 1024


class Client(Protocol):
    """What a scenario needs from a client."""

    name: str

    async def get(self, url: str) -> int: ...

    async def read_streamed(self, url: str) -> int:
        """GET ``url``, read the body chunk by chunk as it comes; return its length."""
        ...

    async def aclose(self) -> None: ...

    def idle_sockets(self) -> int | None:
        """Idle keep-alive sockets the client holds (best effort; None if unknown)."""
        ...


ClientFactory = Callable[[], Client]


@dataclasses.dataclass(frozen=True)
class Limits:
    """Equal limits for every client: a total socket budget and a per-host cap."""

    total: int
    per_host: int
    keepalive: int | None = None
    partition_by: hostpool.PartitionBy = "host"
    #: Seconds an idle socket is kept (None: each client's default, 5 s for
    #: httpx and hostpool, 15 s for aiohttp).
    keepalive_expiry: float | None = None

    @property
    def idle(self) -> int:
        return self.total if self.keepalive is None else self.keepalive

    def httpx_limits(self) -> httpx.Limits:
        return httpx.Limits(
            max_connections=self.total,
            max_keepalive_connections=self.idle,
            keepalive_expiry=5.0 if self.keepalive_expiry is None else self.keepalive_expiry,
        )


# -- httpx and hostpool ------------------------------------------------------------


class _HttpxClient:
    def __init__(self, name: str, client: httpx.AsyncClient) -> None:
        self.name = name
        self.client = client

    async def get(self, url: str) -> int:
        response = await self.client.get(url)
        return response.status_code

    async def read_streamed(self, url: str) -> int:
        size = 0
        async with self.client.stream("GET", url) as response:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
        return size

    async def aclose(self) -> None:
        await self.client.aclose()

    def idle_sockets(self) -> int | None:
        stats = getattr(self.client, "stats", None)
        if callable(stats):
            return int(stats().sockets_idle)
        try:
            pool = self.client._transport._pool  # type: ignore[attr-defined]
            return sum(1 for conn in pool.connections if conn.is_idle())
        except AttributeError:
            return None


def make_httpx(limits: Limits, **kwargs: Any) -> _HttpxClient:
    """A plain ``httpx.AsyncClient``: one pool of ``limits.total`` sockets for all hosts."""
    client = httpx.AsyncClient(
        limits=limits.httpx_limits(),
        timeout=_TIMEOUT,
        **kwargs,
    )
    return _HttpxClient("httpx", client)


def make_hostpool(limits: Limits, **kwargs: Any) -> _HttpxClient:
    """A ``HostRouter``: the same budget, ``limits.per_host`` per partition."""
    router = hostpool.HostRouter(
        limits=limits.httpx_limits(),
        default_quota=hostpool.Quota(max_connections=limits.per_host),
        partition_by=limits.partition_by,
        timeout=_TIMEOUT,
        **kwargs,
    )
    return _HttpxClient("hostpool", router)


def _pool_module() -> Any:
    from hostpool import _pool

    return _pool


def fast_path_switch_available() -> bool:
    """Tell whether this hostpool has the fast HTTP/1.1 path to turn off (``hostpool-h11``)."""
    return getattr(_pool_module(), "FastHTTP11Connection", None) is not None


class _H11HostRouter(_HttpxClient):
    """A HostRouter whose connections keep httpcore's h11 (the fast path off while it lives).

    The switch is a module global read when a connection is created, so it
    stays off from this client's creation to its ``aclose``; trials run one
    at a time, so no other client sees it.
    """

    def __init__(self, limits: Limits, **kwargs: Any) -> None:
        pool = _pool_module()
        self._saved = pool.FastHTTP11Connection
        pool.FastHTTP11Connection = None
        try:
            router = make_hostpool(limits, **kwargs).client
        except BaseException:
            pool.FastHTTP11Connection = self._saved
            raise
        super().__init__("hostpool-h11", router)

    async def aclose(self) -> None:
        try:
            await self.client.aclose()
        finally:
            _pool_module().FastHTTP11Connection = self._saved


def make_hostpool_h11(limits: Limits, **kwargs: Any) -> _HttpxClient:
    """A ``HostRouter`` on httpcore's h11 connections: hostpool before its fast HTTP/1.1 path."""
    return _H11HostRouter(limits, **kwargs)


# -- aiohttp ---------------------------------------------------------------------------


def aiohttp_available() -> bool:
    """Tell whether aiohttp (from the ``bench`` extra) is installed."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


class _AiohttpClient:
    name = "aiohttp"

    def __init__(self, limits: Limits) -> None:
        import aiohttp

        expiry = 15.0 if limits.keepalive_expiry is None else limits.keepalive_expiry
        connector = aiohttp.TCPConnector(
            limit=limits.total, limit_per_host=limits.per_host, keepalive_timeout=expiry
        )
        self.connector = connector
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=_TIMEOUT)
        )

    async def get(self, url: str) -> int:
        async with self.session.get(url) as response:
            await response.read()
            return response.status

    async def read_streamed(self, url: str) -> int:
        size = 0
        async with self.session.get(url) as response:
            async for chunk in response.content.iter_chunked(CHUNK):
                size += len(chunk)
        return size

    async def aclose(self) -> None:
        await self.session.close()

    def idle_sockets(self) -> int | None:
        conns = getattr(self.connector, "_conns", None)
        return None if conns is None else sum(len(v) for v in conns.values())


def make_aiohttp(limits: Limits) -> _AiohttpClient:
    """An ``aiohttp.ClientSession`` with ``TCPConnector(limit=total, limit_per_host=per_host)``."""
    return _AiohttpClient(limits)


# -- the bare asyncio keep-alive client ----------------------------------------------------


class _BareConnection(asyncio.Protocol):
    """One keep-alive connection; one request at a time.

    The head is parsed once complete; the body is counted as it arrives and
    dropped (a 10 MiB body is never joined).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.waiter: asyncio.Future[int] | None = None
        self.lost = False
        self.status = 0
        self.left = -1  # body bytes still to come; -1 while reading a head
        self.length = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not a subclass of asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        if self.left >= 0:  # in a body
            if len(data) < self.left:
                self.left -= len(data)
                return
            self.buf = data[self.left :]
            self._done()
            return
        self.buf = self.buf + data if self.buf else data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].lower()
        at = head.find(b"\r\ncontent-length:")
        length = 0
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else None])
        self.status = int(head[9:12])
        self.length = length
        have = len(self.buf) - end - 4
        if have < length:
            self.left = length - have
            self.buf = b""
            return
        self.buf = self.buf[end + 4 + length :]
        self._done()

    def _done(self) -> None:
        self.left = -1
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self.status)

    def send(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        waiter = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        self.transport.write(request)
        return waiter


class _BareClient:
    name = "bare"

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_BareConnection]] = {}
        self._targets: dict[str, tuple[tuple[str, int], bytes]] = {}
        self._all: list[_BareConnection] = []

    def _target(self, url: str) -> tuple[tuple[str, int], bytes]:
        hit = self._targets.get(url)
        if hit is None:
            parts = urlsplit(url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
            hit = self._targets[url] = ((host, port), request)
        return hit

    async def get(self, url: str) -> int:
        status, _ = await self._exchange(url)
        return status

    async def read_streamed(self, url: str) -> int:
        _, length = await self._exchange(url)
        return length

    async def _exchange(self, url: str) -> tuple[int, int]:
        origin, request = self._target(url)
        idle = self._idle.get(origin)
        conn = idle.pop() if idle else None
        if conn is None or conn.lost:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(_BareConnection, *origin)
            self._all.append(conn)
        status = await conn.send(request)
        self._idle.setdefault(origin, []).append(conn)
        return status, conn.length

    def idle_sockets(self) -> int | None:
        return sum(len(v) for v in self._idle.values())

    async def aclose(self) -> None:
        for conn in self._all:
            if conn.transport is not None:
                conn.transport.close()
        self._all.clear()
        self._idle.clear()
        await asyncio.sleep(0)


def make_bare() -> _BareClient:
    """The bare asyncio keep-alive client (the upstream's ceiling)."""
    return _BareClient()

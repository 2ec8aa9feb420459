"""httpcore's network stream, straight on an asyncio Protocol.

Under asyncio, httpcore talks to sockets through anyio: every read and write
opens a ``fail_after`` cancel scope and a resource guard, every write yields
to the event loop once before sending, and a read that finds nothing buffered
resumes the transport's reading, waits, and pauses it again (two ``epoll_ctl``
calls). That layer was about a fifth of a request's CPU in cProfile.
:class:`AsyncioStream`
implements the same ``httpcore.AsyncNetworkStream`` contract on an
``asyncio.Protocol`` that reads eagerly into a bounded buffer, waits on a bare
future, and arms a timer only when it has to wait.

Used for direct connections under asyncio only: under trio, and for proxied
connections (HTTPS proxies need TLS inside TLS, which asyncio only supports
from Python 3.11), the pool keeps httpcore's own backend.

The contract kept, as httpcore's anyio backend keeps it, with one
difference: asyncio caps a TLS handshake at 60 s (``ssl_handshake_timeout``)
even when ``timeout`` is None or longer, ending in ``ConnectError``.

- ``read`` returns at most ``max_bytes``; ``b""`` once the peer closed
  cleanly; raises ``ReadTimeout`` when nothing arrives within ``timeout``
  and ``ReadError`` when the connection broke or was closed by us.
- ``write`` sends everything or raises ``WriteError``; it waits (bounded by
  ``timeout``: ``WriteTimeout``) only while the transport's buffer is above
  its high-water mark.
- ``connect_tcp``/``start_tls`` raise ``ConnectTimeout`` only when their own
  ``timeout`` runs out; any ``OSError`` (the kernel's ETIMEDOUT and TLS
  errors included) is ``ConnectError``, and so is ``start_tls`` on a
  connection that has already closed, at once. They never leave a socket
  open when they fail or are cancelled. IP literals are connected without
  the resolver (``loop.getaddrinfo`` runs in the default executor); names go
  through happy eyeballs (:func:`_open_socket`).
- ``aclose`` shuts the socket down before it first yields where the loop's
  socket object allows it (asyncio's own loop; uvloop's half-closes through
  the transport on its next pass): the socket ledger counts a socket closed
  as soon as it decides to close it (G2).
- Cancellation (an anyio cancel scope, or ``Task.cancel``) interrupts any
  wait and leaves the stream consistent: the waiter is cleared, no timer is
  left armed.
"""

# httpcore's stream and backend interfaces take ``timeout`` arguments:
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import select
import socket
import ssl
from collections.abc import Iterable
from typing import Any, cast

import anyio
import httpcore
import sniffio

__all__ = ["AsyncioBackend", "AsyncioStream"]

# Stop reading from the socket while this many bytes wait in the buffer
# (a slow consumer of a large body must not make the buffer grow without
# bound), and start again once the reader has taken it below half.
_READ_HIGH_WATER = 256 * 1024

# Returned by the timer callback through the waiter future.
_TIMED_OUT = object()

# anyio.connect_tcp's default delay between happy-eyeballs attempts (RFC 6555).
_HAPPY_EYEBALLS_DELAY = 0.25


def _shut_down(sock: Any) -> bool:
    """Shut both directions of a transport's socket down at once; False if it refuses."""
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return True  # not connected any more: nothing left to shut down
    except (TypeError, AttributeError, NotImplementedError):
        return False  # uvloop's socket object: only the transport may close it
    return True


def _poller_for(sock: Any) -> Any:
    """A poll object watching ``sock`` for input, or None if it cannot be looked at.

    ``poll(0)`` on it tells, without blocking, whether the socket has
    something to read (or an error). Only ``fileno()`` is used, which
    asyncio's and uvloop's socket objects both offer. The caller counts a
    socket it cannot look at as readable, so that an idle connection in
    doubt is not reused.
    """
    fileno = -1 if sock is None else sock.fileno()
    if fileno < 0:
        return None
    if not hasattr(select, "poll"):  # pragma: no cover - Windows
        return _SelectPoller(fileno)
    poller = select.poll()
    poller.register(fileno, select.POLLIN)
    return poller


class _SelectPoller:  # pragma: no cover - Windows has no select.poll
    def __init__(self, fileno: int) -> None:
        self._fileno = fileno

    def poll(self, timeout: float) -> list[int]:
        readable: list[int] = select.select([self._fileno], [], [], timeout)[0]
        return readable


def _resolve(waiter: asyncio.Future[Any] | None, value: object = None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(value)


class _Protocol(asyncio.Protocol):
    """Buffers what arrives and wakes the one reader or writer waiting."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # A list, not a deque: it holds one chunk nearly always, and an
        # empty deque costs ~600 bytes per idle connection.
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.eof = False
        self.lost = False
        self.error: BaseException | None = None
        self.tls = False
        self.reading_paused = False
        self.writing_paused = False
        self.read_waiter: asyncio.Future[Any] | None = None
        self.write_waiter: asyncio.Future[Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports implement
        # asyncio.Transport's methods without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > _READ_HIGH_WATER and not self.reading_paused:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.pause_reading()
                self.reading_paused = True
        _resolve(self.read_waiter)

    def eof_received(self) -> bool:
        # The peer is done sending. Keep our half open, as anyio does: a
        # server may answer early and half-close while the request body is
        # still being written. The stream closes the transport in aclose().
        self.eof = True
        _resolve(self.read_waiter)
        # asyncio's TLS transport ignores the answer and logs a warning for True.
        return not self.tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.eof = True
        self.error = exc
        _resolve(self.read_waiter)
        _resolve(self.write_waiter)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        _resolve(self.write_waiter)


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection: an asyncio transport (TCP, Unix or TLS) and its protocol."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closed = False
        # For "is_readable": a poll object with the socket registered, made
        # on first use (an idle connection is checked before every reuse).
        self._poller: Any = None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        while not protocol.chunks:
            if self._closed:
                raise httpcore.ReadError("the connection was closed")
            if protocol.eof:
                if protocol.error is not None:
                    raise httpcore.ReadError(str(protocol.error) or repr(protocol.error))
                return b""
            if await self._wait("read_waiter", timeout):
                raise httpcore.ReadTimeout("timed out while reading")
        chunks = protocol.chunks
        chunk = chunks[0]
        if len(chunk) > max_bytes:
            chunks[0] = chunk[max_bytes:]
            chunk = chunk[:max_bytes]
        else:
            del chunks[0]
        protocol.buffered -= len(chunk)
        if protocol.reading_paused and protocol.buffered <= _READ_HIGH_WATER // 2:
            protocol.reading_paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()
        return chunk

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        protocol = self._protocol
        if self._closed or protocol.lost or self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._transport.write(buffer)
        while protocol.writing_paused:
            if protocol.lost:
                raise httpcore.WriteError("the connection was lost while writing")
            if await self._wait("write_waiter", timeout):
                raise httpcore.WriteTimeout("timed out while writing")

    async def _wait(self, slot: str, timeout: float | None) -> bool:
        """Wait to be woken through ``protocol.<slot>``; return True on timeout."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        setattr(self._protocol, slot, waiter)
        timer = None if timeout is None else loop.call_later(timeout, _resolve, waiter, _TIMED_OUT)
        try:
            return await waiter is _TIMED_OUT
        finally:
            setattr(self._protocol, slot, None)
            if timer is not None:
                timer.cancel()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        _resolve(self._protocol.read_waiter)
        _resolve(self._protocol.write_waiter)
        # The ledger has already counted this socket closed, so the peer
        # should see it go before anything else runs (another request's
        # connect). Shut it down now where the loop's socket object allows it
        # (asyncio's does, for TLS too; uvloop's refuses with TypeError), or
        # half-close through the transport (uvloop: on its next pass); then,
        # as anyio's SocketStream does: close, give the loop the pass in
        # which it closes the descriptor, and abort whatever is left.
        transport = self._transport
        if (
            not _shut_down(transport.get_extra_info("socket"))
            and not transport.is_closing()
            and transport.can_write_eof()
        ):
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()
        transport.close()
        try:
            await asyncio.sleep(0)
        finally:
            transport.abort()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        protocol = self._protocol
        if self._closed or protocol.lost or self._transport.is_closing():
            # asyncio would write its ClientHello into the dead transport and
            # wait for an answer until the timeout.
            self._closed = True
            self._transport.abort()
            raise httpcore.ConnectError("the connection closed before the TLS handshake")
        loop = asyncio.get_running_loop()
        protocol.tls = True
        transport = None
        try:
            with anyio.move_on_after(timeout) as scope:
                transport = await loop.start_tls(
                    self._transport,
                    protocol,
                    ssl_context,
                    server_hostname=server_hostname,
                )
        except BaseException as exc:
            self._closed = True
            self._transport.abort()
            if isinstance(exc, OSError):  # ssl.SSLError included
                raise httpcore.ConnectError(str(exc) or repr(exc)) from exc
            raise
        if scope.cancelled_caught:
            self._closed = True
            self._transport.abort()
            raise httpcore.ConnectTimeout("timed out during the TLS handshake")
        if transport is None:  # pragma: no cover - start_tls returns None only if closed
            raise httpcore.ConnectError("the connection closed during the TLS handshake")
        # Typed asyncio.Transport; uvloop's is not one, but has its methods.
        self._protocol.transport = transport
        return AsyncioStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        transport = self._transport
        if info == "is_readable":
            # Readable (for an idle connection: the server closed it or sent
            # something unexpected) if anything arrived, or is waiting in the
            # socket before the event loop has seen it.
            protocol = self._protocol
            if (
                protocol.chunks
                or protocol.eof
                or protocol.lost
                or self._closed
                or transport.is_closing()
            ):
                return True
            # Open and not closing, so the descriptor is still this socket's.
            # (Not lost alone would not do: asyncio's TLS transport closes
            # the socket a loop pass before it tells the protocol, and the
            # number may be reused meanwhile; it is closing from the start.)
            poller = self._poller
            if poller is None:
                poller = self._poller = _poller_for(transport.get_extra_info("socket"))
                if poller is None:
                    return True
            return bool(poller.poll(0))
        if info == "ssl_object":
            return transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        if info == "socket":
            return transport.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Connect with :class:`AsyncioStream` under asyncio, with ``fallback`` otherwise."""

    def __init__(self, fallback: httpcore.AsyncNetworkBackend) -> None:
        self._fallback = fallback

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if sniffio.current_async_library() != "asyncio":
            return await self._fallback.connect_tcp(
                host,
                port,
                timeout=timeout,
                local_address=local_address,
                socket_options=socket_options,
            )
        loop = asyncio.get_running_loop()

        async def open_connection() -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
            sock = await _open_socket(loop, host, port, local_address)
            try:
                return await loop.create_connection(_Protocol, sock=sock)
            except BaseException:
                sock.close()
                raise

        return await _connect(open_connection, timeout, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if sniffio.current_async_library() != "asyncio":
            return await self._fallback.connect_unix_socket(
                path, timeout=timeout, socket_options=socket_options
            )
        loop = asyncio.get_running_loop()
        return await _connect(
            lambda: loop.create_unix_connection(_Protocol, path), timeout, socket_options
        )

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


def _literal(host: str, port: int) -> list[Any] | None:
    """The address of an IP literal without a resolver call, or None for a name.

    ``loop.getaddrinfo`` runs in the default executor even for ``127.0.0.1``,
    so a busy executor would delay every connect (anyio skips it too).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return None  # fe80::1%eth0: let the resolver work out the scope
        return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))]
    return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]


def _interleave(infos: list[Any]) -> list[Any]:
    """Alternate address families, the resolver's first family first (RFC 8305)."""
    by_family: dict[int, list[Any]] = {}
    for info in infos:
        by_family.setdefault(info[0], []).append(info)
    queues = list(by_family.values())
    ordered = []
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.pop(0))
    return ordered


async def _connect_one(
    loop: asyncio.AbstractEventLoop, info: Any, local_address: str | None
) -> socket.socket:
    family, kind, proto, _, address = info
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        if local_address is not None:
            sock.bind((local_address, 0))
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def _open_socket(
    loop: asyncio.AbstractEventLoop, host: str, port: int, local_address: str | None
) -> socket.socket:
    """Connect a socket to ``host``, trying its addresses with happy eyeballs.

    As ``anyio.connect_tcp``: a new attempt starts every 250 ms until one
    connects; the others are cancelled, and a socket that connects after the
    winner is closed. Not asyncio's ``happy_eyeballs_delay``: its attempts run
    in tasks of their own, and a socket can outlive a cancelled connect there,
    over the socket ceiling (a property test caught it).
    """
    infos = _literal(host, port)
    if infos is None:
        infos = _interleave(await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    if not infos:  # pragma: no cover - getaddrinfo raises rather than return nothing
        raise OSError(f"no address for {host!r}")
    if len(infos) == 1:
        return await _connect_one(loop, infos[0], local_address)
    winner: socket.socket | None = None
    errors: list[OSError] = []

    async def attempt(info: Any, done: anyio.Event) -> None:
        nonlocal winner
        try:
            sock = await _connect_one(loop, info, local_address)
        except OSError as exc:
            errors.append(exc)
            return
        finally:
            done.set()
        if winner is None:
            winner = sock
            group.cancel_scope.cancel()
        else:
            sock.close()

    try:
        async with anyio.create_task_group() as group:
            for info in infos:
                done = anyio.Event()
                group.start_soon(attempt, info, done)
                with anyio.move_on_after(_HAPPY_EYEBALLS_DELAY):
                    await done.wait()
    except BaseException:
        if winner is not None:
            winner.close()
        raise
    if winner is None:
        raise OSError(f"all connection attempts to {host!r} failed: {errors}")
    return winner


async def _connect(
    open_connection: Any,
    timeout: float | None,
    socket_options: Iterable[httpcore.SOCKET_OPTION] | None,
) -> AsyncioStream:
    # Our timeout is ConnectTimeout; any OSError, the kernel's own ETIMEDOUT
    # included, is ConnectError (as with httpcore's anyio backend).
    opened = None
    try:
        with anyio.move_on_after(timeout) as scope:
            opened = await open_connection()
    except OSError as exc:
        raise httpcore.ConnectError(str(exc) or repr(exc)) from exc
    if opened is None or scope.cancelled_caught:
        if opened is not None:  # pragma: no cover - connected as the deadline passed
            opened[0].abort()
        raise httpcore.ConnectTimeout("timed out while connecting")
    transport, protocol = opened
    try:
        if socket_options:
            sock = transport.get_extra_info("socket")
            for option in socket_options:
                sock.setsockopt(*option)
    except BaseException as exc:
        transport.abort()
        if isinstance(exc, OSError):
            raise httpcore.ConnectError(str(exc) or repr(exc)) from exc
        raise
    return AsyncioStream(transport, protocol)

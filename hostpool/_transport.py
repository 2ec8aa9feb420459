"""The transports: admit each request to its partition, then send it.

``PartitionedTransport`` sends through one :class:`~hostpool._pool.PartitionPool`
per partition; ``AdmittedTransport`` wraps a transport the user supplied
(``transport=`` or ``mounts=``, e.g. ``httpx.MockTransport``) and applies the
quotas at admission only. Because these are ``httpx`` transports, redirects,
auth, cookies and event hooks of ``httpx.AsyncClient`` work unchanged, and
every redirect hop is routed by its own host.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType

import httpx

from ._admission import Admission, Partition
from ._compat import is_mocked, transport_pool
from ._errors import RouterClosed
from ._pool import PartitionPool, close_connections
from ._scheduler import Ticket

__all__ = ["AdmissionTransport", "AdmittedTransport", "PartitionedTransport"]


class AdmissionTransport(httpx.AsyncBaseTransport):
    """Base: admission around ``_send``; the slot is held until the body is closed.

    ``inner`` is the transport it wraps. Its lifecycle is the client's, as
    httpx runs it: ``async with router`` enters ``inner`` and on exit passes
    it the exception info (respx's ``assert_all_called`` runs there);
    ``router.aclose()`` closes it.
    """

    def __init__(self, admission: Admission, inner: httpx.AsyncBaseTransport) -> None:
        self._admission = admission
        self.inner = inner
        # Response bodies not closed yet: closing the router closes them, so
        # every slot comes back even if a caller abandoned a stream.
        self._open: set[_ReleasingStream] = set()
        admission.add_hooks(self._on_drop, self._on_rebind, self._on_shrink)

    def _on_drop(self, key: str) -> None:
        """A partition was dropped after its idle timeout."""

    def _on_rebind(self) -> None:
        """The router moved to another event loop: forget what belonged to the old one."""
        self._open.clear()

    def _on_shrink(self) -> None:
        """Most partitions are gone: rebuild tables sized for the crowd at its peak.

        The set of open bodies is shared with the streams (they remove
        themselves from it), so it is rebuilt in place: emptied, which frees
        its table, and refilled with the bodies still open.
        """
        still_open = list(self._open)
        self._open.clear()
        self._open.update(still_open)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        admission = self._admission
        try:
            key, quota_name = admission.partitioner(request.url)
        except ValueError as exc:
            raise httpx.UnsupportedProtocol(str(exc), request=request) from None
        # No await between the lookup and the admission (see Admission.partition).
        partition = admission.partition(key, quota_name)
        timeout = partition.entry.quota.pool_timeout
        if timeout is None:
            timeout = request.extensions.get("timeout", {}).get("pool")
        ticket = await admission.acquire(partition, timeout)
        if admission.closed:
            # Granted by a release in the same instant the router closed.
            admission.release(ticket, failed=True)
            raise RouterClosed(f"{partition.key}: the HostRouter was closed while waiting")
        try:
            response = await self._send(partition, request)
        except BaseException:
            admission.release(ticket, failed=True)
            raise
        if response.is_closed:
            # Already read and closed (e.g. an httpx.Response built from
            # bytes by a MockTransport): no body will ever be closed later.
            admission.release(ticket)
            return response
        if not isinstance(response.stream, httpx.AsyncByteStream):
            admission.release(ticket, failed=True)
            raise TypeError("a HostRouter transport must return an async response stream")
        response.stream = _ReleasingStream(response.stream, admission, ticket, self._open)
        return response

    async def _send(self, partition: Partition, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)

    def sockets(self, key: str) -> tuple[int, int, int, int]:
        """Return ``(open, idle, opened, evictions)`` for a partition's pool here."""
        return (0, 0, 0, 0)

    async def _close_own(self) -> None:
        """Close what this layer holds: fail waiters, close open bodies (slots back)."""
        self._admission.close()
        for stream in list(self._open):
            await stream.aclose()

    async def __aenter__(self) -> AdmissionTransport:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self._close_own()
        await self.inner.__aexit__(exc_type, exc_value, traceback)

    async def aclose(self) -> None:
        await self._close_own()
        await self.inner.aclose()


class AdmittedTransport(AdmissionTransport):
    """Admission in front of a user-supplied transport (shared by all partitions)."""


class _PartitionHTTPTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` over one partition's pool.

    A subclass, so that tools patching ``httpx.AsyncHTTPTransport`` (such as
    pytest-httpx) still see every request; it inherits the httpx <-> httpcore
    conversion and exception mapping unchanged.
    """

    def __init__(self, pool: PartitionPool) -> None:
        # No super().__init__(): that would build an httpcore pool we never use.
        self.pool = pool
        self._pool = pool  # type: ignore[assignment]


class PartitionedTransport(AdmissionTransport):
    """Admission plus one connection pool per partition, under one socket ledger.

    ``inner`` is a plain ``httpx.AsyncHTTPTransport``: its httpcore pool makes
    the connections (with its TLS, proxy, retries and socket options), the
    partition pools keep them. While a mocking library (respx, pytest-httpx)
    has patched httpx's or httpcore's classes, requests go through ``inner``
    itself, so that the mock sees them exactly as with ``httpx.AsyncClient``.
    """

    inner: httpx.AsyncHTTPTransport

    def __init__(self, admission: Admission, inner: httpx.AsyncHTTPTransport) -> None:
        super().__init__(admission, inner)
        self._factory = transport_pool(inner)
        self._pools: dict[str, _PartitionHTTPTransport] = {}
        self._closed = False

    async def _send(self, partition: Partition, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RouterClosed("the HostRouter has been closed")
        if is_mocked(self.inner, self._factory):
            return await self.inner.handle_async_request(request)
        transport = self._pools.get(partition.key)
        if transport is None:
            pool = PartitionPool(
                partition.key,
                self._factory,
                self._admission.ledger,
                partition.entry.quota.keepalive,
            )
            transport = self._pools[partition.key] = _PartitionHTTPTransport(pool)
        return await transport.handle_async_request(request)

    def _on_drop(self, key: str) -> None:
        transport = self._pools.pop(key, None)
        if transport is not None:
            transport.pool.retire()

    def _on_shrink(self) -> None:
        super()._on_shrink()
        self._pools = dict(self._pools)

    def _on_rebind(self) -> None:
        # The connections belong to an event loop we no longer run in: they
        # can be neither used nor closed from here. Forget them (their pools
        # keep the old ledger, so the new one starts at zero).
        super()._on_rebind()
        self._pools.clear()

    def sockets(self, key: str) -> tuple[int, int, int, int]:
        transport = self._pools.get(key)
        if transport is None:
            return (0, 0, 0, 0)
        pool = transport.pool
        return (pool.sockets_open, pool.sockets_idle, pool.opened, pool.evictions)

    async def _close_own(self) -> None:
        self._closed = True
        await super()._close_own()
        ledger = self._admission.ledger
        retired = ledger.take_retired()
        await close_connections(retired)
        ledger.closed(len(retired))
        for transport in list(self._pools.values()):
            await transport.aclose()


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that returns the admission slot when it is closed (once)."""

    def __init__(
        self,
        stream: httpx.AsyncByteStream,
        admission: Admission,
        ticket: Ticket,
        registry: set[_ReleasingStream],
    ) -> None:
        self._stream = stream
        self._admission = admission
        self._ticket: Ticket | None = ticket
        self._registry = registry
        registry.add(self)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except BaseException:
            await self._close(failed=True)
            raise

    async def aclose(self) -> None:
        await self._close(failed=False)

    async def _close(self, *, failed: bool) -> None:
        ticket, self._ticket = self._ticket, None
        if ticket is None:
            return
        self._registry.discard(self)
        try:
            await self._stream.aclose()
        finally:
            # The connection is back in its pool (or closed) before the slot
            # is released: the ledger is current when the next request runs.
            self._admission.release(ticket, failed=failed)

"""The transports: admit each request to its partition, then send it.

``PartitionedTransport`` sends through one :class:`~hostpool._pool.PartitionPool`
per partition; ``AdmittedTransport`` wraps a transport the user supplied
(``transport=`` or ``mounts=``, e.g. ``httpx.MockTransport``) and applies the
quotas at admission only. Because these are ``httpx`` transports, redirects,
auth, cookies and event hooks of ``httpx.AsyncClient`` work unchanged, and
every redirect hop is routed by its own host.
"""

from __future__ import annotations

from types import TracebackType

import httpcore
import httpx

from ._admission import Admission, Partition
from ._compat import is_mocked, is_traced, transport_pool
from ._pool import PartitionPool, ResponseBody
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

    @property
    def admission(self) -> Admission:
        """The admission (router state) this transport admits requests to."""
        return self._admission

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        admission = self._admission
        try:
            ticket = await admission.admit(
                request.url, request.extensions.get("timeout", {}).get("pool")
            )
        except ValueError as exc:  # no partition for this URL
            raise httpx.UnsupportedProtocol(str(exc), request=request) from None
        partition = admission.partition_of(ticket)
        try:
            response = await self._send(partition, ticket, request)
        except BaseException:
            # No response, so no body to release the slot: release it here.
            admission.release(ticket, failed=True)
            raise
        status = response.status_code
        if (status == 429 or status == 503) and partition.entry.quota.respect_retry_after:
            # The response goes to the caller unchanged (retrying is theirs);
            # what it says about the upstream pauses the partition.
            admission.pause_from(partition, status, response.headers.get("retry-after"))
        return response

    async def _send(
        self, partition: Partition, ticket: Ticket, request: httpx.Request
    ) -> httpx.Response:
        """Send through ``inner``; the response's body holds the slot until it is closed."""
        response = await self.inner.handle_async_request(request)
        if response.is_closed:
            # Already read and closed (e.g. an httpx.Response built from
            # bytes by a MockTransport): no body will ever be closed later.
            self._admission.release(ticket)
            return response
        if not isinstance(response.stream, httpx.AsyncByteStream):
            # The caller releases the slot on this error.
            raise TypeError("a HostRouter transport must return an async response stream")
        response.stream = ResponseBody(response.stream, self._admission, ticket)
        return response

    async def _close_own(self) -> None:
        """Close the admission (waiters, open bodies, every socket): idempotent."""
        await self._admission.aclose()

    async def __aenter__(self) -> AdmissionTransport:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        try:
            await self._close_own()
        finally:
            await self.inner.__aexit__(exc_type, exc_value, traceback)

    async def aclose(self) -> None:
        try:
            await self._close_own()
        finally:
            await self.inner.aclose()


class AdmittedTransport(AdmissionTransport):
    """Admission in front of a user-supplied transport (shared by all partitions)."""


class _TracedTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` over one request's way into a partition's pool.

    Only while a tracer wraps httpx's ``handle_async_request``
    (``_compat.is_traced``): the wrapped method runs, with httpx's request
    and response conversion, over the partition's pool. Made per request
    (two small objects), so that the pool learns which admission slot the
    response's body gives back.
    """

    def __init__(self, pool: PartitionPool, admission: Admission, ticket: Ticket) -> None:
        # No super().__init__(): that would build an httpcore pool we never use.
        self._pool = _Granted(pool, admission, ticket)  # type: ignore[assignment]


class _Granted:
    """A partition pool, seen by httpx as a pool, for one request holding ``ticket``."""

    __slots__ = ("_admission", "_pool", "_ticket")

    def __init__(self, pool: PartitionPool, admission: Admission, ticket: Ticket) -> None:
        self._pool = pool
        self._admission = admission
        self._ticket = ticket

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        return await self._pool.handle_async_request(request, self._admission, self._ticket)


class PartitionedTransport(AdmissionTransport):
    """Admission plus one connection pool per partition, under one socket ledger.

    ``inner`` is a plain ``httpx.AsyncHTTPTransport``: its httpcore pool makes
    the connections (with its TLS, proxy, retries and socket options), the
    partitions' pools keep them (``Partition.pools``, keyed by that httpcore
    pool). While a mocking library (respx, pytest-httpx) has patched httpx's
    or httpcore's classes, requests go through ``inner`` itself, so that the
    mock sees them exactly as with ``httpx.AsyncClient``.
    """

    inner: httpx.AsyncHTTPTransport

    def __init__(self, admission: Admission, inner: httpx.AsyncHTTPTransport) -> None:
        super().__init__(admission, inner)
        self._factory = transport_pool(inner)

    async def _send(
        self, partition: Partition, ticket: Ticket, request: httpx.Request
    ) -> httpx.Response:
        factory = self._factory
        if is_mocked(self.inner, factory):
            return await super()._send(partition, ticket, request)
        pool = partition.pools.get(factory)
        if pool is None:
            pool = partition.pools[factory] = PartitionPool(
                partition.key, factory, self._admission.ledger, partition.entry.quota.keepalive
            )
        if is_traced(self.inner):
            traced = _TracedTransport(pool, self._admission, ticket)
            return await traced.handle_async_request(request)
        return await pool.send(request, self._admission, ticket)

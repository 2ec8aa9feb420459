"""Every use of httpx's and httpcore's internals, in one place.

hostpool is an ``httpx.AsyncClient`` whose pooling is its own, and a few of
the seams it needs are not public API. They are all here, each with what it
is for and what happens when a release moves it, so that an upgrade is
reviewed in one file; ``tests/test_compat.py`` checks every one of them and
names the symbol that moved. No other module of hostpool touches a private
name of httpx or httpcore.

Pinned to the minor versions tested: httpx 0.28, httpcore 1.0 (pyproject.toml).

=============================================  =====================================
Internal                                       Used for
=============================================  =====================================
``AsyncClient._init_transport``                 building the router's transports from
``AsyncClient._init_proxy_transport``           AsyncClient's own arguments (proxies,
                                                ``trust_env``) -- :class:`ClientSeams`
``AsyncClient._send_single_request``            response bodies without a reference
``httpx._client.BoundAsyncStream``              cycle -- :class:`ClientSeams`
``AsyncClient._merge_url``                      URL strings parsed once --
                                                :class:`ClientSeams`
``Response._get_content_decoder``               a response body read without
``Response._content``, ``._request``,           ``aread``'s generators --
``Response._num_bytes_downloaded``              :func:`read_body`
``httpx._client.UseClientDefault``,             the types of ``send``'s arguments
``httpx._types.AuthTypes``
``AsyncHTTPTransport._pool``                    the httpcore pool a transport was built
                                                with: makes connections with the user's
                                                TLS, proxy, retries, socket options
``AsyncConnectionPool._keepalive_expiry``       httpx's ``keepalive_expiry``, for the
                                                idle sweep
``AsyncHTTPConnection._network_backend``        hostpool's asyncio stream on direct
``httpcore._backends.auto.AutoBackend``         connections (when httpcore's default
                                                backend is in use)
``AsyncHTTPConnection._request_lock``           a lock without a loop pass when free
``httpcore._synchronization.AsyncLock``
=============================================  =====================================

Every helper degrades to httpx's own behaviour when the shape it expects is
not there (a renamed attribute, a different class): slower, never wrong.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import httpcore
import httpx
from httpcore._backends.auto import AutoBackend
from httpcore._synchronization import AsyncLock
from httpx._client import UseClientDefault
from httpx._types import AuthTypes

__all__ = [
    "DEFAULT_LIMITS",
    "ClientSeams",
    "connect_stream",
    "httpcore_request",
    "httpx_error",
    "is_mocked",
    "is_traced",
    "read_body",
    "keepalive_expiry",
    "speaks_http1_only",
    "transport_pool",
    "tune_direct_connection",
]


# -- the transport's pool ------------------------------------------------------


def transport_pool(transport: httpx.AsyncHTTPTransport) -> httpcore.AsyncConnectionPool:
    """Return the httpcore pool an ``httpx.AsyncHTTPTransport`` was built with.

    hostpool never sends through it: it calls its public ``create_connection``
    so that connections carry exactly the transport's settings.
    """
    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore.AsyncConnectionPool):
        raise TypeError(
            "hostpool cannot find the connection pool of httpx.AsyncHTTPTransport "
            "(httpx.AsyncHTTPTransport._pool): this httpx release is not supported"
        )
    return pool


def keepalive_expiry(pool: httpcore.AsyncConnectionPool) -> float | None:
    """Return the pool's ``keepalive_expiry`` (httpx's ``Limits.keepalive_expiry``)."""
    expiry = getattr(pool, "_keepalive_expiry", None)
    return None if expiry is None else float(expiry)


# -- mocking libraries ---------------------------------------------------------

# respx patches the pool classes' handle_async_request, pytest-httpx patches
# AsyncHTTPTransport's. A tracer (OpenTelemetry's httpx instrumentation,
# Logfire) wraps the same method but keeps the original reachable through
# ``__wrapped__``, as functools.wraps and wrapt do: that is not a mock, and
# hostpool's own pools must keep working under it.
_POOL_CLASSES = (httpcore.AsyncConnectionPool, httpcore.AsyncHTTPProxy, httpcore.AsyncSOCKSProxy)
_verdicts: dict[int, tuple[object, bool]] = {}


def _replaced(function: object, module: str) -> bool:
    """Tell whether ``function``, once unwrapped, is not ``module``'s own code.

    Judged by where the innermost function was defined, so it does not
    matter whether hostpool was imported before or after the mock started.
    One verdict per class attribute is cached, keyed by the object's identity.
    """
    seen = _verdicts.get(id(function))
    if seen is not None and seen[0] is function:
        return seen[1]
    inner = inspect.unwrap(function)  # type: ignore[arg-type]
    verdict = not getattr(inner, "__module__", "").startswith(module)
    if len(_verdicts) > 64:  # mocks come and go in a test run: stay small
        _verdicts.clear()
    _verdicts[id(function)] = (function, verdict)
    return verdict


def is_mocked(transport: httpx.AsyncHTTPTransport, pool: httpcore.AsyncConnectionPool) -> bool:
    """Tell whether a mocking library has patched the classes this transport sends through.

    Then the request must go through ``transport`` itself, as it would with
    ``httpx.AsyncClient``, so that the mock sees the same request (proxied
    requests keep their target URL and proxy URL). Admission still applies.
    """
    if _replaced(type(transport).handle_async_request, "httpx."):
        return True
    pool_class = type(pool)
    return pool_class in _POOL_CLASSES and _replaced(pool_class.handle_async_request, "httpcore.")


#: httpx's own ``AsyncHTTPTransport.handle_async_request`` (unwrapped, should a
#: tracer have wrapped it before hostpool was imported).
_HTTPX_HANDLE = inspect.unwrap(httpx.AsyncHTTPTransport.handle_async_request)


def is_traced(transport: httpx.AsyncHTTPTransport) -> bool:
    """Tell whether a tracer wraps this transport's ``handle_async_request``.

    A wrapper that keeps httpx's method reachable through ``__wrapped__``
    (OpenTelemetry's httpx instrumentation, Logfire): not a mock
    (:func:`is_mocked`), but it must see every request, so requests go
    through the wrapped method, over hostpool's pool, as before the pool
    took ``httpx.Request`` directly. One identity check per request.
    """
    return type(transport).handle_async_request is not _HTTPX_HANDLE


# -- direct connections ----------------------------------------------------------


class _UncontendedLock(AsyncLock):
    """httpcore's lock, minus the scheduling round-trip when nobody holds it.

    ``AsyncHTTPConnection`` takes its ``_request_lock`` around the connect
    step of every request, even on a connection that is long connected. On
    asyncio that lock is ``anyio.Lock()``, whose acquire always yields to the
    event loop once; ``anyio.Lock(fast_acquire=True)`` is the same lock
    without that yield when it is free. Mutual exclusion is unchanged (a
    second request on a connecting HTTP/2 connection still waits for the
    first), and the request has other cancellation points right after (the
    socket send). One loop pass per request is ~4% of a sequential request's
    CPU (benchmarks: throughput at concurrency 1). Trio keeps its own lock.
    """

    def setup(self) -> None:
        super().setup()
        if self._backend == "asyncio":
            self._anyio_lock = anyio.Lock(fast_acquire=True)


def tune_direct_connection(
    conn: httpcore.AsyncConnectionInterface,
    backend: Callable[[httpcore.AsyncNetworkBackend], httpcore.AsyncNetworkBackend],
) -> None:
    """Give a new direct ``AsyncHTTPConnection`` hostpool's backend and an uncontended lock.

    ``backend`` receives httpcore's default backend (its fallback) and returns
    the one to use. Only the exact httpcore class whose internals are known,
    with httpcore's default backend; proxy connections, a user's own backend
    and anything else are left alone.
    """
    if type(conn) is not httpcore.AsyncHTTPConnection:
        return
    default = getattr(conn, "_network_backend", None)
    if type(default) is AutoBackend:
        conn._network_backend = backend(default)
    lock = getattr(conn, "_request_lock", None)
    if type(lock) is AsyncLock and not lock._backend:
        conn._request_lock = _UncontendedLock()


def speaks_http1_only(conn: httpcore.AsyncConnectionInterface) -> bool:
    """Tell whether ``conn`` is a direct httpcore connection that will speak HTTP/1.1 only.

    Reads ``AsyncHTTPConnection._http1`` / ``._http2`` (the transport's
    ``http1=`` / ``http2=``): only then may hostpool's own HTTP/1.1
    connection take over its exchange (``_http11.py``).
    """
    if type(conn) is not httpcore.AsyncHTTPConnection:
        return False
    return getattr(conn, "_http1", False) is True and getattr(conn, "_http2", True) is False


async def connect_stream(
    conn: httpcore.AsyncConnectionInterface, request: httpcore.Request
) -> httpcore.AsyncNetworkStream:
    """Open ``conn``'s network stream as httpcore would for ``request`` (``_connect``).

    TLS, retries, socket options and the backend stay httpcore's; the caller
    speaks HTTP on the stream.
    """
    if not isinstance(conn, httpcore.AsyncHTTPConnection):
        raise TypeError(f"not a direct httpcore connection: {conn!r}")
    stream: httpcore.AsyncNetworkStream = await conn._connect(request)
    return stream


# -- httpx.AsyncHTTPTransport's conversions ---------------------------------------
#
# The partition pools take an ``httpx.Request`` and return an
# ``httpx.Response`` themselves (``PartitionPool.send``), rather than going
# through ``AsyncHTTPTransport.handle_async_request``: on hostpool's HTTP/1.1
# connection no ``httpcore.Request`` / ``httpcore.Response`` is built at all
# (their header re-validation, and the async generator httpx wraps around
# every body, cost ~20 us per request). These two are what that method does
# for everything else, with public names only; tests/test_compat.py holds
# them to httpx's own.


def httpcore_request(request: httpx.Request) -> httpcore.Request:
    """The ``httpcore.Request`` that ``httpx.AsyncHTTPTransport`` would send for ``request``."""
    url = request.url
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(
            scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
        ),
        headers=request.headers.raw,
        content=request.stream,
        extensions=request.extensions,
    )


#: httpcore's exceptions and httpx's, most specific first: the first match wins.
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


def httpx_error(exc: BaseException) -> httpx.TransportError | None:
    """The httpx exception httpx raises for httpcore's ``exc`` (same class, same message).

    None for anything that is not httpcore's: it propagates unchanged, as
    from httpx's ``map_httpcore_exceptions``. The caller raises the result
    ``from exc``.
    """
    for source, target in _ERRORS:
        if isinstance(exc, source):
            return target(str(exc))
    return None


# -- httpx.AsyncClient's seams -----------------------------------------------------


class _TimedStream(httpx.AsyncByteStream):
    """httpx's ``BoundAsyncStream``, without the reference cycle.

    httpx binds each response body to its response (to set
    ``response.elapsed`` when the body is closed) with a strong reference
    both ways, so every response is cyclic garbage: only the cycle collector
    frees it, and at one response per request that is a gen-0 collection
    every few dozen requests (~10 us per request at concurrency 1,
    benchmarks: throughput). The same behaviour with a weak back-reference
    lets reference counting free a response as soon as it is dropped.
    """

    __slots__ = ("_chunks", "_response", "_start", "_stream")

    def __init__(self, stream: httpx.AsyncByteStream, response: httpx.Response, start: float):
        self._stream = stream
        self._response = weakref.ref(response)
        self._start = start

    def __aiter__(self) -> _TimedStream:
        # An iterator, not an async generator: asyncio registers each async
        # generator with the loop on its first step, a cost per response.
        self._chunks = self._stream.__aiter__()
        return self

    async def __anext__(self) -> bytes:
        chunk: bytes = await self._chunks.__anext__()
        return chunk

    async def aclose(self) -> None:
        response = self._response()
        if response is not None:
            response.elapsed = datetime.timedelta(seconds=time.perf_counter() - self._start)
        await self._stream.aclose()


async def read_body(response: httpx.Response) -> bytes:
    """``await response.aread()``, as httpx 0.28 does it, in one frame.

    ``Response.aread`` joins ``aiter_bytes``, an async generator over
    ``aiter_raw``, another, each with a ``ByteChunker`` and httpx's
    ``request_context``; with no chunk size asked for, those chunkers pass
    every piece through. The same steps, in the same order: the checks of
    ``aiter_raw``, the body counted as it is downloaded, decoded by the
    response's content decoder (``Response._get_content_decoder``), the
    response closed once read (before the decoder's flush, as there), a
    ``RequestError`` tagged with the request, then ``Response._content``
    set. Anything else (already read, a sync stream) goes to ``aread``.
    """
    if hasattr(response, "_content") or not isinstance(response.stream, httpx.AsyncByteStream):
        return await response.aread()
    if response.is_stream_consumed:
        raise httpx.StreamConsumed()
    if response.is_closed:
        raise httpx.StreamClosed()
    request = response._request
    decoder = response._get_content_decoder()
    response.is_stream_consumed = True
    response._num_bytes_downloaded = 0
    parts: list[bytes] = []
    try:
        async for raw in response.stream:
            response._num_bytes_downloaded += len(raw)
            if raw:  # httpx's chunkers drop empty pieces before decoding
                parts.append(decoder.decode(raw))
        await response.aclose()
        parts.append(decoder.flush())
    except httpx.RequestError as exc:
        if request is not None:
            exc.request = request
        raise
    content = response._content = b"".join(parts)
    return content


#: How many parsed URL strings a router keeps (``ClientSeams._merge_url``).
URL_CACHE_SIZE = 1024
#: The longest URL string it keeps, in characters.
URL_CACHE_LONGEST = 512

#: httpx's own default: 100 sockets, 20 of them idle.
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)

#: httpx's logger: every response is logged there, as by httpx.AsyncClient.
_HTTPX_LOGGER = logging.getLogger("httpx")


class ClientSeams(httpx.AsyncClient):
    """The private hooks of ``httpx.AsyncClient`` that HostRouter fills in.

    ``AsyncClient.__init__`` builds its transport and its proxy mounts
    through ``_init_transport`` and ``_init_proxy_transport``; both end in
    :meth:`_hp_wrap`, which a subclass implements. ``_send_single_request``
    is where httpx binds a response body to its response. ``_merge_url``
    is where a URL given as a string is parsed. ``send`` reads a body that
    is not streamed with :func:`read_body`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # URL strings already parsed: str -> (the base_url it was merged with, the URL).
        self._hp_urls: dict[str, tuple[httpx.URL, httpx.URL]] = {}
        super().__init__(*args, **kwargs)

    def _hp_wrap(self, transport: httpx.AsyncBaseTransport) -> httpx.AsyncBaseTransport:
        raise NotImplementedError

    def _hp_forget_urls(self) -> None:
        """Drop every parsed URL kept (a new dict: a cleared one keeps its table)."""
        self._hp_urls = {}

    def _merge_url(self, url: httpx.URL | str) -> httpx.URL:
        # httpx parses the URL string of every request again (~20 us for
        # "http://127.0.0.1:8000/": benchmarks, profile). httpx.URL is
        # immutable, so the result for the same string and the same
        # base_url is the same object: keep up to URL_CACHE_SIZE of them, as
        # yarl (aiohttp's URL) keeps its parses (a process-wide lru_cache of
        # 128). 1,024 so that a service going round a thousand hosts is not
        # past the edge (benchmarks: many_hosts). Strings longer than
        # URL_CACHE_LONGEST are not kept (rarely the same twice, and they
        # would make the cache's size unbounded in bytes): ~0.5 KiB per URL
        # kept otherwise, ~1.5 MiB per router at most. Full, it starts over.
        # Strings that fail to parse raise as before and are not kept.
        if type(url) is not str or len(url) > URL_CACHE_LONGEST:
            return super()._merge_url(url)
        base = self.base_url
        known = self._hp_urls.get(url)
        if known is not None and known[0] is base:
            return known[1]
        merged = super()._merge_url(url)
        urls = self._hp_urls
        if len(urls) >= URL_CACHE_SIZE:
            urls = self._hp_urls = {}
        urls[url] = (base, merged)
        return merged

    # AsyncClient.__init__ builds every transport through these two (the
    # user's transport=, its own default, one per proxy): let httpx build
    # them with its own arguments and defaults, then put admission in front.
    def _init_transport(self, *args: Any, **kwargs: Any) -> httpx.AsyncBaseTransport:
        return self._hp_wrap(super()._init_transport(*args, **kwargs))

    def _init_proxy_transport(self, *args: Any, **kwargs: Any) -> httpx.AsyncBaseTransport:
        return self._hp_wrap(super()._init_proxy_transport(*args, **kwargs))

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: AuthTypes | UseClientDefault | None = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: bool | UseClientDefault = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        # httpx's own send, with the body (when not streamed) read by
        # read_body rather than Response.aread: the same result, without
        # aread's two stacked async generators and their context managers
        # (~10 us per response). On failure the response is closed, as
        # httpx does.
        response = await super().send(
            request, stream=True, auth=auth, follow_redirects=follow_redirects
        )
        if stream:
            return response
        try:
            await read_body(response)
        except BaseException:
            await response.aclose()
            raise
        return response

    async def _send_single_request(self, request: httpx.Request) -> httpx.Response:
        # httpx 0.28's own, step for step (the conformance run holds it to
        # httpx's tests), with two differences: the body is bound to its
        # response by _TimedStream (no reference cycle), and the cookie jar
        # is asked only when the response sets a cookie (it costs ~16 us per
        # response otherwise, to find nothing). Reads AsyncClient's
        # _transport_for_url and _default_encoding.
        transport = self._transport_for_url(request.url)
        start = time.perf_counter()
        if not isinstance(request.stream, httpx.AsyncByteStream):
            raise RuntimeError("Attempted to send an sync request with an AsyncClient instance.")
        try:
            response = await transport.handle_async_request(request)
        except httpx.RequestError as exc:
            exc.request = request  # what httpx's request_context() does
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.request = request
        response.stream = _TimedStream(response.stream, response, start)
        headers = response.headers
        if "set-cookie" in headers or "set-cookie2" in headers:
            self.cookies.extract_cookies(response)
        response.default_encoding = self._default_encoding
        _HTTPX_LOGGER.info(
            'HTTP Request: %s %s "%s %d %s"',
            request.method,
            request.url,
            response.http_version,
            response.status_code,
            response.reason_phrase,
        )
        return response

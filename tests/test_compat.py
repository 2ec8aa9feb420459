"""The httpx/httpcore internals hostpool relies on are where hostpool expects them.

Every private name listed in ``hostpool/_compat.py`` has a check here. When a
new httpx or httpcore release moves one, the failure names it: that is the
line of ``_compat.py`` to update, and the rest of hostpool is untouched.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import inspect
import pathlib
import re
import typing
import zlib
from typing import Any

import anyio
import httpcore
import httpx
import pytest
from upstream import Upstream

import hostpool
from hostpool import _compat, _router

pytestmark = pytest.mark.anyio


def _resolve(dotted: str) -> object:
    module_name, _, rest = dotted.partition(":")
    target: object = importlib.import_module(module_name)
    for part in rest.split(".") if rest else []:
        assert hasattr(target, part), f"{dotted} is gone: update hostpool/_compat.py"
        target = getattr(target, part)
    return target


@pytest.mark.parametrize(
    "dotted",
    [
        "httpx:AsyncClient._init_transport",
        "httpx:AsyncClient._init_proxy_transport",
        "httpx:AsyncClient._send_single_request",
        "httpx:AsyncClient._transport_for_url",
        "httpx:AsyncClient._merge_url",
        "httpx:Response._get_content_decoder",
        "httpcore._backends.auto:AutoBackend",
        "httpcore._synchronization:AsyncLock",
        "httpcore._synchronization:AsyncLock.setup",
        "httpcore:AsyncHTTPConnection._connect",
    ],
)
def test_private_name_still_exists(dotted: str) -> None:
    _resolve(dotted)


@pytest.mark.parametrize(
    ("method", "arguments"),
    [
        (
            "_init_transport",
            ["verify", "cert", "trust_env", "http1", "http2", "limits", "transport"],
        ),
        (
            "_init_proxy_transport",
            ["proxy", "verify", "cert", "trust_env", "http1", "http2", "limits"],
        ),
        ("_send_single_request", ["request"]),
    ],
)
def test_async_client_hook_keeps_its_arguments(method: str, arguments: list[str]) -> None:
    signature = inspect.signature(getattr(httpx.AsyncClient, method))
    names = [name for name in signature.parameters if name != "self"]
    assert names == arguments, f"httpx.AsyncClient.{method} changed its arguments: {names}"


def test_a_client_keeps_its_default_encoding_where_send_single_request_reads_it() -> None:
    """AsyncClient._default_encoding (read by ClientSeams._send_single_request)."""
    client = httpx.AsyncClient(default_encoding="latin-1")
    assert getattr(client, "_default_encoding", None) == "latin-1", "AsyncClient._default_encoding"


def test_transport_pool_is_reachable() -> None:
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(keepalive_expiry=7.0))
    pool = _compat.transport_pool(transport)
    assert isinstance(pool, httpcore.AsyncConnectionPool), "httpx.AsyncHTTPTransport._pool"
    assert _compat.keepalive_expiry(pool) == 7.0, "httpcore.AsyncConnectionPool._keepalive_expiry"


def test_transport_pool_fails_clearly_when_moved() -> None:
    transport = httpx.AsyncHTTPTransport()
    del transport._pool
    with pytest.raises(TypeError, match=r"AsyncHTTPTransport\._pool"):
        _compat.transport_pool(transport)


@pytest.mark.parametrize(("http1", "http2", "expected"), [(True, False, True), (True, True, False)])
def test_a_direct_connection_says_which_protocols_it_may_speak(
    http1: bool, http2: bool, expected: bool
) -> None:
    """AsyncHTTPConnection._http1 / ._http2 decide whether hostpool's HTTP/1.1 path may take it."""
    pool = httpcore.AsyncConnectionPool(http1=http1, http2=http2)
    conn = pool.create_connection(httpcore.Origin(b"http", b"example.com", 80))
    assert getattr(conn, "_http1", None) is http1, "AsyncHTTPConnection._http1"
    assert getattr(conn, "_http2", None) is http2, "AsyncHTTPConnection._http2"
    assert _compat.speaks_http1_only(conn) is expected


async def test_connect_stream_opens_the_connections_stream(
    upstream: Upstream, anyio_backend_name: str
) -> None:
    """AsyncHTTPConnection._connect(request) returns the network stream, not yet used."""
    pool = httpcore.AsyncConnectionPool()
    url = httpcore.URL(upstream.url("127.0.0.1", "/ok"))
    conn = pool.create_connection(url.origin)
    stream = await _compat.connect_stream(conn, httpcore.Request(b"GET", url))
    try:
        assert isinstance(stream, httpcore.AsyncNetworkStream)
        await stream.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await stream.read(65536)).startswith(b"HTTP/1.1 200")
    finally:
        await stream.aclose()


def test_a_direct_connection_has_the_backend_and_lock_hostpool_tunes() -> None:
    pool = httpcore.AsyncConnectionPool()
    conn = pool.create_connection(httpcore.Origin(b"http", b"example.com", 80))
    assert type(conn) is httpcore.AsyncHTTPConnection
    backend = getattr(conn, "_network_backend", None)
    lock = getattr(conn, "_request_lock", None)
    assert type(backend).__name__ == "AutoBackend", "AsyncHTTPConnection._network_backend"
    assert type(lock).__name__ == "AsyncLock", "AsyncHTTPConnection._request_lock"
    seen: list[object] = []

    def backend_factory(default: httpcore.AsyncNetworkBackend) -> httpcore.AsyncNetworkBackend:
        seen.append(default)
        return httpcore.AnyIOBackend()

    _compat.tune_direct_connection(conn, backend_factory)
    assert seen == [backend]
    assert isinstance(conn._network_backend, httpcore.AnyIOBackend)
    assert type(conn._request_lock).__name__ == "_UncontendedLock"


async def test_the_uncontended_lock_still_excludes(anyio_backend_name: str) -> None:
    lock = _compat._UncontendedLock()
    order: list[str] = []

    async def hold(name: str) -> None:
        async with lock:
            order.append(f"{name} in")
            await anyio.sleep(0.01)
            order.append(f"{name} out")

    async with anyio.create_task_group() as group:
        group.start_soon(hold, "a")
        group.start_soon(hold, "b")
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])


def test_mocking_is_detected_by_patched_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    transport = httpx.AsyncHTTPTransport()
    pool = _compat.transport_pool(transport)
    assert not _compat.is_mocked(transport, pool)

    async def patched(self: object, request: object) -> object:  # pragma: no cover
        raise AssertionError

    with monkeypatch.context() as patch:
        patch.setattr(httpcore.AsyncConnectionPool, "handle_async_request", patched)
        assert _compat.is_mocked(transport, pool)
    with monkeypatch.context() as patch:
        patch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", patched)
        assert _compat.is_mocked(transport, pool)
    assert not _compat.is_mocked(transport, pool)


def test_a_tracing_wrapper_is_not_taken_for_a_mock(monkeypatch: pytest.MonkeyPatch) -> None:
    # OpenTelemetry's and Logfire's httpx instrumentation wrap the method and
    # keep the original reachable (__wrapped__): hostpool's pools stay on.
    transport = httpx.AsyncHTTPTransport()
    pool = _compat.transport_pool(transport)
    original = httpx.AsyncHTTPTransport.handle_async_request

    @functools.wraps(original)
    async def traced(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        return await original(self, request)  # pragma: no cover

    assert not _compat.is_traced(transport)
    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", traced)
    assert not _compat.is_mocked(transport, pool)
    assert _compat.is_traced(transport)


def _httpx_exception_map() -> dict[type[Exception], type[Exception]]:
    default = importlib.import_module("httpx._transports.default")
    assert hasattr(default, "_load_httpcore_exceptions"), (
        "httpx._transports.default._load_httpcore_exceptions is gone: check that "
        "hostpool/_compat.py's _ERRORS still maps httpcore's exceptions as httpx does"
    )
    mapping: dict[type[Exception], type[Exception]] = default._load_httpcore_exceptions()
    return mapping


def test_httpcore_errors_map_to_the_httpx_errors_httpx_raises() -> None:
    # httpx's map_httpcore_exceptions picks the most specific httpx class for
    # every httpcore class it knows; _compat.httpx_error must pick the same.
    mapping = _httpx_exception_map()
    for source in mapping:
        expected = None
        for candidate, target in mapping.items():
            if issubclass(source, candidate) and (expected is None or issubclass(target, expected)):
                expected = target
        mapped = _compat.httpx_error(source("what happened"))
        assert type(mapped) is expected, f"{source.__name__}: {type(mapped)} != {expected}"
        assert str(mapped) == "what happened"
    assert _compat.httpx_error(ValueError("not httpcore's")) is None
    assert _compat.httpx_error(httpcore.ConnectionNotAvailable()) is None


def test_httpcore_request_is_the_request_httpx_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    # What httpx.AsyncHTTPTransport builds for its pool, against ours.
    request = httpx.Request(
        "POST",
        "https://[::1]:8443/a%20b/c?q=1&r=%C3%A9#frag",
        headers={"X-Thing": "1", "Host": "example.test"},
        content=b"body",
        extensions={"timeout": {"read": 1.0}, "sni_hostname": "example.test"},
    )
    seen: list[httpcore.Request] = []

    class Pool:
        async def handle_async_request(self, req: httpcore.Request) -> httpcore.Response:
            seen.append(req)
            return httpcore.Response(200)

    transport = httpx.AsyncHTTPTransport()
    monkeypatch.setattr(transport, "_pool", Pool())
    anyio.run(transport.handle_async_request, request)
    theirs, ours = seen[0], _compat.httpcore_request(request)
    assert ours.method == theirs.method
    assert ours.url == theirs.url and ours.url.target == theirs.url.target
    assert ours.headers == theirs.headers
    assert ours.stream is theirs.stream and ours.extensions == theirs.extensions


def test_defaults_agree_with_httpx() -> None:
    config = importlib.import_module("httpx._config")
    assert config.DEFAULT_TIMEOUT_CONFIG == _router.DEFAULT_TIMEOUT, "httpx default timeout"
    assert config.DEFAULT_MAX_REDIRECTS == _router.DEFAULT_MAX_REDIRECTS, "max_redirects"
    assert config.DEFAULT_LIMITS == _compat.DEFAULT_LIMITS, "httpx default limits"


def test_host_router_accepts_every_argument_of_async_client() -> None:
    ours = inspect.signature(hostpool.HostRouter.__init__).parameters
    theirs = inspect.signature(httpx.AsyncClient.__init__).parameters
    missing = set(theirs) - set(ours)
    assert not missing, f"httpx.AsyncClient has new arguments: {sorted(missing)}"
    for name, parameter in theirs.items():
        if name in ("self", "limits"):
            continue
        assert ours[name].default == parameter.default, f"default of {name!r} differs"


def test_no_module_but_compat_touches_httpx_or_httpcore_internals() -> None:
    package = pathlib.Path(hostpool.__file__).parent
    private = re.compile(r"\b(httpx|httpcore)\._[a-z]")
    offenders = [
        f"{path.name}:{number}"
        for path in sorted(package.glob("*.py"))
        if path.name != "_compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not offenders


async def test_url_strings_are_parsed_once_and_follow_base_url() -> None:
    seen: list[str] = []

    def app(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200)

    async with hostpool.HostRouter(
        transport=httpx.MockTransport(app), base_url="http://a.test/v1/"
    ) as router:
        first = router._merge_url("/x?q=1")
        assert router._merge_url("/x?q=1") is first, "parsed once"
        assert str(first) == "http://a.test/v1/x?q=1"
        await router.get("/x?q=1")
        await router.get("http://b.test/y")
        # A new base_url: the same string now means another URL.
        router.base_url = "http://c.test/v2/"
        assert str(router.build_request("GET", "/x?q=1").url) == "http://c.test/v2/x?q=1"
        await router.get("/x?q=1")
        # URL objects and params are httpx's own way, untouched.
        url = httpx.URL("http://d.test/z")
        assert router.build_request("GET", url).url == url
        params = router.build_request("GET", "http://b.test/y", params={"k": "v"}).url
        assert str(params) == "http://b.test/y?k=v"
        assert str(router.build_request("GET", "http://b.test/y").url) == "http://b.test/y"
        # A string that does not parse fails every time, and is not kept.
        for _ in range(2):
            with pytest.raises(httpx.InvalidURL):
                router.build_request("GET", "http://[::1/")
    assert seen == ["http://a.test/v1/x?q=1", "http://b.test/y", "http://c.test/v2/x?q=1"]


def test_the_url_cache_stays_bounded() -> None:
    router = hostpool.HostRouter()
    for i in range(_compat.URL_CACHE_SIZE * 3):
        assert str(router.build_request("GET", f"http://h{i}.test/").url) == f"http://h{i}.test/"
        assert len(router._hp_urls) <= _compat.URL_CACHE_SIZE


class _Pieces(httpx.AsyncByteStream):
    """A response body in given pieces, optionally failing after them; says if closed."""

    def __init__(self, pieces: list[bytes], fail: Exception | None = None) -> None:
        self.pieces, self.fail, self.closed = pieces, fail, 0

    async def __aiter__(self) -> typing.AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece
        if self.fail is not None:
            raise self.fail

    async def aclose(self) -> None:
        self.closed += 1


_BODY = b"hostpool " * 2000
_GZIP = gzip.compress(_BODY)
_DEFLATE = zlib.compress(_BODY)

READS = {
    "identity, with an empty piece": ([], [b"ab", b"", b"cd"], None),
    "empty": ([], [], None),
    "gzip in pieces": (
        [("content-encoding", "gzip")],
        [_GZIP[:10], _GZIP[10:500], _GZIP[500:]],
        None,
    ),
    "deflate": ([("content-encoding", "deflate")], [_DEFLATE], None),
    "not gzip at all": ([("content-encoding", "gzip")], [b"not gzip"], None),
    "fails mid-way": ([], [b"ab"], httpx.ReadError("cut")),
    "fails with something else": ([], [b"ab"], ValueError("not httpx's")),
}


async def _read(how: str, headers: list[tuple[str, str]], pieces: list[bytes], fail: Any) -> Any:
    request = httpx.Request("GET", "http://a.test/")
    stream = _Pieces(list(pieces), fail)
    response = httpx.Response(200, headers=headers, stream=stream, request=request)
    try:
        if how == "httpx":
            content: Any = await response.aread()
        else:
            content = await _compat.read_body(response)
        outcome: Any = ("content", content, response.content)
    except Exception as exc:
        tagged = getattr(exc, "_request", None) is request
        outcome = ("error", type(exc), str(exc), tagged)
    return (
        outcome,
        response.num_bytes_downloaded,
        response.is_stream_consumed,
        response.is_closed,
        stream.closed,
    )


@pytest.mark.parametrize("case", READS.values(), ids=READS.keys())
async def test_read_body_is_aread(case: Any) -> None:
    # What read_body leaves in the response (content, counters, flags, a
    # closed stream, the error and the request it names) is what aread leaves.
    assert await _read("ours", *case) == await _read("httpx", *case)


async def test_read_body_refuses_what_aread_refuses() -> None:
    response = httpx.Response(200, stream=_Pieces([b"x"]))
    await _compat.read_body(response)
    assert await _compat.read_body(response) == b"x"  # read: the content again
    consumed = httpx.Response(200, stream=_Pieces([b"x"]))
    async for _ in consumed.aiter_raw():
        pass
    with pytest.raises(httpx.StreamConsumed):
        await _compat.read_body(consumed)
    closed = httpx.Response(200, stream=_Pieces([b"x"]))
    await closed.aclose()
    with pytest.raises(httpx.StreamClosed):
        await _compat.read_body(closed)

"""HostRouter where ``httpx.AsyncClient`` runs: the user's transports, mocks, proxies.

Each test runs the same scenario through ``httpx.AsyncClient`` and through
``HostRouter`` and asserts the two behave alike (where the router adds
something, quotas, that is asserted too).
"""

from __future__ import annotations

import functools
import warnings
from types import TracebackType
from typing import Any

import anyio
import httpx
import pytest
import respx
from respx.transports import MockTransport as RespxMockTransport

from hostpool import HostRouter

pytestmark = pytest.mark.anyio

CLIENTS = [
    pytest.param(httpx.AsyncClient, id="AsyncClient"),
    pytest.param(HostRouter, id="HostRouter"),
]

PROXY = "http://127.0.0.9:1"  # nothing listens there: a request that escapes the mock fails


# -- the lifecycle of the user's transports --------------------------------------


class Gate:
    """A mock handler that holds every request until released, counting how many are inside."""

    def __init__(self) -> None:
        self.inside = 0
        self.peak = 0
        self.release = anyio.Event()

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        await self.release.wait()
        self.inside -= 1
        return httpx.Response(200)


class Recording(httpx.AsyncBaseTransport):
    """A transport that writes down every lifecycle call it receives."""

    def __init__(self, name: str, log: list[tuple[str, ...]]) -> None:
        self.name = name
        self.log = log

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=self.name)

    async def __aenter__(self) -> Recording:
        self.log.append(("enter", self.name))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        name = "-" if exc_type is None else exc_type.__name__
        self.log.append(("exit", self.name, name, str(exc_value)))

    async def aclose(self) -> None:
        self.log.append(("aclose", self.name))


class RecordingHTTP(httpx.AsyncHTTPTransport):
    """A subclass of httpx's own transport, as users write for retries or tracing."""

    def __init__(self, log: list[tuple[str, ...]]) -> None:
        super().__init__()
        self.log = log

    async def __aenter__(self) -> RecordingHTTP:
        self.log.append(("enter", "http"))
        await super().__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.log.append(("exit", "http", getattr(exc_info[0], "__name__", "-")))
        await super().__aexit__(*exc_info)


def _lifecycle(client_class: type[httpx.AsyncClient], log: list[tuple[str, ...]]) -> Any:
    return client_class(
        transport=Recording("main", log),
        mounts={
            "https://b.example": Recording("b", log),
            "https://a.example": RecordingHTTP(log),
            "https://c.example": None,
        },
    )


async def _run_lifecycle(
    client_class: type[httpx.AsyncClient], *, fail: bool
) -> list[tuple[str, ...]]:
    log: list[tuple[str, ...]] = []
    with pytest.raises(ValueError) if fail else _nothing():
        async with _lifecycle(client_class, log) as client:
            assert (await client.get("https://main.example/")).text == "main"
            assert (await client.get("https://b.example/")).text == "b"
            if fail:
                raise ValueError("boom")
    return log


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


@pytest.mark.parametrize("fail", [False, True], ids=["clean", "raised"])
async def test_transports_and_mounts_are_entered_and_exited_as_async_client_does(
    fail: bool,
) -> None:
    expected = await _run_lifecycle(httpx.AsyncClient, fail=fail)
    seen = await _run_lifecycle(HostRouter, fail=fail)
    assert seen == expected
    # What httpx does, spelt out: enter all, exit all with the exception, no aclose.
    assert [entry[0] for entry in seen] == ["enter"] * 3 + ["exit"] * 3
    exited = {entry[1]: entry[2] for entry in seen if entry[0] == "exit"}
    assert exited == (
        {"main": "ValueError", "b": "ValueError", "http": "ValueError"}
        if fail
        else {"main": "-", "b": "-", "http": "-"}
    )


@pytest.mark.parametrize("client_class", CLIENTS)
async def test_aclose_closes_the_users_transports_without_exiting_them(
    client_class: type[httpx.AsyncClient],
) -> None:
    log: list[tuple[str, ...]] = []
    client = _lifecycle(client_class, log)
    await client.get("https://main.example/")
    await client.aclose()
    assert log == [("aclose", "main"), ("aclose", "b")]


def _respx_transport(**kwargs: Any) -> tuple[httpx.AsyncBaseTransport, respx.Router]:
    router = respx.Router(**kwargs)
    router.get("https://api.example/called").respond(200)
    router.get("https://api.example/never").respond(200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # respx's MockTransport
        return RespxMockTransport(router=router), router


@pytest.mark.parametrize("client_class", CLIENTS)
async def test_respx_assert_all_called_fails_on_exit_for_an_uncalled_route(
    client_class: type[httpx.AsyncClient],
) -> None:
    transport, _ = _respx_transport(assert_all_called=True)
    with pytest.raises(AssertionError, match="not called"):
        async with client_class(transport=transport) as client:
            assert (await client.get("https://api.example/called")).status_code == 200


@pytest.mark.parametrize("client_class", CLIENTS)
async def test_respx_assert_all_called_is_skipped_when_the_block_raised(
    client_class: type[httpx.AsyncClient],
) -> None:
    # respx checks only on a clean exit: the user's own error is what surfaces.
    transport, _ = _respx_transport(assert_all_called=True)
    client = client_class(transport=transport)
    with pytest.raises(KeyError):
        await _use_then_raise(client, KeyError("the user's error"))


async def _use_then_raise(client: httpx.AsyncClient, error: Exception) -> None:
    async with client:
        await client.get("https://api.example/called")
        raise error


async def test_respx_mock_transport_keeps_quotas() -> None:
    gate = Gate()

    mock = respx.Router()
    mock.get("https://slow.example/").mock(side_effect=gate.handler)
    client = HostRouter(
        transport=httpx.MockTransport(mock.async_handler), quotas={"slow.example": 2}
    )
    async with client, anyio.create_task_group() as group:
        for _ in range(5):
            group.start_soon(client.get, "https://slow.example/")
        with anyio.fail_after(5):
            while client.stats().waiting < 3:
                await anyio.sleep(0.005)
        assert gate.inside == 2
        gate.release.set()
    assert gate.peak == 2


# -- proxies under mocks ------------------------------------------------------------


def _proxied(client_class: type[httpx.AsyncClient], how: str, **kwargs: Any) -> Any:
    if how == "proxy=":
        return client_class(proxy=PROXY, **kwargs)
    if how == "mounts=":
        return client_class(mounts={"all://": httpx.AsyncHTTPTransport(proxy=PROXY)}, **kwargs)
    assert how == "trust_env"
    return client_class(trust_env=True, **kwargs)


PROXY_SETUPS = ["proxy=", "mounts=", "trust_env"]


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy in the environment (only the trust_env case reads it)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", PROXY)
    monkeypatch.setenv("HTTP_PROXY", PROXY)


@pytest.mark.usefixtures("proxy_env")
@pytest.mark.parametrize("how", PROXY_SETUPS)
@pytest.mark.parametrize("client_class", CLIENTS)
@pytest.mark.parametrize("url", ["https://foo.bar/x", "http://foo.bar/x"], ids=["https", "http"])
async def test_respx_intercepts_proxied_requests(
    client_class: type[httpx.AsyncClient], how: str, url: str
) -> None:
    with respx.mock(assert_all_called=True) as mock:
        route = mock.get(url).respond(200, text="mocked")
        async with _proxied(client_class, how) as client:
            response = await client.get(url)
    assert response.text == "mocked"
    assert route.call_count == 1


@pytest.mark.usefixtures("proxy_env")
@pytest.mark.parametrize("how", PROXY_SETUPS)
async def test_respx_proxied_requests_keep_their_quota(how: str) -> None:
    gate = Gate()

    with respx.mock() as mock:
        mock.get("https://foo.bar/").mock(side_effect=gate.handler)
        client = _proxied(HostRouter, how, quotas={"foo.bar": 2})
        async with client, anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(client.get, "https://foo.bar/")
            with anyio.fail_after(5):
                while client.stats().waiting < 3:
                    await anyio.sleep(0.005)
            assert gate.inside == 2
            gate.release.set()
    assert gate.peak == 2


@pytest.mark.usefixtures("proxy_env")
@pytest.mark.parametrize("how", PROXY_SETUPS)
@pytest.mark.parametrize("client_class", CLIENTS)
async def test_pytest_httpx_matches_the_proxy_url(
    client_class: type[httpx.AsyncClient], how: str, httpx_mock: Any
) -> None:
    httpx_mock.add_response(url="https://foo.bar/x", proxy_url=PROXY + "/", text="via proxy")
    async with _proxied(client_class, how) as client:
        response = await client.get("https://foo.bar/x")
    assert response.text == "via proxy"
    request = httpx_mock.get_request()
    assert request is not None and str(request.url) == "https://foo.bar/x"


@pytest.mark.parametrize("client_class", CLIENTS)
async def test_pytest_httpx_without_a_proxy_does_not_match_a_proxy_url(
    client_class: type[httpx.AsyncClient], httpx_mock: Any
) -> None:
    httpx_mock.add_response(url="https://foo.bar/x", proxy_url=PROXY + "/", is_optional=True)
    httpx_mock.add_response(url="https://foo.bar/x", text="direct")
    async with client_class(trust_env=False) as client:
        assert (await client.get("https://foo.bar/x")).text == "direct"


def _trace_httpx(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Wrap httpx's transport method as OpenTelemetry's and Logfire's instrumentation do
    (the original kept as ``__wrapped__``); return the URLs it sees."""
    original = httpx.AsyncHTTPTransport.handle_async_request
    traced: list[str] = []

    @functools.wraps(original)
    async def tracing(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        traced.append(str(request.url))
        return await original(self, request)

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", tracing)
    return traced


async def test_a_tracing_wrapper_on_httpx_keeps_hostpools_own_pools(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The shape of OpenTelemetry's and Logfire's httpx instrumentation: the
    # transport method wrapped, the original kept as __wrapped__. Requests
    # are traced, and still go through the partition's own pool.
    from upstream import Upstream

    traced = _trace_httpx(monkeypatch)
    with Upstream.start(hosts=("127.0.0.1",)) as upstream:
        url = upstream.url("127.0.0.1", "/ok")
        async with HostRouter(quotas={"127.0.0.1": 2}) as client:
            for _ in range(3):
                assert (await client.get(url)).text == "ok"
            partition = client.stats().partitions["127.0.0.1"]
    assert traced == [url] * 3
    assert partition.connections_opened == 1 and partition.sockets_idle == 1
    assert upstream.stats("127.0.0.1").accepted == 1


async def test_under_a_tracing_wrapper_failures_are_httpx_s_and_leak_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The traced way goes through httpx's own transport method over the
    # partition's pool (its httpcore face): errors in the head and in the
    # body come out as with httpx.AsyncClient, and every slot and socket
    # comes back.
    from upstream import Upstream

    async def outcomes(client: httpx.AsyncClient, upstream: Any) -> list[Any]:
        seen: list[Any] = []
        for path in ("/garbage", "/stall-body?bytes=10&length=1000", "/reset", "/ok"):
            try:
                response = await client.get(upstream.url("127.0.0.1", path))
            except httpx.HTTPError as exc:
                seen.append((type(exc), exc.request.url.path))
            else:
                seen.append(response.text)
        return seen

    timeout = httpx.Timeout(5.0, read=0.3)
    with Upstream.start(hosts=("127.0.0.1",)) as upstream:
        async with httpx.AsyncClient(timeout=timeout) as client:
            expected = await outcomes(client, upstream)
        traced = _trace_httpx(monkeypatch)
        async with HostRouter(quotas={"127.0.0.1": 2}, timeout=timeout) as router:
            assert await outcomes(router, upstream) == expected
            stats = router.stats()
            partition = stats.partitions["127.0.0.1"]
            assert (stats.in_flight, partition.sockets_open, partition.sockets_idle) == (0, 1, 1)
    assert expected[-1] == "ok" and len(traced) == 4


class _BrokenCloseStream(httpx.AsyncByteStream):
    """A body whose close fails, as a user's transport's may."""

    def __init__(self, log: list[str], name: str, fail: bool) -> None:
        self.log, self.name, self.fail = log, name, fail

    async def __aiter__(self) -> Any:
        yield b"x"

    async def aclose(self) -> None:
        self.log.append(self.name)
        if self.fail:
            raise OSError(f"{self.name} cannot close")


async def test_closing_the_router_closes_every_body_even_when_they_fail() -> None:
    closed: list[str] = []
    names = iter(["first", "second", "third"])

    def handler(request: httpx.Request) -> httpx.Response:
        name = next(names)
        return httpx.Response(200, stream=_BrokenCloseStream(closed, name, fail=True))

    client = HostRouter(transport=httpx.MockTransport(handler))
    for host in ("a.example", "b.example", "c.example"):
        await client.send(client.build_request("GET", f"https://{host}/"), stream=True)
    assert client.stats().in_flight == 3
    with pytest.raises(OSError, match="cannot close"):
        await client.aclose()
    assert sorted(closed) == ["first", "second", "third"]
    stats = client.stats()
    assert (stats.in_flight, stats.waiting) == (0, 0)


def test_a_transport_of_another_router_is_refused_at_construction() -> None:
    first = HostRouter(transport=httpx.MockTransport(lambda request: httpx.Response(200)))
    with pytest.raises(ValueError, match="belongs to another HostRouter"):
        HostRouter(transport=first._transport)
    with pytest.raises(ValueError, match="belongs to another HostRouter"):
        HostRouter(mounts={"https://x.example": first._transport})

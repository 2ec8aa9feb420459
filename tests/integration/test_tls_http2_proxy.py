"""HostRouter over TLS, HTTP/2 and HTTP proxies, checked from the server's side.

Connections are made by the httpcore pool that ``httpx.AsyncHTTPTransport``
builds, so certificates, ALPN, HTTP/2 multiplexing, forward proxies and
CONNECT tunnels should behave as in httpx, with hostpool's quotas (requests in
flight per host) and socket ceiling on top. The TLS upstream and the proxy
(``tests/tls_upstream.py``) count connections, streams and forwarded requests.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
from tls_upstream import ForwardProxy, TestTLS, TLSUpstream, make_tls
from upstream import Upstream

from hostpool import HostRouter
from hostpool._stream import AsyncioStream

pytestmark = pytest.mark.anyio

H1, H2, H3 = "127.0.0.1", "127.0.0.2", "127.0.0.3"


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tls() -> TestTLS:
    """A throw-away CA and a certificate for the loopback addresses."""
    return make_tls()


@pytest.fixture
def tls_upstream(tls: TestTLS) -> Iterator[TLSUpstream]:
    """HTTPS (h2 + http/1.1) on 127.0.0.1 .. 127.0.0.3, one port for all."""
    with TLSUpstream.start(tls) as server:
        yield server


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    """A forward HTTP proxy (absolute-form and CONNECT) on 127.0.0.1."""
    with ForwardProxy.start("127.0.0.1") as server:
        yield server


def tls_router(tls: TestTLS, **kwargs: object) -> HostRouter:
    """A router that trusts the test CA (a fresh SSL context: httpcore sets ALPN on it)."""
    return HostRouter(verify=tls.client_context(), trust_env=False, **kwargs)  # type: ignore[arg-type]


@asynccontextmanager
async def concurrently(
    router: HostRouter, urls: list[str], results: list[httpx.Response | Exception]
) -> AsyncIterator[None]:
    """Send every URL at once; the body runs while they are in flight; exit waits for all."""

    async def one(url: str) -> None:
        try:
            results.append(await router.get(url))
        except Exception as exc:
            results.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for url in urls:
                tg.start_soon(one, url)
            yield


def waiting(router: HostRouter, key: str) -> int:
    partition = router.stats().partitions.get(key)
    return 0 if partition is None else partition.waiting


def versions(results: list[httpx.Response | Exception]) -> set[object]:
    """HTTP versions of the responses, or the exceptions themselves."""
    return {r.http_version if isinstance(r, httpx.Response) else r for r in results}


# -- TLS and ALPN ---------------------------------------------------------------


async def test_https_get_over_http1_verifies_the_server_with_the_given_ssl_context(
    tls: TestTLS, tls_upstream: TLSUpstream, anyio_backend_name: str
) -> None:
    async with tls_router(tls, http2=False) as router:
        response = await router.get(tls_upstream.url(H1, "/ok"))
    # Direct connections run on hostpool's asyncio stream (TLS by asyncio's start_tls).
    stream = response.extensions["network_stream"]
    assert isinstance(stream, AsyncioStream) == (anyio_backend_name == "asyncio")
    assert stream.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    assert response.status_code == 200
    assert response.text == "ok"
    assert response.http_version == "HTTP/1.1"
    assert response.headers["x-upstream-proto"] == "http/1.1"
    assert tls_upstream.stats(H1).h1_connections == 1


async def test_https_get_with_http2_enabled_negotiates_h2(
    tls: TestTLS, tls_upstream: TLSUpstream, anyio_backend_name: str
) -> None:
    async with tls_router(tls, http2=True) as router:
        response = await router.get(tls_upstream.url(H1, "/ok"))
        stream = response.extensions["network_stream"]
        assert isinstance(stream, AsyncioStream) == (anyio_backend_name == "asyncio")
        assert stream.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"
        assert response.headers["x-upstream-proto"] == "h2"
        assert router.stats().partitions[H1].sockets_open == 1
    assert tls_upstream.stats(H1).h2_connections == 1


async def test_a_certificate_from_an_untrusted_ca_raises_connect_error_and_leaks_nothing(
    tls_upstream: TLSUpstream,
) -> None:
    # verify=True (the default): the test CA is not in certifi's bundle.
    async with HostRouter(http2=True, trust_env=False) as router:
        with anyio.fail_after(5), pytest.raises(httpx.ConnectError):
            await router.get(tls_upstream.url(H1, "/ok"))
        stats = router.stats()
        assert stats.in_flight == 0
        assert stats.waiting == 0
        assert stats.sockets_open == 0
        assert stats.sockets_idle == 0
        assert stats.partitions[H1].sockets_open == 0
        assert stats.partitions[H1].requests_failed == 1
    await tls_upstream.wait_until(
        lambda: (
            tls_upstream.stats(H1).handshake_failures == 1
            and tls_upstream.total().open_sockets == 0
        )
    )
    assert tls_upstream.stats(H1).requests == 0


async def test_concurrent_requests_sharing_a_failing_http2_connection_all_fail_cleanly(
    tls_upstream: TLSUpstream,
) -> None:
    results: list[httpx.Response | Exception] = []
    async with HostRouter(http2=True, trust_env=False, quotas={H1: 5}) as router:
        async with concurrently(router, [tls_upstream.url(H1, "/ok")] * 5, results):
            pass
        assert len(results) == 5
        assert all(isinstance(r, httpx.ConnectError) for r in results), results
        stats = router.stats()
        assert stats.in_flight == 0
        assert stats.sockets_open == 0
        assert stats.partitions[H1].requests_failed == 5
    await tls_upstream.wait_until(
        lambda: (
            tls_upstream.stats(H1).handshake_failures == tls_upstream.stats(H1).accepted
            and tls_upstream.total().open_sockets == 0
        )
    )
    assert tls_upstream.stats(H1).requests == 0


# -- HTTP/2: quotas cap requests (streams), not sockets ------------------------


async def test_http2_quota_caps_streams_in_flight_at_the_server(
    tls: TestTLS, tls_upstream: TLSUpstream
) -> None:
    results: list[httpx.Response | Exception] = []
    async with tls_router(tls, http2=True, quotas={H1: 3}) as router:
        urls = [tls_upstream.url(H1, "/hold?key=q")] * 10
        async with concurrently(router, urls, results):
            await tls_upstream.wait_until(
                lambda: tls_upstream.held("q") == 3 and waiting(router, H1) == 7
            )
            assert tls_upstream.stats(H1).streams_in_flight == 3
            assert router.stats().partitions[H1].in_flight == 3
            tls_upstream.release("q")
    assert versions(results) == {"HTTP/2"}
    stats = tls_upstream.stats(H1)
    assert stats.peak_streams_in_flight == 3
    assert stats.completed == 10
    assert stats.accepted == stats.h2_connections


async def test_concurrent_http2_requests_to_one_host_share_one_connection(
    tls: TestTLS, tls_upstream: TLSUpstream
) -> None:
    results: list[httpx.Response | Exception] = []
    async with tls_router(tls, http2=True, quotas={H1: 3}) as router:
        urls = [tls_upstream.url(H1, "/hold?key=q")] * 10
        async with concurrently(router, urls, results):
            await tls_upstream.wait_until(lambda: tls_upstream.held("q") == 3)
            tls_upstream.release("q")
    assert versions(results) == {"HTTP/2"}
    stats = tls_upstream.stats(H1)
    assert stats.accepted == 1
    assert stats.peak_streams_per_connection == 3
    assert stats.completed == 10


async def test_requests_multiplex_on_an_established_http2_connection(
    tls: TestTLS, tls_upstream: TLSUpstream
) -> None:
    results: list[httpx.Response | Exception] = []
    async with tls_router(tls, http2=True, quotas={H1: 3}) as router:
        warm = await router.get(tls_upstream.url(H1, "/ok"))
        assert warm.http_version == "HTTP/2"
        urls = [tls_upstream.url(H1, "/hold?key=m")] * 3
        async with concurrently(router, urls, results):
            await tls_upstream.wait_until(lambda: tls_upstream.held("m") == 3)
            # ALPN is long known: all three streams should ride the warm connection.
            assert tls_upstream.stats(H1).accepted == 1
            assert tls_upstream.stats(H1).streams_in_flight == 3
            tls_upstream.release("m")
    assert versions(results) == {"HTTP/2"}


async def test_an_http2_flood_on_one_host_does_not_delay_another_host(
    tls: TestTLS, tls_upstream: TLSUpstream
) -> None:
    results: list[httpx.Response | Exception] = []
    async with (
        tls_router(tls, http2=True, quotas={H1: 4}) as router,
        concurrently(router, [tls_upstream.url(H1, "/hold?key=f")] * 20, results),
    ):
        await tls_upstream.wait_until(
            lambda: tls_upstream.held("f") == 4 and waiting(router, H1) == 16
        )
        with anyio.fail_after(2):
            response = await router.get(tls_upstream.url(H2, "/ok"))
        assert response.http_version == "HTTP/2"
        # Served while the flood was still held and queued.
        assert tls_upstream.held("f") == 4
        assert waiting(router, H1) == 16
        tls_upstream.release("f")
    assert versions(results) == {"HTTP/2"}
    assert tls_upstream.stats(H1).peak_streams_in_flight == 4


async def test_http2_enabled_against_an_http1_only_server_falls_back_and_keeps_the_quota(
    tls: TestTLS,
) -> None:
    results: list[httpx.Response | Exception] = []
    with TLSUpstream.start(tls, alpn=("http/1.1",)) as server:
        async with (
            tls_router(tls, http2=True, quotas={H1: 3}) as router,
            concurrently(router, [server.url(H1, "/hold?key=h")] * 6, results),
        ):
            await server.wait_until(lambda: server.held("h") == 3 and waiting(router, H1) == 3)
            server.release("h")
        assert versions(results) == {"HTTP/1.1"}
        stats = server.stats(H1)
        assert stats.peak_in_flight == 3
        assert stats.h2_connections == 0
        assert 1 <= stats.h1_connections <= 3


async def test_a_server_stream_limit_below_the_quota_still_serves_every_request(
    tls: TestTLS,
) -> None:
    results: list[httpx.Response | Exception] = []
    with TLSUpstream.start(tls, max_concurrent_streams=2) as server:
        async with tls_router(tls, http2=True, quotas={H1: 4}) as router:
            async with concurrently(router, [server.url(H1, "/hold?key=s")] * 8, results):
                await server.wait_until(lambda: waiting(router, H1) == 4 and server.held("s") >= 2)
                server.release("s")
            assert router.stats().in_flight == 0
        assert versions(results) == {"HTTP/2"}
        stats = server.stats(H1)
        assert stats.completed == 8
        assert stats.peak_streams_per_connection <= 2
        assert stats.peak_streams_in_flight <= 4


async def test_cancelling_held_http2_requests_returns_their_slots(
    tls: TestTLS, tls_upstream: TLSUpstream
) -> None:
    async with tls_router(tls, http2=True, quotas={H1: 3}) as router:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(router.get, tls_upstream.url(H1, "/hold?key=c"))
                # Cancel only once every client has acknowledged the server's
                # SETTINGS: a cancellation that lands while httpcore writes that
                # ACK leaves a broken connection that httpcore still reports as
                # available (an httpcore issue, plain httpx included).
                await tls_upstream.wait_until(
                    lambda: (
                        tls_upstream.held("c") == 3
                        and waiting(router, H1) == 2
                        and tls_upstream.stats(H1).settings_acked
                        == tls_upstream.stats(H1).h2_connections
                    )
                )
                tg.cancel_scope.cancel()
        stats = router.stats()
        assert stats.in_flight == 0
        assert stats.waiting == 0
        assert stats.sockets_open <= 3
        # The partition still works, on HTTP/2.
        with anyio.fail_after(5):
            response = await router.get(tls_upstream.url(H1, "/ok"))
        assert response.http_version == "HTTP/2"
    # Closing the router closes every connection, so the server forgets the streams.
    await tls_upstream.wait_until(
        lambda: tls_upstream.total().open_sockets == 0 and tls_upstream.total().in_flight == 0
    )


async def test_a_mounted_https_transport_keeps_its_tls_and_http2_settings(
    tls: TestTLS, tls_upstream: TLSUpstream
) -> None:
    mounted = httpx.AsyncHTTPTransport(verify=tls.client_context(), http2=True)
    # The router's own transport uses verify=True, which rejects the test CA.
    async with HostRouter(mounts={"https://127.0.0.2": mounted}, trust_env=False) as router:
        response = await router.get(tls_upstream.url(H2, "/ok"))
        assert response.http_version == "HTTP/2"
        with anyio.fail_after(5), pytest.raises(httpx.ConnectError):
            await router.get(tls_upstream.url(H1, "/ok"))
        stats = router.stats()
        assert stats.in_flight == 0
        assert stats.sockets_open == 1
        assert stats.partitions[H2].sockets_idle == 1


# -- socket ceiling with TLS ---------------------------------------------------------


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_the_socket_ceiling_closes_the_least_recently_used_idle_tls_socket(
    tls: TestTLS, tls_upstream: TLSUpstream, http2: bool
) -> None:
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
    async with tls_router(tls, http2=http2, limits=limits) as router:
        for host in (H1, H2, H3):
            response = await router.get(tls_upstream.url(host, "/ok"))
            assert response.status_code == 200
        # H1's idle socket was the least recently used: closed to make room for H3.
        await tls_upstream.wait_until(lambda: tls_upstream.stats(H1).open_sockets == 0)
        assert tls_upstream.stats(H2).open_sockets == 1
        assert tls_upstream.stats(H3).open_sockets == 1
        assert tls_upstream.total().peak_open_sockets <= 2
        stats = router.stats()
        assert stats.sockets_open == 2
        assert stats.sockets_idle == 2
        assert stats.evictions == 1
        # Using H1 again evicts H2 now, and never exceeds the ceiling.
        response = await router.get(tls_upstream.url(H1, "/ok"))
        assert response.status_code == 200
        await tls_upstream.wait_until(lambda: tls_upstream.stats(H2).open_sockets == 0)
        assert tls_upstream.total().peak_open_sockets <= 2
        assert router.stats().sockets_open == 2
    await tls_upstream.wait_until(lambda: tls_upstream.total().open_sockets == 0)


# -- HTTP proxies ------------------------------------------------------------------


async def test_a_proxied_router_applies_quotas_by_target_host_not_by_proxy(
    upstream: Upstream, proxy: ForwardProxy
) -> None:
    results: list[httpx.Response | Exception] = []
    async with HostRouter(proxy=proxy.url, quotas={H2: 2}, trust_env=False) as router:
        async with concurrently(router, [upstream.url(H2, "/hold?key=p")] * 6, results):
            await upstream.wait_until(lambda: upstream.held("p") == 2 and waiting(router, H2) == 4)
            assert proxy.stats().forwarded_in_flight == 2
            assert set(router.stats().partitions) == {H2}
            upstream.release("p")
        assert {r.status_code for r in results if isinstance(r, httpx.Response)} == {200}
        assert len(results) == 6
        assert set(router.stats().partitions) == {H2}
        assert router.stats().partitions[H2].requests_completed == 6
    assert upstream.stats(H2).peak_in_flight == 2
    assert upstream.stats(H2).completed == 6
    assert upstream.stats(H1).requests == 0  # the proxy's address is not the target
    stats = proxy.stats()
    assert stats.forwarded == 6
    assert stats.to(f"{H2}:{upstream.port(H2)}") == 6
    assert stats.peak_forwarded_in_flight == 2
    assert stats.tunnels == 0


async def test_https_through_a_proxy_tunnels_with_connect_and_speaks_http2(
    tls: TestTLS, tls_upstream: TLSUpstream, proxy: ForwardProxy
) -> None:
    results: list[httpx.Response | Exception] = []
    async with tls_router(tls, proxy=proxy.url, http2=True, quotas={H2: 2}) as router:
        response = await router.get(tls_upstream.url(H2, "/ok"))
        assert response.http_version == "HTTP/2"
        # Proxied connections keep httpcore's stream (TLS inside the tunnel).
        assert not isinstance(response.extensions["network_stream"], AsyncioStream)
        async with concurrently(router, [tls_upstream.url(H2, "/hold?key=t")] * 5, results):
            await tls_upstream.wait_until(
                lambda: tls_upstream.held("t") == 2 and waiting(router, H2) == 3
            )
            tls_upstream.release("t")
        assert set(router.stats().partitions) == {H2}
    assert versions(results) == {"HTTP/2"}
    assert tls_upstream.stats(H2).peak_streams_in_flight == 2
    assert tls_upstream.stats(H1).accepted == 0
    stats = proxy.stats()
    assert stats.tunnels >= 1
    assert stats.to(f"{H2}:{tls_upstream.port}") == stats.tunnels
    assert stats.forwarded == 0
    # Every TLS connection the upstream saw came through a tunnel.
    assert tls_upstream.stats(H2).accepted == stats.tunnels


async def test_a_mounted_proxy_transport_carries_only_its_host(
    upstream: Upstream, proxy: ForwardProxy
) -> None:
    mounts = {"http://127.0.0.2": httpx.AsyncHTTPTransport(proxy=proxy.url)}
    async with HostRouter(mounts=mounts, trust_env=False) as router:
        via_proxy = await router.get(upstream.url(H2, "/ok"))
        direct = await router.get(upstream.url(H1, "/ok"))
        assert via_proxy.status_code == direct.status_code == 200
        stats = router.stats()
        assert set(stats.partitions) == {H1, H2}
        # Each partition keeps its idle socket: to the proxy for H2, direct for H1.
        assert stats.partitions[H1].sockets_idle == 1
        assert stats.partitions[H2].sockets_idle == 1
        assert stats.sockets_open == 2
    stats = proxy.stats()
    assert stats.forwarded == 1
    assert stats.to(f"{H2}:{upstream.port(H2)}") == 1
    assert stats.to(f"{H1}:{upstream.port(H1)}") == 0
    assert stats.connections == 1


async def test_a_mounted_proxy_transport_keeps_the_hosts_quota(
    upstream: Upstream, proxy: ForwardProxy
) -> None:
    mounts = {"http://127.0.0.2": httpx.AsyncHTTPTransport(proxy=proxy.url)}
    results: list[httpx.Response | Exception] = []
    async with (
        HostRouter(mounts=mounts, quotas={H2: 2}, trust_env=False) as router,
        concurrently(router, [upstream.url(H2, "/hold?key=m")] * 5, results),
    ):
        await upstream.wait_until(lambda: upstream.held("m") == 2 and waiting(router, H2) == 3)
        upstream.release("m")
    assert {r.status_code for r in results if isinstance(r, httpx.Response)} == {200}
    assert len(results) == 5
    assert upstream.stats(H2).peak_in_flight == 2
    assert proxy.stats().forwarded == 5
    assert proxy.stats().peak_forwarded_in_flight == 2


async def test_tls_connections_closed_by_either_side_log_nothing(
    tls: TestTLS, anyio_backend_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # asyncio's TLS transport warns when a protocol asks to keep its half
    # open after the peer's EOF; the stream must not ask that of it.
    caplog.set_level(logging.WARNING)
    async with tls_router(tls, http2=False) as router:
        with TLSUpstream.start(tls) as server:
            response = await router.get(server.url(H1, "/ok"))
            stream = response.extensions["network_stream"]
            assert isinstance(stream, AsyncioStream) == (anyio_backend_name == "asyncio")

        # The server has shut down: wait until its close has reached the idle
        # connection (for hostpool's stream: eof_received has run, which is
        # where asyncio would have warned).
        def closed_seen() -> bool:
            if isinstance(stream, AsyncioStream):
                return stream._protocol.eof
            return bool(stream.get_extra_info("is_readable"))

        with anyio.fail_after(5):
            while not closed_seen():
                await anyio.sleep(0.01)
    # And the client closing its side: a cancelled exchange, then an idle connection.
    with TLSUpstream.start(tls) as server:
        async with tls_router(tls, http2=False) as router:
            async with anyio.create_task_group() as tg:
                tg.start_soon(router.get, server.url(H1, "/hold?key=k"))
                await server.wait_until(lambda: server.held("k") == 1)
                tg.cancel_scope.cancel()
            await router.get(server.url(H1, "/ok"))
        server.release_all()
        for _ in range(3):  # let the transports' close callbacks run
            await anyio.lowlevel.checkpoint()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []

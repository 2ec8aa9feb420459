"""Tests of the loopback test server itself, using plain ``httpx`` only."""

from __future__ import annotations

import gc
import os
import threading
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import httpx
import pytest
from upstream import Upstream, expected_bytes, stalled_listener

pytestmark = pytest.mark.anyio

TIMEOUT = httpx.Timeout(5.0)


def _client(**kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=TIMEOUT, **kwargs)


async def test_all_hosts_share_one_port_and_urls_are_well_formed(
    upstream: Upstream,
) -> None:
    assert len({upstream.ports(h)[0] for h in upstream.hosts}) == 1
    port = upstream.port(0)
    assert upstream.url(1, "echo") == f"http://127.0.0.2:{port}/echo"
    assert upstream.url("127.0.0.5", "/ok?x=1") == f"http://127.0.0.5:{port}/ok?x=1"


async def test_ok_response_names_the_listener_it_arrived_on(upstream: Upstream) -> None:
    async with _client() as client:
        for i, host in enumerate(upstream.hosts):
            response = await client.get(upstream.url(i, "/ok"))
            assert response.status_code == 200
            assert response.text == "ok"
            assert response.headers["x-upstream-addr"] == f"{host}:{upstream.port(i)}"
    for host in upstream.hosts:
        stats = upstream.stats(host)
        assert (stats.accepted, stats.requests, stats.completed) == (1, 1, 1)
    assert upstream.total().requests == len(upstream.hosts)


async def test_concurrent_holds_are_counted_in_flight_and_released(
    upstream: Upstream,
) -> None:
    url = upstream.url("127.0.0.2", "/hold?key=five")
    async with _client() as client, anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(client.get, url)
        await upstream.wait_until(lambda: upstream.held("five") == 5)
        stats = upstream.stats("127.0.0.2")
        assert stats.in_flight == stats.peak_in_flight == 5
        await upstream.wait_until(lambda: upstream.stats(1).open_sockets == 5)
        assert upstream.stats("127.0.0.1").requests == 0
        upstream.release("five")
    await upstream.wait_until(lambda: upstream.stats(1).in_flight == 0)
    stats = upstream.stats("127.0.0.2")
    assert (stats.peak_in_flight, stats.completed) == (5, 5)
    assert upstream.total().peak_in_flight == 5


async def test_released_key_stays_released_until_rearmed(upstream: Upstream) -> None:
    upstream.release("k")
    async with _client() as client:
        assert (await client.get(upstream.url(0, "/hold?key=k"))).status_code == 200
        upstream.rearm("k")
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.get, upstream.url(0, "/hold?key=k"))
                await upstream.wait_until(lambda: upstream.held("k") == 1)
                upstream.release_all()
    assert upstream.held() == 0


async def test_release_one_lets_held_requests_go_oldest_first(upstream: Upstream) -> None:
    done: list[int] = []

    async def get(i: int) -> None:
        response = await client.get(upstream.url(0, f"/hold?key=q&i={i}"))
        done.append(i)
        assert response.status_code == 200

    async with _client() as client, anyio.create_task_group() as tg:
        tg.start_soon(get, 0)
        await upstream.wait_until(lambda: upstream.held("q") == 1)
        tg.start_soon(get, 1)
        await upstream.wait_until(lambda: upstream.held("q") == 2)
        tg.start_soon(get, 2)
        await upstream.wait_until(lambda: upstream.held("q") == 3)
        upstream.release_one("q")
        await upstream.wait_until(lambda: done == [0])
        assert upstream.held("q") == 2
        upstream.release_one("q", n=3)  # two held now, one credit left over
    assert sorted(done) == [0, 1, 2]
    async with _client() as client:
        assert (await client.get(upstream.url(0, "/hold?key=q"))).status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            await client.get(upstream.url(0, "/hold?key=q"), timeout=0.1)


async def test_in_flight_is_zero_once_the_client_has_the_response(
    upstream: Upstream,
) -> None:
    async with _client() as client:
        for _ in range(20):
            await client.get(upstream.url(0, "/ok"))
            assert upstream.total().in_flight == 0
    assert upstream.total().completed == 20
    assert upstream.total().accepted == 1


async def test_total_peak_is_concurrent_not_a_sum_of_peaks(upstream: Upstream) -> None:
    for i in range(3):
        async with _client() as client:
            await client.get(upstream.url(i, "/ok"))
        await upstream.wait_until(lambda: upstream.total().open_sockets == 0)
    assert [s.peak_open_sockets for s in upstream.all_stats().values()] == [
        1,
        1,
        1,
        0,
        0,
    ]
    assert upstream.total().peak_open_sockets == 1
    assert upstream.total().peak_in_flight == 1


async def test_reset_peaks_lowers_peaks_to_current_values(upstream: Upstream) -> None:
    async with _client() as client, anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(client.get, upstream.url(i, "/hold?key=a"))
        await upstream.wait_until(lambda: upstream.total().in_flight == 3)
        tg.start_soon(client.get, upstream.url(3, "/hold?key=b"))
        await upstream.wait_until(lambda: upstream.held("b") == 1)
        upstream.release("a")
        await upstream.wait_until(lambda: upstream.total().in_flight == 1)
        upstream.reset_peaks()
        assert upstream.total().peak_in_flight == 1
        assert upstream.stats(0).peak_in_flight == 0
        assert upstream.stats(3).peak_in_flight == 1
        upstream.release("b")
    upstream.reset_counters()
    assert upstream.total().requests == upstream.total().accepted == 0


async def test_connection_closed_without_a_request_is_accepted_then_closed(
    upstream: Upstream,
) -> None:
    stream = await anyio.connect_tcp("127.0.0.1", upstream.port(0))
    await stream.aclose()
    await upstream.wait_until(lambda: upstream.total().accepted == 1)
    await upstream.wait_until(lambda: upstream.total().open_sockets == 0)
    assert upstream.total().requests == 0


async def test_delay_waits_before_answering(upstream: Upstream) -> None:
    async with _client() as client:
        start = anyio.current_time()
        response = await client.get(upstream.url(0, "/delay?ms=100"))
        assert response.status_code == 200
        assert anyio.current_time() - start >= 0.09


async def test_reset_makes_httpx_raise(upstream: Upstream) -> None:
    async with _client() as client:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await client.get(upstream.url(0, "/reset"))
    await upstream.wait_until(lambda: upstream.total().open_sockets == 0)
    assert upstream.total().completed == 0


async def test_garbage_makes_httpx_raise_protocol_error(upstream: Upstream) -> None:
    async with _client() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(upstream.url(0, "/garbage"))


async def test_status_carries_retry_after(upstream: Upstream) -> None:
    async with _client() as client:
        response = await client.get(upstream.url(0, "/status?code=429&retry_after=2"))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"


async def test_close_after_forces_a_fresh_connection(upstream: Upstream) -> None:
    async with _client() as client:
        first = await client.get(upstream.url(0, "/close-after"))
        assert first.headers["connection"] == "keep-alive"
        await upstream.wait_until(lambda: upstream.total().open_sockets == 0)
        second = await client.get(upstream.url(0, "/ok"))
    assert second.status_code == 200
    assert second.headers["x-upstream-conn"] != first.headers["x-upstream-conn"]
    assert upstream.total().accepted == 2


async def test_close_now_sends_connection_close(upstream: Upstream) -> None:
    async with _client() as client:
        response = await client.get(upstream.url(0, "/close-now"))
    assert response.headers["connection"] == "close"
    await upstream.wait_until(lambda: upstream.total().open_sockets == 0)


async def test_stall_headers_times_out_and_server_sees_the_close(
    upstream: Upstream,
) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=0.2)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(upstream.url(0, "/stall-headers"))
    await upstream.wait_until(lambda: upstream.total().open_sockets == 0)
    assert upstream.total().in_flight == 0


async def test_stall_body_sends_a_partial_body(upstream: Upstream) -> None:
    received = b""
    url = upstream.url(0, "/stall-body?bytes=10")
    timeout = httpx.Timeout(5.0, read=0.2)
    async with (
        httpx.AsyncClient(timeout=timeout) as client,
        client.stream("GET", url) as response,
    ):
        assert response.headers["content-length"] == "1000"
        chunks = response.aiter_raw()
        received += await chunks.__anext__()
        with pytest.raises(httpx.ReadTimeout):
            await chunks.__anext__()
    assert received == expected_bytes(10)
    await upstream.wait_until(lambda: upstream.total().open_sockets == 0)
    assert (upstream.total().in_flight, upstream.total().completed) == (0, 0)


async def test_bytes_streams_the_expected_body(upstream: Upstream) -> None:
    async with _client() as client:
        url = upstream.url(0, "/bytes?n=100000&chunk=8192&delay_ms=1")
        response = await client.get(url)
    assert response.content == expected_bytes(100_000)


async def test_echo_describes_the_request(upstream: Upstream) -> None:
    async with _client() as client:
        response = await client.post(upstream.url(2, "/echo?a=1"), content=b"x" * 123)
    info = response.json()
    assert info["method"] == "POST"
    assert info["path"] == "/echo"
    assert info["query"] == "a=1"
    assert info["body_length"] == 123
    assert info["server"] == {"addr": "127.0.0.3", "port": upstream.port(2)}


async def test_chunked_request_body_is_read(upstream: Upstream) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"defg"

    async with _client() as client:
        response = await client.post(upstream.url(0, "/echo"), content=body())
    assert response.json()["body_length"] == 7


async def test_redirect_to_another_host_is_followed(upstream: Upstream) -> None:
    target = urllib.parse.quote(upstream.url(3, "/echo"), safe="")
    async with _client(follow_redirects=True) as client:
        response = await client.get(upstream.url(0, f"/redirect?to={target}&code=307"))
    assert response.history[0].status_code == 307
    assert response.json()["server"]["addr"] == "127.0.0.4"


async def test_ipv6_listener_answers(ipv6_upstream: Upstream) -> None:
    url = ipv6_upstream.url("::1", "/ok")
    assert url.startswith("http://[::1]:")
    async with _client() as client:
        response = await client.get(url)
    assert response.headers["x-upstream-addr"] == f"::1:{ipv6_upstream.port(0)}"
    assert ipv6_upstream.stats("::1").completed == 1


async def test_refused_url_gives_connect_error(refused_url: str) -> None:
    async with _client() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(refused_url)


async def test_stalled_listener_gives_connect_timeout() -> None:
    with stalled_listener() as (host, port):
        timeout = httpx.Timeout(5.0, connect=0.2)
        async with httpx.AsyncClient(timeout=timeout) as client:
            with pytest.raises(httpx.ConnectTimeout):
                await client.get(f"http://{host}:{port}/")


async def test_wait_until_times_out_with_the_stats_in_the_message(
    upstream: Upstream,
) -> None:
    with pytest.raises(TimeoutError, match=r"never_true.*\n.*total: Stats"):
        await upstream.wait_until(lambda: False, timeout=0.05, what="never_true")


async def test_many_ports_on_one_address_are_counted_separately() -> None:
    with Upstream.start(hosts=("127.0.0.1",), ports_per_host=200) as server:
        ports = server.ports("127.0.0.1")
        assert len(set(ports)) == 200
        async with _client() as client:
            for url in server.urls(0, "/ok")[:10]:
                await client.get(url)
        assert server.stats("127.0.0.1", ports[0]).completed == 1
        assert server.stats("127.0.0.1", ports[199]).completed == 0
        assert server.stats("127.0.0.1").completed == 10


async def test_hundreds_of_concurrent_connections(upstream: Upstream) -> None:
    # Thirty clients of ten connections each: httpcore's pool bookkeeping is
    # quadratic in its size, and this test is about the server, not httpx.
    async def ten_requests(client: httpx.AsyncClient, i: int) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(client.get, upstream.url(i % 5, "/hold?key=many"))

    async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
        for i in range(30):
            client = await stack.enter_async_context(_client())
            tg.start_soon(ten_requests, client, i)
        await upstream.wait_until(lambda: upstream.held("many") == 300, timeout=10)
        assert upstream.total().peak_open_sockets == 300
        assert upstream.stats(0).in_flight == 60
        upstream.release("many")
    assert upstream.total().completed == 300


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_stop_leaves_no_thread_or_socket_behind() -> None:
    gc.collect()
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    for _ in range(5):
        server = Upstream.start()
        with httpx.Client(timeout=TIMEOUT) as client:
            client.get(server.url(0, "/ok"))
            with pytest.raises(httpx.ReadTimeout):
                client.get(server.url(1, "/hold?key=x"), timeout=0.05)
        server.stop()
        server.stop()  # idempotent
    gc.collect()
    # Other threads (e.g. trio's idle worker cache) may exit meanwhile, hence
    # "no new thread" and "no more fds" rather than equality.
    assert set(threading.enumerate()) <= threads_before
    assert _open_fds() <= fds_before


def test_stop_closes_connections_that_are_still_active() -> None:
    server = Upstream.start(hosts=("127.0.0.1",))
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            httpx.get(server.url(0, "/hold?key=never"), timeout=5.0)
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=hold)
    thread.start()
    server.wait_until_sync(lambda: server.held("never") == 1)
    server.stop()
    thread.join(5.0)
    assert not thread.is_alive()
    assert len(errors) == 1

"""hostpool's asyncio network stream (``hostpool._stream``) on real loopback sockets.

Under asyncio, direct connections read and write through ``AsyncioStream``;
under trio (and through proxies) httpcore's own stream is used. Every test
here runs under both, so the two are held to the same behaviour; the checks
of the stream's internals (buffer bound, happy eyeballs) apply to asyncio.
The rest of the suite (faults, TLS, HTTP/2, the property tests) runs through
it too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import os
import socket
import socketserver
import struct
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpcore
import httpx
import pytest
from httpcore._backends.auto import AutoBackend
from upstream import Upstream, expected_bytes, refused_address, stalled_listener

from hostpool import HostRouter
from hostpool._stream import (
    _READ_HIGH_WATER,
    AsyncioBackend,
    AsyncioStream,
    _literal,
    _open_socket,
)

pytestmark = pytest.mark.anyio

H1, H2 = "127.0.0.1", "127.0.0.2"

# asyncio reads at most this much from a socket per callback (Python 3.11).
_MAX_SOCKET_READ = 256 * 1024


def is_ours(stream: object, anyio_backend_name: str) -> bool:
    """Tell whether ``stream`` is hostpool's, and check it is exactly when it should be."""
    ours = isinstance(stream, AsyncioStream)
    assert ours == (anyio_backend_name == "asyncio")
    return ours


def quiet(router: HostRouter) -> bool:
    stats = router.stats()
    return stats.in_flight == 0 and stats.waiting == 0


async def test_direct_connections_report_addresses_and_liveness(
    upstream: Upstream, anyio_backend_name: str
) -> None:
    async with HostRouter() as router:
        response = await router.get(upstream.url(H2, "/ok"))
        stream = response.extensions["network_stream"]
        is_ours(stream, anyio_backend_name)
        port = upstream.ports(H2)[0]
        assert stream.get_extra_info("server_addr")[:2] == (H2, port)
        assert stream.get_extra_info("client_addr")[0] == "127.0.0.1"
        assert stream.get_extra_info("ssl_object") is None
        assert stream.get_extra_info("socket").fileno() >= 0
        # An idle keep-alive connection with nothing sent to it is not readable...
        assert stream.get_extra_info("is_readable") is False
        # ...and one the server has closed is, so the pool does not reuse it.
        response = await router.get(upstream.url(H2, "/close-after?ms=0"))
        closing = response.extensions["network_stream"]
        with anyio.fail_after(5):
            while not closing.get_extra_info("is_readable"):
                await anyio.sleep(0.01)
        assert (await router.get(upstream.url(H2, "/ok"))).text == "ok"
        assert quiet(router)


async def test_an_idle_connection_is_readable_as_soon_as_the_socket_is(
    anyio_backend_name: str,
) -> None:
    # What the server sends to an idle connection makes it unfit for reuse
    # before the event loop has delivered it: the check asks the socket.
    unsolicited = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve() -> None:
            peer, _ = listener.accept()
            with peer:
                peer.recv(65536)
                peer.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                if unsolicited.wait(5):
                    peer.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
                    with contextlib.suppress(OSError):
                        peer.recv(1)  # until the client closes (or resets)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        async with HostRouter() as router:
            url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
            response = await router.get(url)
            stream = response.extensions["network_stream"]
            assert stream.get_extra_info("is_readable") is False
            unsolicited.set()
            # Blocking: the event loop does not run, so only the socket knows.
            deadline = time.monotonic() + 5
            while not stream.get_extra_info("is_readable") and time.monotonic() < deadline:
                time.sleep(0.01)  # noqa: ASYNC251 - on purpose: the loop must not run
            if is_ours(stream, anyio_backend_name):
                assert not stream._protocol.chunks, "the loop delivered it: not the socket's answer"
            assert stream.get_extra_info("is_readable") is True
        server.join(5)


async def test_a_large_body_read_slowly_keeps_the_read_buffer_bounded(
    upstream: Upstream, anyio_backend_name: str
) -> None:
    n = 8 * 1024 * 1024
    peak, paused = 0, False
    body = bytearray()
    async with HostRouter() as router:
        async with router.stream("GET", upstream.url(H1, f"/bytes?n={n}&chunk=65536")) as r:
            stream = r.extensions["network_stream"]
            ours = is_ours(stream, anyio_backend_name)
            async for chunk in r.aiter_raw():
                body += chunk
                if ours:
                    peak = max(peak, stream._protocol.buffered)
                    paused = paused or stream._protocol.reading_paused
                if len(body) < n // 4:
                    await anyio.sleep(0.002)  # a slow consumer while the server pushes
        assert bytes(body) == expected_bytes(n)
        assert quiet(router)
    if ours:
        assert paused, "the consumer was slow, so reading should have been paused"
        assert peak <= _READ_HIGH_WATER + _MAX_SOCKET_READ


async def test_a_large_upload_waits_for_the_reader_and_arrives_whole(upstream: Upstream) -> None:
    content = os.urandom(16 * 1024 * 1024)  # far above the transport's write buffer
    async with HostRouter() as router:
        response = await router.post(upstream.url(H1, "/echo"), content=content)
        info = response.json()
        assert info["body_length"] == len(content)
        assert info["body_sha256"] == hashlib.sha256(content).hexdigest()
        assert quiet(router)


async def test_a_peer_that_stops_reading_gets_a_write_timeout_and_keeps_nothing() -> None:
    with stalled_listener("127.0.0.1", fill=False) as (host, port):
        async with HostRouter() as router:
            started = time.monotonic()
            with pytest.raises(httpx.WriteTimeout):
                await router.post(
                    f"http://{host}:{port}/",
                    content=b"x" * (64 * 1024 * 1024),
                    timeout=httpx.Timeout(5.0, write=0.3),
                )
            assert time.monotonic() - started < 4.0
            stats = router.stats()
            assert quiet(router)
            assert stats.sockets_open == 0


async def test_a_read_timeout_is_raised_and_the_socket_closed(upstream: Upstream) -> None:
    async with HostRouter() as router:
        with pytest.raises(httpx.ReadTimeout):
            await router.get(
                upstream.url(H1, "/stall-headers"), timeout=httpx.Timeout(5.0, read=0.2)
            )
        assert quiet(router)
        assert router.stats().sockets_open == 0
    await upstream.wait_until(lambda: upstream.stats(H1).open_sockets == 0)


async def test_socket_options_and_local_address_of_the_transport_apply(
    upstream: Upstream, anyio_backend_name: str
) -> None:
    transport = httpx.AsyncHTTPTransport(
        local_address="127.0.0.3",
        socket_options=[(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)],
    )
    async with HostRouter(transport=transport) as router:
        response = await router.get(upstream.url(H1, "/echo"))
        assert response.json()["client"]["addr"] == "127.0.0.3"
        stream = response.extensions["network_stream"]
        is_ours(stream, anyio_backend_name)
        sock = stream.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


# -- happy eyeballs (asyncio: trio's connect is httpcore's) ---------------------


def _fake_resolver(loop: Any, addresses: list[tuple[str, int]]) -> Any:
    """A resolver that answers ``example.test`` with ``addresses`` (real sockets behind them).

    Every other name (and every IP literal) goes to the loop's own resolver:
    uvloop's ``sock_connect`` resolves the address it is given through
    ``loop.getaddrinfo`` too.
    """
    real = loop.getaddrinfo

    async def getaddrinfo(host: str, port: int, **kwargs: Any) -> list[Any]:
        if host != "example.test":
            return list(await real(host, port, **kwargs))
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address)
            for address in addresses
        ]

    return getaddrinfo


async def test_happy_eyeballs_skips_an_address_that_hangs(
    upstream: Upstream, anyio_backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("hostpool's stream connects under asyncio only")
    loop = asyncio.get_running_loop()
    good = (H2, upstream.ports(H2)[0])
    with stalled_listener("127.0.0.1", fill=True) as stalled:
        monkeypatch.setattr(loop, "getaddrinfo", _fake_resolver(loop, [stalled, good]))
        started = time.monotonic()
        with anyio.fail_after(5):
            sock = await _open_socket(loop, "example.test", 80, None)
        elapsed = time.monotonic() - started
    try:
        assert sock.getpeername()[:2] == good
        # The second attempt starts 250 ms after the first; far less than a
        # connect timeout, and nowhere near the stalled handshake's.
        assert 0.2 <= elapsed < 2.0
    finally:
        sock.close()


async def test_happy_eyeballs_reports_every_failed_address(
    anyio_backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("hostpool's stream connects under asyncio only")
    loop = asyncio.get_running_loop()
    with refused_address("127.0.0.1") as first, refused_address("127.0.0.2") as second:
        monkeypatch.setattr(loop, "getaddrinfo", _fake_resolver(loop, [first, second]))
        with pytest.raises(OSError, match="all connection attempts"):
            await _open_socket(loop, "example.test", 80, None)


class _UnixHandler(socketserver.StreamRequestHandler):
    """Answer every HTTP/1.1 request on the connection with ``ok`` (keep-alive)."""

    def handle(self) -> None:
        while True:
            line = self.rfile.readline()
            if not line:
                return
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            self.wfile.flush()


async def test_a_unix_socket_transport_connects_through_its_path(
    tmp_path: Path, anyio_backend_name: str
) -> None:
    path = str(tmp_path / "upstream.sock")
    server = socketserver.ThreadingUnixStreamServer(path, _UnixHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        transport = httpx.AsyncHTTPTransport(uds=path)
        async with HostRouter(transport=transport) as router:
            first = await router.get("http://unix.test/one")
            second = await router.get("http://unix.test/two")
            assert (first.text, second.text) == ("ok", "ok")
            stream = second.extensions["network_stream"]
            is_ours(stream, anyio_backend_name)
            assert stream.get_extra_info("server_addr") == path
            assert router.stats().partitions["unix.test"].connections_opened == 1
    finally:
        server.shutdown()
        server.server_close()


# -- connect and TLS failures (asyncio: the stream's own paths) ------------------


def _asyncio_only(anyio_backend_name: str) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("hostpool's stream connects under asyncio only")


async def test_a_reset_before_the_tls_handshake_fails_at_once() -> None:
    # Something may await between the TCP connect and the TLS handshake (an
    # async trace hook here). The server resets the connection in that gap,
    # and the hook waits until the client has seen it; the handshake must then
    # fail the request at once, not after the connect timeout.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        async def trace(event: str, info: dict[str, Any]) -> None:
            if event != "connection.connect_tcp.complete":
                return
            peer, _ = listener.accept()  # connected, so already in the backlog
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()  # RST
            stream = info["return_value"]

            def seen() -> bool:
                # hostpool's stream: once the event loop has closed the
                # transport (the state that used to hang); httpcore's: once
                # the socket shows the reset.
                if isinstance(stream, AsyncioStream):
                    return stream._protocol.lost
                return bool(stream.get_extra_info("is_readable"))

            with anyio.fail_after(5):
                while not seen():
                    await anyio.sleep(0.005)

        port = listener.getsockname()[1]
        async with HostRouter(timeout=httpx.Timeout(5.0, connect=3.0)) as router:
            started = time.monotonic()
            with pytest.raises(httpx.ConnectError):
                await router.get(f"https://127.0.0.1:{port}/", extensions={"trace": trace})
            assert time.monotonic() - started < 2.0
            assert quiet(router)
            assert router.stats().sockets_open == 0


async def test_connecting_to_an_ip_address_needs_no_resolver_thread(
    upstream: Upstream, anyio_backend_name: str
) -> None:
    # loop.getaddrinfo runs in the default executor even for 127.0.0.1: an
    # application that keeps that executor busy must still get connections.
    _asyncio_only(anyio_backend_name)
    loop = asyncio.get_running_loop()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(executor)
    release = threading.Event()
    busy = loop.run_in_executor(None, release.wait, 10.0)  # the executor's only thread
    try:
        async with HostRouter(timeout=httpx.Timeout(5.0, connect=0.5)) as router:
            assert (await router.get(upstream.url(H1, "/ok"))).text == "ok"
    finally:
        release.set()
        await busy


def test_ip_literals_are_recognised_and_names_are_left_to_the_resolver() -> None:
    assert _literal("127.0.0.2", 80) == [
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.2", 80))
    ]
    assert _literal("::1", 443) == [
        (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", 443, 0, 0))
    ]
    assert _literal("api.example.com", 443) is None
    assert _literal("fe80::1%lo", 443) is None


async def test_the_kernels_connect_timeout_is_a_connect_error_not_ours(
    anyio_backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ETIMEDOUT (SYN retries exhausted) is an OSError like a refusal; only
    # our own deadline is a ConnectTimeout, as with httpcore's anyio backend.
    _asyncio_only(anyio_backend_name)
    loop = asyncio.get_running_loop()

    async def sock_connect(sock: socket.socket, address: Any) -> None:
        raise TimeoutError(errno.ETIMEDOUT, "Connection timed out")

    monkeypatch.setattr(loop, "sock_connect", sock_connect)
    backend = AsyncioBackend(AutoBackend())
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("127.0.0.1", 9, timeout=5)
    with stalled_listener("127.0.0.1", fill=True) as (host, port):
        monkeypatch.undo()
        with pytest.raises(httpcore.ConnectTimeout):
            await backend.connect_tcp(host, port, timeout=0.2)

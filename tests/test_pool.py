"""Unit tests of the partition pool over httpcore's mock network backend: no sockets.

A :class:`~hostpool._pool.PartitionPool` gets its connections from an
``httpcore.AsyncConnectionPool`` (its *factory*) whose network backend is a
subclass of ``httpcore.AsyncMockBackend``: every new connection reads a fresh
copy of the canned responses, and the test keeps each connection's stream to
see which connection served a request (``response.extensions["network_stream"]``)
and whether the pool closed it. The pool takes ``httpx.Request`` and returns
``httpx.Response``, as the router's transport uses it.

After every step the pool's figures are checked against its ledger's.
"""

from __future__ import annotations

import typing

import httpcore
import httpx
import pytest

from hostpool import RouterClosed
from hostpool._ledger import SocketLedger
from hostpool._pool import PartitionPool

pytestmark = pytest.mark.anyio

OK = [b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n\r\n", b"ok"]


class Stream(httpcore.AsyncMockStream):
    """A mock stream that says whether it was closed, and can play a closed peer."""

    def __init__(self, buffer: list[bytes]) -> None:
        super().__init__(buffer)
        self.closed = False
        # True: the server closed the connection (the socket reads EOF now).
        self.readable = False

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            return self.readable
        return super().get_extra_info(info)


class Backend(httpcore.AsyncMockBackend):
    """httpcore's mock backend, keeping the stream of every connection it made."""

    def __init__(self, buffer: list[bytes]) -> None:
        super().__init__(buffer)
        self.responses = buffer
        self.streams: list[Stream] = []

    async def connect_tcp(self, *args: typing.Any, **kwargs: typing.Any) -> Stream:
        stream = Stream(list(self.responses))
        self.streams.append(stream)
        return stream


def make_pool(
    buffer: list[bytes] | None = None,
    *,
    key: str = "a.example",
    keepalive: int = 10,
    keepalive_expiry: float | None = 60.0,
    ledger: SocketLedger | None = None,
) -> tuple[PartitionPool, Backend, SocketLedger]:
    backend = Backend(OK * 5 if buffer is None else buffer)
    factory = httpcore.AsyncConnectionPool(
        network_backend=backend, keepalive_expiry=keepalive_expiry
    )
    if ledger is None:
        ledger = SocketLedger(max_connections=10, max_keepalive=10)
    return PartitionPool(key, factory, ledger, keepalive), backend, ledger


def request(host: str = "a.example", scheme: str = "http") -> httpx.Request:
    return httpx.Request("GET", f"{scheme}://{host}/")


async def send(pool: PartitionPool, request: httpx.Request) -> httpx.Response:
    """What the router's transport does, outside a router (no admission slot)."""
    return await pool.send(request, None, None)


async def start(pool: PartitionPool, host: str = "a.example") -> httpx.Response:
    """Send a request and read its body, leaving the response open."""
    response = await send(pool, request(host))
    assert response.status_code == 200
    # The stream itself: httpx's aread() would close the body once read.
    assert isinstance(response.stream, httpx.AsyncByteStream)
    assert b"".join([chunk async for chunk in response.stream]) == b"ok"
    return response


async def fetch(pool: PartitionPool, host: str = "a.example") -> Stream:
    """A full exchange; returns the stream of the connection that carried it."""
    response = await start(pool, host)
    await response.aclose()
    return stream_of(response)


def stream_of(response: httpx.Response) -> Stream:
    stream = response.extensions["network_stream"]
    assert isinstance(stream, Stream)
    return stream


def assert_agrees_with_ledger(pool: PartitionPool, ledger: SocketLedger) -> None:
    """The pool is the ledger's only partition: both count the same sockets."""
    assert ledger.open == pool.sockets_open
    assert len(ledger.idle) == pool.sockets_idle
    assert all(parked.owner is pool for parked in ledger.idle.values())
    assert ledger.opened == pool.opened
    assert ledger.evictions == pool.evictions


# -- reuse ---------------------------------------------------------------------


async def test_a_connection_is_reused_once_the_body_is_closed() -> None:
    pool, backend, ledger = make_pool()
    first = await fetch(pool)
    assert (pool.sockets_open, pool.sockets_idle, pool.opened) == (1, 1, 1)
    assert_agrees_with_ledger(pool, ledger)
    second = await fetch(pool)
    assert second is first
    assert pool.opened == 1 and backend.streams == [first]
    assert not first.closed
    assert_agrees_with_ledger(pool, ledger)


async def test_an_open_body_keeps_its_connection_active_not_idle() -> None:
    pool, _, ledger = make_pool()
    response = await start(pool)
    assert (pool.sockets_open, pool.sockets_idle) == (1, 0)
    assert_agrees_with_ledger(pool, ledger)
    await response.aclose()
    assert (pool.sockets_open, pool.sockets_idle) == (1, 1)
    assert_agrees_with_ledger(pool, ledger)


async def test_a_second_request_while_a_body_is_open_opens_a_second_connection() -> None:
    pool, backend, ledger = make_pool()
    first = await start(pool)
    second = await start(pool)
    assert stream_of(first) is not stream_of(second)
    assert (pool.sockets_open, pool.sockets_idle, pool.opened) == (2, 0, 2)
    assert_agrees_with_ledger(pool, ledger)
    await first.aclose()
    await second.aclose()
    assert (pool.sockets_open, pool.sockets_idle) == (2, 2)
    assert len(backend.streams) == 2
    assert_agrees_with_ledger(pool, ledger)


async def test_the_most_recently_used_idle_connection_is_handed_out() -> None:
    pool, _, ledger = make_pool()
    older, newer = await start(pool), await start(pool)
    await older.aclose()
    await newer.aclose()
    assert await fetch(pool) is stream_of(newer)
    # Handed out and back again: it is still the most recently used one.
    assert await fetch(pool) is stream_of(newer)
    assert pool.opened == 2
    assert_agrees_with_ledger(pool, ledger)


async def test_idle_connections_are_kept_per_origin() -> None:
    pool, backend, ledger = make_pool()
    a = await fetch(pool, "a.example")
    b = await fetch(pool, "b.example")
    assert a is not b
    assert await fetch(pool, "a.example") is a
    assert await fetch(pool, "b.example") is b
    assert pool.opened == 2 and len(backend.streams) == 2
    assert_agrees_with_ledger(pool, ledger)


async def test_closing_a_response_twice_gives_the_connection_back_once() -> None:
    pool, _, ledger = make_pool()
    response = await start(pool)
    await response.aclose()
    await response.aclose()
    assert (pool.sockets_open, pool.sockets_idle) == (1, 1)
    assert_agrees_with_ledger(pool, ledger)


# -- keepalive caps ---------------------------------------------------------------


async def test_idle_connections_beyond_the_partition_keepalive_are_closed_lru_first() -> None:
    pool, _, ledger = make_pool(keepalive=1)
    older, newer = await start(pool), await start(pool)
    await older.aclose()
    assert pool.evictions == 0
    await newer.aclose()
    assert stream_of(older).closed and not stream_of(newer).closed
    assert (pool.sockets_open, pool.sockets_idle) == (1, 1)
    assert pool.evictions == 1 and ledger.evictions == 1
    assert_agrees_with_ledger(pool, ledger)
    assert await fetch(pool) is stream_of(newer)


async def test_a_partition_with_no_keepalive_closes_every_connection_it_is_done_with() -> None:
    pool, _, ledger = make_pool(keepalive=0)
    first = await fetch(pool)
    assert first.closed
    assert (pool.sockets_open, pool.sockets_idle, pool.evictions) == (0, 0, 1)
    assert_agrees_with_ledger(pool, ledger)
    second = await fetch(pool)
    assert second is not first and pool.opened == 2


async def test_the_router_keepalive_cap_closes_the_lru_idle_connection_of_another_partition() -> (
    None
):
    ledger = SocketLedger(max_connections=10, max_keepalive=1)
    a, _, _ = make_pool(key="a", ledger=ledger)
    b, _, _ = make_pool(key="b", ledger=ledger)
    in_a = await fetch(a)
    in_b = await fetch(b)
    assert in_a.closed and not in_b.closed
    assert (a.sockets_open, a.evictions) == (0, 1)
    assert (b.sockets_open, b.sockets_idle, b.evictions) == (1, 1, 0)
    assert ledger.evictions == 1
    assert ledger.open == 1 and [p.owner for p in ledger.idle.values()] == [b]


async def test_at_the_socket_ceiling_a_new_connection_closes_the_lru_idle_one_elsewhere() -> None:
    ledger = SocketLedger(max_connections=2, max_keepalive=2)
    a, _, _ = make_pool(key="a", ledger=ledger)
    b, _, _ = make_pool(key="b", ledger=ledger)
    older = await fetch(a)
    newer = await fetch(a, "a2.example")
    assert ledger.open == 2
    in_b = await start(b)
    assert older.closed and not newer.closed
    assert ledger.open == 2
    assert (a.sockets_open, a.sockets_idle, a.evictions) == (1, 1, 1)
    assert (b.sockets_open, b.opened) == (1, 1)
    assert ledger.evictions == 1
    await in_b.aclose()
    assert ledger.open == 2


async def test_an_idle_connection_past_its_keepalive_expiry_is_swept_when_another_goes_idle() -> (
    None
):
    # keepalive_expiry=0: a connection expires the moment it is parked, and
    # the next park (at a later or equal monotonic time) sweeps it.
    pool, _, ledger = make_pool(keepalive_expiry=0.0)
    older, newer = await start(pool), await start(pool)
    await older.aclose()
    assert not stream_of(older).closed, "never the connection just parked"
    await newer.aclose()
    assert stream_of(older).closed and not stream_of(newer).closed
    assert (pool.sockets_open, pool.sockets_idle, pool.evictions) == (1, 1, 1)
    assert_agrees_with_ledger(pool, ledger)


async def test_an_idle_connection_the_server_closed_is_replaced_by_a_new_one() -> None:
    pool, backend, ledger = make_pool()
    first = await fetch(pool)
    first.readable = True  # the peer hung up while the connection was idle
    second = await fetch(pool)
    assert second is not first and first.closed
    assert pool.opened == 2 and len(backend.streams) == 2
    assert (pool.sockets_open, pool.sockets_idle) == (1, 1)
    assert_agrees_with_ledger(pool, ledger)


# -- failures --------------------------------------------------------------------


async def test_a_failed_exchange_never_returns_its_connection_to_idle() -> None:
    pool, backend, ledger = make_pool([b"garbage\r\n\r\n"])
    with pytest.raises(httpx.RemoteProtocolError):
        await send(pool, request())
    assert backend.streams[0].closed
    assert (pool.sockets_open, pool.sockets_idle, pool.opened) == (0, 0, 1)
    assert (ledger.open, ledger.opened) == (0, 1)
    assert_agrees_with_ledger(pool, ledger)


async def test_a_connection_dropped_before_the_response_is_closed_and_uncounted() -> None:
    pool, backend, ledger = make_pool([])  # the server closes without a response
    with pytest.raises(httpx.RemoteProtocolError):
        await send(pool, request())
    assert backend.streams[0].closed
    assert ledger.open == 0
    assert_agrees_with_ledger(pool, ledger)


class LooksUsable:
    """A connection whose exchange fails yet still claims to be reusable.

    What an HTTP/2 connection whose write was interrupted looks like to the
    pool: httpcore does not notice anything wrong with it.
    """

    def __init__(self) -> None:
        self.closed = False

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        raise httpcore.WriteError("interrupted mid-exchange")

    def is_available(self) -> bool:
        return not self.closed

    def is_idle(self) -> bool:
        return not self.closed

    def has_expired(self) -> bool:
        return False

    async def aclose(self) -> None:
        self.closed = True


class LooksUsableFactory(httpcore.AsyncConnectionPool):
    def __init__(self) -> None:
        super().__init__()
        self.made: list[LooksUsable] = []

    def create_connection(self, origin: httpcore.Origin) -> typing.Any:
        self.made.append(LooksUsable())
        return self.made[-1]


async def test_a_failed_connection_that_still_looks_usable_is_closed_not_reused() -> None:
    ledger = SocketLedger(max_connections=2, max_keepalive=2)
    factory = LooksUsableFactory()
    pool = PartitionPool("a", factory, ledger, keepalive=2)
    for _ in range(2):
        with pytest.raises(httpx.WriteError):
            await send(pool, request())
    assert len(factory.made) == 2, "the second request got a new connection"
    assert all(conn.closed for conn in factory.made)
    assert (pool.sockets_open, pool.sockets_idle, ledger.open) == (0, 0, 0)


async def test_a_connection_that_cannot_be_created_is_uncounted() -> None:
    class BrokenFactory(httpcore.AsyncConnectionPool):
        def create_connection(self, origin: httpcore.Origin) -> typing.Any:
            raise RuntimeError("no connection for you")

    ledger = SocketLedger(max_connections=2, max_keepalive=2)
    pool = PartitionPool("a", BrokenFactory(), ledger, keepalive=2)
    with pytest.raises(RuntimeError, match="no connection"):
        await send(pool, request())
    assert ledger.open == 0 and pool.sockets_open == 0


async def test_a_good_connection_survives_a_failure_on_another_origin() -> None:
    ledger = SocketLedger(max_connections=10, max_keepalive=10)
    good, _, _ = make_pool(ledger=ledger)
    kept = await fetch(good)
    bad, _, _ = make_pool([b"garbage\r\n\r\n"], key="bad", ledger=ledger)
    with pytest.raises(httpx.RemoteProtocolError):
        await send(bad, request("bad.example"))
    assert ledger.open == 1 and not kept.closed
    assert await fetch(good) is kept


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://a.example/", "unsupported protocol 'ftp://'"),
        ("//a.example/", "missing an 'http://' or 'https://' protocol"),
    ],
)
async def test_an_unsupported_scheme_is_rejected_before_any_connection(
    url: str, message: str
) -> None:
    pool, backend, ledger = make_pool()
    with pytest.raises(httpx.UnsupportedProtocol, match=message):
        await send(pool, httpx.Request("GET", url))
    assert backend.streams == [] and pool.opened == 0
    assert ledger.open == 0


# -- retire and aclose -------------------------------------------------------------


async def test_retired_connections_stay_counted_until_the_next_request_closes_them() -> None:
    ledger = SocketLedger(max_connections=10, max_keepalive=10)
    dropped, _, _ = make_pool(key="dropped", ledger=ledger)
    other, _, _ = make_pool(key="other", ledger=ledger)
    conns = [await start(dropped), await start(dropped)]
    for response in conns:
        await response.aclose()
    dropped.retire()
    assert (dropped.sockets_open, dropped.sockets_idle) == (0, 0)
    assert ledger.open == 2 and not ledger.idle
    assert not any(stream_of(r).closed for r in conns)
    await fetch(other)
    assert all(stream_of(r).closed for r in conns)
    assert ledger.open == 1 and ledger.retired == []


async def test_retire_leaves_active_connections_alone() -> None:
    pool, _, ledger = make_pool()
    done, active = await start(pool), await start(pool)
    await done.aclose()
    idle = stream_of(done)
    pool.retire()
    assert (pool.sockets_open, pool.sockets_idle) == (1, 0)
    assert len(ledger.retired) == 1 and ledger.open == 2
    assert not idle.closed and not stream_of(active).closed
    await active.aclose()
    assert pool.sockets_idle == 1


async def test_aclose_closes_idle_connections_and_uncounts_them() -> None:
    pool, backend, ledger = make_pool()
    older, newer = await start(pool), await start(pool)
    await older.aclose()
    await newer.aclose()
    await pool.aclose()
    assert all(stream.closed for stream in backend.streams)
    assert (pool.sockets_open, pool.sockets_idle, ledger.open) == (0, 0, 0)
    assert not ledger.idle


async def test_aclose_closes_active_connections_counted_until_their_body_is_closed() -> None:
    pool, _, ledger = make_pool()
    response = await start(pool)
    await pool.aclose()
    assert stream_of(response).closed
    assert ledger.open == 1 and pool.sockets_open == 1
    await response.aclose()
    assert ledger.open == 0 and pool.sockets_open == 0 and pool.sockets_idle == 0


async def test_a_request_after_aclose_raises_router_closed() -> None:
    pool, backend, ledger = make_pool()
    await fetch(pool)
    await pool.aclose()
    with pytest.raises(RouterClosed):
        await send(pool, request())
    assert len(backend.streams) == 1 and ledger.open == 0


async def test_the_pool_as_an_async_context_manager_closes_on_exit() -> None:
    pool, backend, ledger = make_pool()
    async with pool as entered:
        assert entered is pool
        await fetch(pool)
    assert pool.closed and backend.streams[0].closed and ledger.open == 0


# -- repr ----------------------------------------------------------------------


async def test_the_repr_names_the_partition_its_connections_and_whether_it_is_closed() -> None:
    pool, _, _ = make_pool(key="api.example", keepalive=1)
    first, second = await start(pool), await start(pool)
    await first.aclose()
    text = repr(pool)
    assert "'api.example'" in text and "closed" not in text
    assert "1 active" in text and "1 idle" in text and "opened 2" in text
    await second.aclose()
    assert "evicted 1" in repr(pool)
    await pool.aclose()
    assert "closed" in repr(pool) and "0 idle" in repr(pool)

"""Faults and bad input: each gets the right httpx exception, and leaks nothing.

After every fault the slot and the socket are back (router stats and the
server's own socket count agree) and the other hosts are unaffected.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from upstream import Upstream

from hostpool import HostRouter, Quota

pytestmark = pytest.mark.anyio

H1, H2 = "127.0.0.1", "127.0.0.2"


def quiet(router: HostRouter) -> bool:
    stats = router.stats()
    return stats.in_flight == 0 and stats.waiting == 0


async def assert_other_host_unaffected(router: HostRouter, upstream: Upstream) -> None:
    with anyio.fail_after(2):
        assert (await router.get(upstream.url(H2, "/ok"))).text == "ok"


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/stall-headers", httpx.ReadTimeout),
        ("/reset", (httpx.ReadError, httpx.RemoteProtocolError)),
        ("/garbage", httpx.RemoteProtocolError),
    ],
    ids=["stall-headers", "reset", "garbage"],
)
async def test_failed_request_raises_httpx_error_and_returns_slot_and_socket(
    upstream: Upstream, path: str, error: Any
) -> None:
    router = HostRouter(quotas={H1: 1}, timeout=httpx.Timeout(5.0, read=0.2))
    async with router:
        for _ in range(3):
            with pytest.raises(error):
                await router.get(upstream.url(H1, path))
            assert quiet(router)
        await assert_other_host_unaffected(router, upstream)
        assert router.stats().partitions[H1].sockets_open == 0
        await upstream.wait_until(lambda: upstream.stats(H1).open_sockets == 0)
        assert router.stats().partitions[H1].requests_failed == 3


async def test_stall_mid_body_raises_read_timeout_and_releases(upstream: Upstream) -> None:
    router = HostRouter(quotas={H1: 1}, timeout=httpx.Timeout(5.0, read=0.2))
    async with router:
        with pytest.raises(httpx.ReadTimeout):
            await router.get(upstream.url(H1, "/stall-body?bytes=10"))
        assert quiet(router)
        assert router.stats().sockets_open == 0
        await upstream.wait_until(lambda: upstream.stats(H1).open_sockets == 0)
        await assert_other_host_unaffected(router, upstream)


async def test_refused_connections_raise_connect_error_and_release(refused_url: str) -> None:
    async with HostRouter(default_quota=Quota(max_connections=1)) as router:
        for _ in range(5):
            with pytest.raises(httpx.ConnectError):
                await router.get(refused_url)
        assert quiet(router)
        assert router.stats().sockets_open == 0


@pytest.mark.parametrize("code", [429, 503])
async def test_retry_after_responses_are_returned_and_release(
    upstream: Upstream, code: int
) -> None:
    async with HostRouter(quotas={H1: 1}) as router:
        response = await router.get(upstream.url(H1, f"/status?code={code}&retry_after=2"))
        assert response.status_code == code
        assert response.headers["retry-after"] == "2"
        assert quiet(router)
        assert (await router.get(upstream.url(H1, "/ok"))).text == "ok"
        # The socket survived the error status and was reused.
        assert upstream.stats(H1).accepted == 1


async def test_server_closing_the_connection_after_answering_is_transparent(
    upstream: Upstream,
) -> None:
    async with HostRouter() as router:
        for _ in range(3):
            assert (await router.get(upstream.url(H1, "/close-now"))).status_code == 200
        assert (await router.get(upstream.url(H1, "/ok"))).text == "ok"
        assert upstream.stats(H1).accepted == 4
        assert router.stats().partitions[H1].connections_opened == 4
        assert router.stats().sockets_open == 1


async def test_cancellation_while_sending_the_body_releases(upstream: Upstream) -> None:
    started = anyio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        started.set()
        await anyio.sleep_forever()
        yield b""  # pragma: no cover

    async with HostRouter(quotas={H1: 1}) as router:
        async with anyio.create_task_group() as tg:

            async def send() -> None:
                await router.post(upstream.url(H1, "/echo"), content=body())

            tg.start_soon(send)
            with anyio.fail_after(5):
                await started.wait()
            assert router.stats().in_flight == 1
            tg.cancel_scope.cancel()
        assert quiet(router)
        assert router.stats().sockets_open == 0
        await upstream.wait_until(lambda: upstream.stats(H1).open_sockets == 0)
        assert (await router.get(upstream.url(H1, "/ok"))).text == "ok"


async def test_stream_closed_late_holds_then_returns_its_slot(upstream: Upstream) -> None:
    quotas = {H1: Quota(max_connections=1, pool_timeout=0.05)}
    async with HostRouter(quotas=quotas) as router:
        request = router.build_request("GET", upstream.url(H1, "/bytes?n=100000&chunk=1000"))
        response = await router.send(request, stream=True)
        chunks = response.aiter_bytes()  # keep a reference: a dropped iterator closes the body
        assert await chunks.__anext__()
        # Abandoned for a while: other hosts are fine, this one is at quota.
        await assert_other_host_unaffected(router, upstream)
        with anyio.fail_after(5), pytest.raises(httpx.PoolTimeout):
            await router.get(upstream.url(H1, "/ok"))
        await response.aclose()
        assert (await router.get(upstream.url(H1, "/ok"))).text == "ok"
        assert quiet(router)
        del chunks


async def test_mixed_case_localhost_url_is_routed_to_localhost(upstream: Upstream) -> None:
    url = upstream.url(H1, "/ok").replace(H1, "LocalHost")
    async with HostRouter() as router:
        assert (await router.get(url)).text == "ok"
        assert list(router.stats().partitions) == ["localhost"]


async def test_idna_and_mixed_case_hosts_share_one_partition() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(200)

    async with HostRouter(
        transport=httpx.MockTransport(handler), quotas={"bücher.example": 1}
    ) as router:
        for url in (
            "https://BÜCHER.example/",
            "https://xn--bcher-kva.example./",
            "https://bücher.example/",
        ):
            await router.get(url)
        stats = router.stats()
    assert list(stats.partitions) == ["xn--bcher-kva.example"]
    assert stats.partitions["xn--bcher-kva.example"].quota == Quota(max_connections=1)
    assert stats.partitions["xn--bcher-kva.example"].requests_completed == 3


async def test_very_long_hostname_gets_its_own_partition() -> None:
    host = ".".join(["a" * 63] * 3) + ".example"  # 200 characters, valid
    async with HostRouter(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as router:
        assert (await router.get(f"https://{host}/")).status_code == 200
        assert list(router.stats().partitions) == [host]


async def test_ten_thousand_distinct_hosts_keep_bounded_state() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await anyio.lowlevel.checkpoint()
        return httpx.Response(200)

    router = HostRouter(
        transport=httpx.MockTransport(handler),
        default_quota=Quota(max_connections=2),
        partition_idle_timeout=0.05,
    )
    async with router:
        with anyio.fail_after(60):
            for batch in range(10):
                async with anyio.create_task_group() as tg:
                    for i in range(1000):
                        tg.start_soon(router.get, f"https://h{batch}-{i}.example/")
        assert router.stats().requests_completed == 10_000
        with anyio.fail_after(5):
            while len(router.stats().partitions) > 1:
                await anyio.sleep(0.06)
                await router.get("https://last.example/")
        stats = router.stats()
    assert stats.partitions_created == 10_001
    assert stats.partitions_dropped == 10_000
    assert stats.in_flight == 0
    # The host -> key cache shrank with the partitions (G9: bounded memory).
    assert len(router._hp_partitioner._cache) <= 1024 + 2


async def test_a_waiter_granted_then_cancelled_before_it_runs_hands_its_slot_on(
    upstream: Upstream, anyio_backend_name: str
) -> None:
    # The race of httpcore#1093 / aiohttp#9670, made deterministic: the only
    # slot is handed to waiter W by a release, and W is cancelled in the same
    # instant, before it has run. Its slot must go on to the next waiter X.
    # Under asyncio the task is cancelled directly (Task.cancel() is seen at
    # W's very next step, so W's park wakes up both granted and cancelled);
    # anyio's and trio's cancellation arrive later, after the grant has won,
    # and W then fails at its next checkpoint holding the slot.
    quotas = {H1: Quota(max_connections=1, pool_timeout=3.0)}
    async with HostRouter(quotas=quotas) as router, anyio.create_task_group() as tg:
        holder = await router.send(
            router.build_request("GET", upstream.url(H1, "/bytes?n=10")), stream=True
        )
        w_scope = anyio.CancelScope()
        w_task: list[asyncio.Task[Any]] = []
        outcomes: dict[str, Any] = {}

        async def waiter() -> None:
            if anyio_backend_name == "asyncio":
                w_task.append(asyncio.current_task())  # type: ignore[arg-type]
            try:
                with w_scope:
                    response = await router.get(upstream.url(H1, "/ok?who=w"))
                    outcomes["w"] = response.status_code
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
            outcomes.setdefault("w", "cancelled")

        async def next_waiter() -> None:
            outcomes["x"] = (await router.get(upstream.url(H1, "/ok?who=x"))).status_code

        tg.start_soon(waiter)
        with anyio.fail_after(5):
            while router.stats().waiting < 1:
                await anyio.sleep(0.001)
        tg.start_soon(next_waiter)
        with anyio.fail_after(5):
            while router.stats().waiting < 2:
                await anyio.sleep(0.001)
        # No await between the release (the last step of aclose) and the cancel.
        await holder.aclose()
        if w_task:
            w_task[0].cancel()
        else:
            w_scope.cancel()
        with anyio.fail_after(2):  # well within X's 3 s pool timeout
            while "x" not in outcomes:
                await anyio.sleep(0.005)
    assert outcomes == {"w": "cancelled", "x": 200}
    assert quiet(router)
    served = [r.target for r in upstream.request_log() if r.target.startswith("/ok")]
    assert served == ["/ok?who=x"]

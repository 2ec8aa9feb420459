"""How other clients' pools broke, replayed on loopback against HostRouter.

Each test names the upstream bug it guards against. They share one shape:
stress the failure mode, then prove the pool is still healthy (a fresh
request succeeds promptly, nothing is in flight, quotas held server-side).
"""

from __future__ import annotations

import random
from typing import Any

import anyio
import httpx
import pytest
from upstream import Upstream

import hostpool
from hostpool import HostRouter, Quota

pytestmark = pytest.mark.anyio

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
H1, H2 = HOSTS[0], HOSTS[1]


async def assert_healthy(router: HostRouter, upstream: Upstream, host: str = H1) -> None:
    """A fresh request goes through at once and nothing is left in flight."""
    with anyio.fail_after(2):
        assert (await router.get(upstream.url(host, "/ok"))).text == "ok"
    stats = router.stats()
    assert stats.in_flight == 0
    assert stats.waiting == 0


async def test_waiters_cancelled_or_timed_out_at_random_never_lose_a_wakeup(
    upstream: Upstream,
) -> None:
    # encode/httpcore#1093, encode/httpx#1461, aio-libs/aiohttp#9670,
    # golang/go#65705: a waiter that leaves at the wrong moment swallowed the
    # wake-up meant for the next one, or kept its slot, until every request
    # got PoolTimeout.
    rng = random.Random(1093)
    quotas = {H1: Quota(max_connections=2)}
    outcomes: dict[str, int] = {}
    async with HostRouter(quotas=quotas) as router:

        async def one(patience: float, pool: float) -> None:
            with anyio.move_on_after(patience):
                try:
                    await router.get(
                        upstream.url(H1, f"/delay?ms={rng.randint(0, 15)}"),
                        timeout=httpx.Timeout(5.0, pool=pool),
                    )
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                except hostpool.PoolTimeout:
                    outcomes["pool"] = outcomes.get("pool", 0) + 1
                return
            outcomes["cancelled"] = outcomes.get("cancelled", 0) + 1

        with anyio.fail_after(30):
            for _ in range(5):
                async with anyio.create_task_group() as tg:
                    for _ in range(60):
                        tg.start_soon(one, rng.uniform(0.0, 0.08), rng.uniform(0.001, 0.08))
                        if rng.random() < 0.3:
                            await anyio.lowlevel.checkpoint()
                await assert_healthy(router, upstream)
    assert sum(outcomes.values()) == 300
    assert outcomes.get("ok", 0) > 0
    assert upstream.stats(H1).peak_in_flight <= 2


async def test_connect_and_read_failures_never_poison_the_pool(
    upstream: Upstream, refused_url: str
) -> None:
    # encode/httpcore#550, aio-libs/aiohttp#835: a failed connect or read
    # kept its slot, and after a few failures the pool was empty for good.
    router = HostRouter(
        default_quota=Quota(max_connections=1), timeout=httpx.Timeout(5.0, read=0.05)
    )
    async with router:
        with anyio.fail_after(20):
            for _ in range(10):
                with pytest.raises(httpx.ConnectError):
                    await router.get(refused_url)
                with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                    await router.get(upstream.url(H1, "/reset"))
                with pytest.raises(httpx.ReadTimeout):
                    await router.get(upstream.url(H1, "/stall-headers"))
        await assert_healthy(router, upstream)
        assert router.stats().sockets_open == 1


@pytest.mark.parametrize("rounds", [20])
async def test_newcomer_never_barges_past_a_woken_waiter(upstream: Upstream, rounds: int) -> None:
    # aio-libs/aiohttp#4936, golang/go#29889: a release woke a waiter, and a
    # request arriving before the waiter ran took the slot: the limit was
    # exceeded, or the waiter starved. Here the newcomer starts in the very
    # step that releases the slot, or a few checkpoints later.
    quotas = {H1: Quota(max_connections=1)}
    async with HostRouter(quotas=quotas) as router:
        for round_ in range(rounds):
            order: list[str] = []

            async def request(name: str, order: list[str] = order) -> None:
                await router.get(upstream.url(H1, f"/ok?who={name}"))
                order.append(name)

            async with anyio.create_task_group() as tg:
                holder = await router.send(
                    router.build_request("GET", upstream.url(H1, "/ok?who=holder")), stream=True
                )
                tg.start_soon(request, "waiter")
                with anyio.fail_after(5):
                    while router.stats().partitions[H1].waiting == 0:
                        await anyio.lowlevel.checkpoint()
                await holder.aclose()  # wakes the waiter; it has not run yet
                # Vary where the newcomer lands around the release: at once,
                # or after 1-3 checkpoints (the waiter may or may not have run).
                for _ in range(round_ % 4):
                    await anyio.lowlevel.checkpoint()
                tg.start_soon(request, "newcomer")
            assert order == ["waiter", "newcomer"], round_
    assert upstream.stats(H1).peak_in_flight == 1


async def test_waiter_never_gets_a_connection_evicted_under_it(upstream: Upstream) -> None:
    # encode/httpcore#1110: a connection assigned to a waiter was closed as
    # idle (expiry or the keepalive cap) before the waiter used it, and the
    # request hung until its read timeout. Here sockets expire almost at
    # once and the router-wide ceiling forces evictions across hosts.
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=1, keepalive_expiry=0.001)
    router = HostRouter(
        limits=limits,
        default_quota=Quota(max_connections=2),
        timeout=httpx.Timeout(5.0, read=2.0),
    )
    rng = random.Random(1110)
    async with router:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    host = rng.choice(HOSTS)
                    tg.start_soon(router.get, upstream.url(host, f"/delay?ms={rng.randint(0, 3)}"))
                    if rng.random() < 0.5:
                        await anyio.lowlevel.checkpoint()
        assert router.stats().requests_failed == 0
        await assert_healthy(router, upstream)
    assert upstream.total().completed == 201
    assert upstream.total().peak_open_sockets <= 2


async def test_partition_dropped_while_in_use_cannot_happen(upstream: Upstream) -> None:
    # urllib3/urllib3#1252: a pool was evicted from the pool manager while a
    # request still used it. Partitions here expire after 1 ms idle and
    # sockets as fast; requests keep arriving on every host.
    limits = httpx.Limits(max_connections=6, keepalive_expiry=0.001)
    router = HostRouter(
        limits=limits, default_quota=Quota(max_connections=2), partition_idle_timeout=0.001
    )
    rng = random.Random(1252)
    errors: list[BaseException] = []

    async def one(host: str) -> None:
        try:
            response = await router.get(upstream.url(host, f"/delay?ms={rng.randint(0, 5)}"))
            assert response.status_code == 200
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    async with router:
        with anyio.fail_after(30):
            for _ in range(10):
                async with anyio.create_task_group() as tg:
                    for _ in range(30):
                        tg.start_soon(one, rng.choice(HOSTS))
                await anyio.sleep(0.005)
        assert errors == []
        stats = router.stats()
        assert stats.partitions_dropped > 0
        await assert_healthy(router, upstream)
    assert upstream.total().completed == 301
    for host in HOSTS:
        assert upstream.stats(host).peak_in_flight <= 2


async def test_host_queues_are_served_round_robin_not_in_a_fixed_order(
    upstream: Upstream,
) -> None:
    # aio-libs/aiohttp#2964: waiting hosts were served in a fixed order, so
    # the last host starved while the first ones had work. With 4 hosts
    # flooding a budget of 2, every host is served within 4 freed slots.
    limits = httpx.Limits(max_connections=2)
    router = HostRouter(limits=limits, default_quota=Quota(max_connections=2))
    async with router, anyio.create_task_group() as tg:
        for host in HOSTS:
            for _ in range(6):
                tg.start_soon(router.get, upstream.url(host, "/hold?key=q"))
        await upstream.wait_until(lambda: router.stats().waiting == 22)
        await upstream.wait_until(lambda: upstream.total().in_flight == 2)
        first = {h: upstream.stats(h).requests for h in HOSTS}
        for _ in range(8):
            before = upstream.total().requests
            upstream.release_one("q")
            await upstream.wait_until(lambda before=before: upstream.total().requests == before + 1)
        later = {h: upstream.stats(h).requests - first[h] for h in HOSTS}
        upstream.release("q")
    # The 8 slots freed after the first two admissions went 2 to each host.
    assert later == dict.fromkeys(HOSTS, 2), (first, later)


async def test_one_rate_limited_host_cannot_take_every_shared_slot(upstream: Upstream) -> None:
    # palantir/conjure-java-runtime#867: one host answering 429s slowly (or
    # retried hard) took every connection of a shared pool. Its quota caps it.
    limits = httpx.Limits(max_connections=6)
    quotas = {H1: Quota(max_connections=2)}
    async with HostRouter(limits=limits, quotas=quotas) as router:
        results: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def hammer() -> None:
                response = await router.get(upstream.url(H1, "/hold?key=slow429"))
                results.append(response.status_code)

            for _ in range(50):
                tg.start_soon(hammer)
            await upstream.wait_until(lambda: upstream.stats(H1).in_flight == 2)
            with anyio.fail_after(2):
                async with anyio.create_task_group() as others:
                    for host in HOSTS[1:]:
                        for _ in range(4):
                            others.start_soon(router.get, upstream.url(host, "/status?code=429"))
            upstream.release("slow429")
        assert upstream.stats(H1).peak_in_flight == 2
        assert len(results) == 50
        await assert_healthy(router, upstream, H2)

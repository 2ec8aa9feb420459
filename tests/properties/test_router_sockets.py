"""Hypothesis-generated workloads through a HostRouter against real loopback sockets.

Each example draws 2-5 upstream hosts (127.0.0.1 ...), their quotas and
reservations, a budget and a demand per host, holds every request at the
server, and then checks from the *server's* counters that:

- G1: no host ever has more requests in flight than its quota, and all hosts
  together no more than the budget; open sockets stay within the budget (G2);
- G4 (work conservation): with every request held, the requests in flight
  settle at exactly what the quotas allow: each host gets
  ``min(demand, cap, reserved)`` on its reservation, and the shared slots are
  used in full or until every host's demand or cap is met;
- G3: a host with a reservation gets requests through while the others hold
  every shared slot;
- G6/G7: cancelled waiters leave, every request ends with a response or the
  documented exception, and afterwards nothing is in flight and no socket
  is open beyond the keepalive budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from upstream import Upstream

import hostpool
from hostpool import HostRouter, Quota

pytestmark = pytest.mark.anyio

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


@dataclass(frozen=True)
class Workload:
    budget: int
    caps: tuple[int, ...]
    reserved: tuple[int, ...]
    demand: tuple[int, ...]
    cancel: tuple[int, ...]  # waiters to cancel per host

    @property
    def hosts(self) -> tuple[str, ...]:
        return HOSTS[: len(self.caps)]

    def settled(self) -> tuple[int, ...]:
        """Requests in flight per host once admission settles with nothing completing.

        Reserved slots first, then the shared slots; which host gets the
        shared slots depends on arrival order, so only the per-host floor
        (reserved) and the total are fixed. Returns the floor per host.
        """
        return tuple(
            min(d, c, r) for d, c, r in zip(self.demand, self.caps, self.reserved, strict=True)
        )

    def settled_total(self) -> int:
        shared = self.budget - sum(self.reserved)
        wants = [min(d, c) for d, c in zip(self.demand, self.caps, strict=True)]
        above = sum(max(0, w - r) for w, r in zip(wants, self.reserved, strict=True))
        return sum(self.settled()) + min(shared, above)


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    n = draw(st.integers(2, 5))
    budget = draw(st.integers(2, 8))
    caps = tuple(draw(st.integers(1, 4)) for _ in range(n))
    reserved: list[int] = []
    left = budget - 1  # keep a shared slot: see test_all_slots_reserved_*
    for cap in caps:
        r = draw(st.integers(0, min(cap, left, 2)))
        reserved.append(r)
        left -= r
    demand = tuple(draw(st.integers(0, 6)) for _ in range(n))
    cancel = tuple(draw(st.integers(0, d)) for d in demand)
    return Workload(budget, caps, tuple(reserved), demand, cancel)


async def _run(upstream: Upstream, work: Workload) -> None:
    upstream.reset_counters()
    upstream.rearm_all()
    quotas = {
        host: Quota(max_connections=cap, reserved=r)
        for host, cap, r in zip(work.hosts, work.caps, work.reserved, strict=True)
    }
    limits = httpx.Limits(max_connections=work.budget, max_keepalive_connections=work.budget)
    outcomes: list[object] = []
    scopes: dict[int, anyio.CancelScope] = {}
    host_of: dict[int, str] = {}
    router = HostRouter(quotas=quotas, limits=limits, timeout=httpx.Timeout(10.0))

    async def one(ident: int, host: str) -> None:
        with scopes.setdefault(ident, anyio.CancelScope()):
            try:
                response = await router.get(upstream.url(host, f"/hold?key=all&id={ident}"))
                outcomes.append(response.status_code)
            except httpx.HTTPError as exc:
                outcomes.append(exc)
            return
        outcomes.append("cancelled")

    async with router:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for host, d in zip(work.hosts, work.demand, strict=True):
                    for _ in range(d):
                        ident = len(host_of)
                        host_of[ident] = host
                        tg.start_soon(one, ident, host)
                expected = work.settled_total()
                total_demand = sum(work.demand)
                await upstream.wait_until(
                    lambda: (
                        upstream.total().in_flight == expected
                        and router.stats().waiting == total_demand - expected
                    )
                )
                # G1 and G4, from the server's side.
                for host, cap, floor in zip(work.hosts, work.caps, work.settled(), strict=True):
                    stats = upstream.stats(host)
                    assert stats.peak_in_flight <= cap
                    assert stats.in_flight >= floor
                assert upstream.total().peak_in_flight <= work.budget
                assert upstream.total().peak_open_sockets <= work.budget
                wants = [min(d, c) for d, c in zip(work.demand, work.caps, strict=True)]
                if expected == sum(wants):
                    # Demand fits: every host runs exactly what it asked for, up to its quota.
                    for host, want in zip(work.hosts, wants, strict=True):
                        assert upstream.stats(host).in_flight == want
                # Cancel some of the waiters: the requests the server never saw.
                arrived = {int(r.target.rsplit("id=", 1)[1]) for r in upstream.request_log()}
                cancelled = 0
                for host, n in zip(work.hosts, work.cancel, strict=True):
                    waiters = [i for i, h in host_of.items() if h == host and i not in arrived]
                    for ident in waiters[:n]:
                        scopes[ident].cancel()
                        cancelled += 1
                await upstream.wait_until(
                    lambda: router.stats().waiting == total_demand - expected - cancelled
                )
                upstream.release("all")
        # G7: every request ended, nothing is left in flight or waiting.
        assert len(outcomes) == total_demand
        assert outcomes.count(200) + outcomes.count("cancelled") == total_demand
        stats = router.stats()
        assert stats.in_flight == 0
        assert stats.waiting == 0
        assert stats.sockets_open <= work.budget
    assert upstream.total().peak_in_flight <= work.budget
    assert upstream.total().peak_open_sockets <= work.budget
    for host, cap in zip(work.hosts, work.caps, strict=True):
        assert upstream.stats(host).peak_in_flight <= cap
    await upstream.wait_until(lambda: upstream.total().open_sockets == 0)


@given(work=workloads())
@example(work=Workload(budget=2, caps=(4, 1), reserved=(0, 1), demand=(6, 3), cancel=(2, 1)))
@example(
    work=Workload(budget=8, caps=(4, 4, 4), reserved=(2, 2, 2), demand=(6, 0, 6), cancel=(0, 0, 6))
)
async def test_quotas_budget_and_work_conservation_hold_on_real_sockets(
    upstream: Upstream, work: Workload
) -> None:
    await _run(upstream, work)


@given(
    budget=st.integers(2, 6),
    flood_cap=st.integers(1, 6),
    reserved=st.integers(0, 2),
    probes=st.integers(1, 5),
)
async def test_reserved_or_under_quota_host_progresses_while_another_is_flooded(
    upstream: Upstream, budget: int, flood_cap: int, reserved: int, probes: int
) -> None:
    upstream.reset_counters()
    upstream.rearm_all()
    reserved = min(reserved, budget - 1)
    flood, probe = HOSTS[0], HOSTS[1]
    quotas = {
        flood: Quota(max_connections=flood_cap),
        probe: Quota(max_connections=2, reserved=min(reserved, 2), pool_timeout=0.1),
    }
    shared = budget - min(reserved, 2)
    # The probe can get through iff it holds a reservation, or the flood
    # cannot take every shared slot because of its own cap.
    can_progress = reserved > 0 or flood_cap < shared
    async with HostRouter(quotas=quotas, limits=httpx.Limits(max_connections=budget)) as router:
        async with anyio.create_task_group() as tg:
            for _ in range(flood_cap + 5):
                tg.start_soon(router.get, upstream.url(flood, "/hold?key=flood"))
            await upstream.wait_until(
                lambda: upstream.stats(flood).in_flight == min(flood_cap, shared)
            )
            with anyio.fail_after(5):
                for _ in range(probes):
                    if can_progress:
                        response = await router.get(upstream.url(probe, "/ok"))
                        assert response.text == "ok"
                    else:
                        with pytest.raises(hostpool.PoolTimeout):
                            await router.get(upstream.url(probe, "/ok"))
            assert upstream.stats(flood).peak_in_flight <= flood_cap
            upstream.release("flood")
        assert router.stats().in_flight == 0


async def test_all_slots_reserved_leaves_nothing_for_unlisted_hosts(upstream: Upstream) -> None:
    quotas = {HOSTS[0]: Quota(max_connections=1, reserved=1)}
    with pytest.warns(UserWarning, match="reserve all 1 slots"):
        router = HostRouter(
            quotas=quotas,
            limits=httpx.Limits(max_connections=1),
            timeout=httpx.Timeout(5, pool=0.1),
        )
    async with router:
        assert (await router.get(upstream.url(HOSTS[0], "/ok"))).text == "ok"
        with pytest.raises(hostpool.PoolTimeout):
            await router.get(upstream.url(HOSTS[1], "/ok"))


@st.composite
def timed_workloads(draw: st.DrawFn) -> tuple[Workload, tuple[int, ...], tuple[float, ...]]:
    work = draw(workloads())
    latency_ms = tuple(draw(st.sampled_from([0, 2, 10, 30])) for _ in work.caps)
    # Per request: None = wait for the answer, else cancel after that many seconds.
    patience = tuple(
        draw(st.one_of(st.none(), st.floats(0.0, 0.05))) for _ in range(sum(work.demand))
    )
    return work, latency_ms, patience


@given(case=timed_workloads())
async def test_latencies_and_cancellations_never_break_quotas_or_leak(
    upstream: Upstream, case: tuple[Workload, tuple[int, ...], tuple[float | None, ...]]
) -> None:
    """Requests with per-host latencies, some cancelled at random points.

    Server side: no host above its quota, the budget never exceeded (requests
    and sockets). Client side: every request ends with a response or its
    cancellation, and afterwards nothing is in flight or waiting.
    """
    work, latency_ms, patience = case
    upstream.reset_counters()
    quotas = {
        host: Quota(max_connections=cap, reserved=r)
        for host, cap, r in zip(work.hosts, work.caps, work.reserved, strict=True)
    }
    limits = httpx.Limits(max_connections=work.budget, max_keepalive_connections=work.budget)
    outcomes: list[object] = []
    async with HostRouter(quotas=quotas, limits=limits) as router:

        async def one(host: str, ms: int, wait: float | None) -> None:
            with anyio.CancelScope() as scope:
                if wait is not None:
                    scope.deadline = anyio.current_time() + wait
                response = await router.get(upstream.url(host, f"/delay?ms={ms}"))
                outcomes.append(response.status_code)
            if scope.cancelled_caught:
                outcomes.append("cancelled")

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                i = 0
                for host, d, ms in zip(work.hosts, work.demand, latency_ms, strict=True):
                    for _ in range(d):
                        tg.start_soon(one, host, ms, patience[i])
                        i += 1
        assert len(outcomes) == sum(work.demand)
        assert set(outcomes) <= {200, "cancelled"}
        stats = router.stats()
        assert stats.in_flight == 0
        assert stats.waiting == 0
        assert stats.sockets_open <= work.budget
    for host, cap in zip(work.hosts, work.caps, strict=True):
        assert upstream.stats(host).peak_in_flight <= cap
    assert upstream.total().peak_in_flight <= work.budget
    assert upstream.total().peak_open_sockets <= work.budget
    await upstream.wait_until(lambda: upstream.total().open_sockets == 0)

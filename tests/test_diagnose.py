"""router.diagnose(): the warning signs of a pool, in plain words."""

from __future__ import annotations

import logging
from dataclasses import replace

import anyio
import httpx
import pytest
from upstream import Upstream

from hostpool import HostRouter, Quota
from hostpool._diagnose import diagnose
from hostpool._stats import PartitionStats, RouterStats, WaitSummary


def _partition(key: str = "api.example.com", **changes: object) -> PartitionStats:
    base = PartitionStats(
        key=key,
        serial=1,
        quota=Quota(max_connections=4, pool_timeout=2.0),
        quota_key=key,
        in_flight=0,
        waiting=0,
        sockets_open=2,
        sockets_idle=2,
        connections_opened=2,
        requests=100,
        requests_completed=100,
        requests_failed=0,
        pool_timeouts=0,
        overflows=0,
        evictions=0,
        peak_in_flight=2,
        peak_waiting=0,
        reserved_admissions=0,
        wait=WaitSummary(count=100),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _router_stats(*partitions: PartitionStats, budget: int = 20) -> RouterStats:
    return RouterStats(
        budget=budget,
        max_keepalive=budget,
        shared_slots=budget,
        shared_in_use=0,
        in_flight=0,
        waiting=0,
        sockets_open=0,
        sockets_idle=0,
        connections_opened=0,
        requests=0,
        requests_completed=0,
        requests_failed=0,
        pool_timeouts=0,
        overflows=0,
        evictions=0,
        partitions_created=len(partitions),
        partitions_dropped=0,
        wait=WaitSummary(),
        partitions={p.key: p for p in partitions},
    )


def test_healthy_partition_has_no_findings() -> None:
    assert diagnose(_router_stats(_partition()), default_pool_timeout=5.0) == []


def test_pool_timeouts_suggest_a_larger_quota_from_the_demand_seen() -> None:
    busy = _partition(pool_timeouts=7, peak_in_flight=4, peak_waiting=9)
    [finding] = diagnose(_router_stats(busy), default_pool_timeout=5.0)
    assert finding.partition == "api.example.com"
    assert "pool too small" in finding.problem
    assert "7 pool timeouts" in finding.figure
    assert "max_connections=13" in finding.suggestion
    assert str(finding).startswith("api.example.com: pool too small")


def test_waits_below_the_quota_point_at_the_budget() -> None:
    wait = WaitSummary(count=100, p95=0.2, p99=0.3)
    starved = _partition(peak_in_flight=2, wait=wait)
    [finding] = diagnose(_router_stats(starved, budget=2), default_pool_timeout=5.0)
    assert "pool wait p95 200 ms" in finding.figure
    assert "limits.max_connections" in finding.suggestion


def test_connection_churn_with_low_keepalive_suggests_keepalive() -> None:
    quota = Quota(max_connections=8, max_keepalive_connections=1, pool_timeout=1.0)
    churny = _partition(quota=quota, connections_opened=80, peak_in_flight=6)
    [finding] = diagnose(_router_stats(churny), default_pool_timeout=5.0)
    assert "churn" in finding.problem
    assert "80 connections opened for 100 requests (80%)" in finding.figure
    assert "max_keepalive_connections=6" in finding.suggestion


def test_churn_without_keepalive_limit_blames_the_upstream() -> None:
    churny = _partition(connections_opened=100)
    [finding] = diagnose(_router_stats(churny), default_pool_timeout=5.0)
    assert "upstream may close them" in finding.suggestion


def test_keepalive_equal_to_a_large_cap_is_flagged() -> None:
    quota = Quota(max_connections=40, pool_timeout=1.0)
    [finding] = diagnose(_router_stats(_partition(quota=quota)), default_pool_timeout=5.0)
    assert "keepalive close to max_connections" in finding.problem
    assert "max_keepalive_connections=10" in finding.suggestion


def test_missing_pool_timeout_is_flagged_when_waits_approach_the_default() -> None:
    quota = Quota(max_connections=4)
    slow = _partition(quota=quota, wait=WaitSummary(count=100, p99=3.0))
    findings = diagnose(_router_stats(slow), default_pool_timeout=5.0)
    assert any("no explicit pool timeout" in f.problem for f in findings)
    none = diagnose(_router_stats(_partition(quota=quota)), default_pool_timeout=None)
    assert any("wait for a slot forever" in f.problem for f in none)


def test_reservation_that_never_helped_is_reported() -> None:
    quota = Quota(max_connections=4, reserved=2, pool_timeout=1.0)
    [finding] = diagnose(_router_stats(_partition(quota=quota)), default_pool_timeout=5.0)
    assert "reservation never needed" in finding.problem
    assert finding.severity == "info"


def test_reservation_for_a_host_never_called_is_reported() -> None:
    quota = Quota(max_connections=4, reserved=2)
    [finding] = diagnose(
        _router_stats(), default_pool_timeout=5.0, reserved_keys={"idle.example": quota}
    )
    assert finding.partition == "idle.example"
    assert "sent no request" in finding.problem


def test_little_traffic_is_judged_on_failures_only() -> None:
    quota = Quota(max_connections=4, reserved=2, pool_timeout=1.0)
    quiet = _partition(quota=quota, requests=3, requests_completed=3, connections_opened=3)
    assert diagnose(_router_stats(quiet), default_pool_timeout=5.0) == []


@pytest.mark.anyio
async def test_router_diagnoses_a_quota_too_small_for_its_load(upstream: Upstream) -> None:
    quotas = {"127.0.0.1": Quota(max_connections=1, pool_timeout=0.05)}
    async with HostRouter(quotas=quotas) as router:
        url = upstream.url("127.0.0.1", "/hold?key=a")
        async with anyio.create_task_group() as tg:
            tg.start_soon(router.get, url)
            await upstream.wait_until(lambda: upstream.stats("127.0.0.1").in_flight == 1)
            for _ in range(3):
                with pytest.raises(httpx.PoolTimeout):
                    await router.get(upstream.url("127.0.0.1", "/ok"))
            upstream.release("a")
        findings = router.diagnose()
    [finding] = [f for f in findings if f.partition == "127.0.0.1"]
    assert "3 pool timeouts" in finding.figure
    assert "max_connections=2" in finding.suggestion


@pytest.mark.anyio
async def test_logging_reports_lifecycle_and_failures_but_not_successes(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="hostpool")
    limits = httpx.Limits(max_connections=1)
    quotas = {
        "127.0.0.1": Quota(max_connections=1, max_pending=0),
        "127.0.0.3": Quota(max_connections=1, pool_timeout=0.01),
    }
    async with HostRouter(quotas=quotas, limits=limits, partition_idle_timeout=0.05) as router:
        await router.get(upstream.url("127.0.0.1", "/ok"))
        await router.get(upstream.url("127.0.0.2", "/ok"))
        async with router.stream("GET", upstream.url("127.0.0.1", "/ok")):
            with pytest.raises(httpx.PoolTimeout):
                await router.get(upstream.url("127.0.0.1", "/ok"))
            with pytest.raises(httpx.PoolTimeout):  # the budget (1) is taken
                await router.get(upstream.url("127.0.0.3", "/ok"))
        with anyio.fail_after(5):
            while "127.0.0.2" in router.stats().partitions:
                await anyio.sleep(0.02)
                await router.get(upstream.url("127.0.0.1", "/ok"))
    messages = [r.getMessage() for r in caplog.records if r.name == "hostpool"]
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("partition 127.0.0.1 created" in m for m in messages)
    assert any("partition 127.0.0.2 dropped" in m for m in messages)
    assert any("idle socket closed to stay within max_connections=1" in m for m in messages)
    assert any("rejected" in m for m in info)
    assert any("127.0.0.3: pool timeout" in m for m in info)
    assert len(info) == 2  # successful requests never log at INFO

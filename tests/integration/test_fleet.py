"""Fleet quotas on a real redis-server, counted from the upstream's side.

Every test talks to a real ``redis-server`` started by the fixtures in
``tests/conftest.py`` and to the loopback upstream (``tests/upstream.py``),
which counts requests in flight and logs when each one arrived. In-process
tests run several routers (each with its own ``RedisFleet``) on the three
loops; the process tests run ``tests/fleet_worker.py`` members, so that
SIGKILL, SIGSTOP and a skewed clock hit one member only.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from redis_server import RedisServer
from upstream import Upstream

from hostpool import FleetQuota, FleetUnavailable, HostRouter, PoolTimeout, Quota, Rate
from hostpool.redis import RedisFleet

HOST = "127.0.0.1"
OTHER = "127.0.0.2"
WORKER = Path(__file__).resolve().parent.parent / "fleet_worker.py"


def _router(
    server: RedisServer,
    quota: Quota,
    *,
    namespace: str = "test",
    host: str = HOST,
    pool_timeout: float = 10.0,
    **fleet_options: Any,
) -> HostRouter:
    fleet_options.setdefault("timeout", 1.0)
    fleet = RedisFleet(server.url, namespace=namespace, **fleet_options)
    return HostRouter(
        quotas={host: quota},
        fleet=fleet,
        timeout=httpx.Timeout(30.0, pool=pool_timeout),
    )


@asynccontextmanager
async def _routers(routers: Sequence[HostRouter]) -> AsyncIterator[Sequence[HostRouter]]:
    try:
        yield routers
    finally:
        for router in routers:
            await router.aclose()


async def _fire(router: HostRouter, url: str, n: int, statuses: list[int]) -> None:
    async with anyio.create_task_group() as group:
        for _ in range(n):

            async def one() -> None:
                response = await router.get(url)
                statuses.append(response.status_code)

            group.start_soon(one)


def _starts(upstream: Upstream, host: str = HOST, path: str = "/") -> list[float]:
    return sorted(
        r.started_at for r in upstream.request_log() if r.host == host and r.target.startswith(path)
    )


def _most_in_window(starts: Sequence[float], window: float) -> int:
    """The most start times in any window ``[a, a + window]`` (a: one of the starts)."""
    best = 0
    j = 0
    for i, a in enumerate(starts):
        j = max(j, i)
        while j < len(starts) and starts[j] <= a + window:
            j += 1
        best = max(best, j - i)
    return best


def _lease_count(server: RedisServer, fleet_key: str, namespace: str = "test") -> int:
    return int(server.command("ZCARD", f"hostpool:{{{namespace}:{fleet_key}}}:leases"))


async def _eventually(check: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``check`` until true; return how long it took; fail after ``within`` seconds."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            pytest.fail(f"not within {within}s: {what}")
        await anyio.sleep(0.01)
    return time.monotonic() - start


pytestmark = pytest.mark.anyio

#: The process tests run their members on every loop (``--backend``); the
#: test's own side (one router, the server's log) needs only one.
_IN_ASYNCIO = pytest.mark.parametrize("anyio_backend", [("asyncio", {})], indirect=True)


# --------------------------------------------------------------------------
# Several routers in one process
# --------------------------------------------------------------------------


async def test_fleet_cap_holds_across_routers_and_is_used_in_full(
    redis_server: RedisServer, upstream: Upstream
) -> None:
    """Three routers, local cap 10 each, fleet cap 6: the upstream sees at most 6, and 6."""
    quota = Quota(max_connections=10, fleet=FleetQuota(max_connections=6))
    statuses: list[int] = []
    async with _routers([_router(redis_server, quota) for _ in range(3)]) as routers:
        async with anyio.create_task_group() as group:
            for router in routers:
                group.start_soon(_fire, router, upstream.url(HOST, "/delay?ms=40"), 15, statuses)
        waits = sum(router.stats().fleet_waits for router in routers)
    assert statuses == [200] * 45
    peak = upstream.stats(HOST).peak_in_flight
    assert peak <= 6, f"the fleet cap was exceeded: {peak} in flight at the upstream"
    assert peak >= 5, f"the fleet cap was not used: peak {peak} of 6"
    assert waits > 0  # 30 requests wanted in at once: some had to wait for the fleet
    assert _lease_count(redis_server, HOST) == 0, "leases left behind after every request ended"


async def test_fleet_rate_holds_across_routers(
    redis_server: RedisServer, upstream: Upstream
) -> None:
    """Two routers share Rate(40/s, burst 4): any window of w s sees <= 4 + 40 w (+1) starts."""
    rate = Rate(40, per=1.0, burst=4)
    quota = Quota(max_connections=20, fleet=FleetQuota(rate=rate))
    statuses: list[int] = []
    started = time.monotonic()
    routers = [_router(redis_server, quota) for _ in range(2)]
    async with _routers(routers), anyio.create_task_group() as group:
        for router in routers:
            group.start_soon(_fire, router, upstream.url(HOST, "/"), 14, statuses)
    elapsed = time.monotonic() - started
    assert statuses == [200] * 28
    starts = _starts(upstream)
    for window in (0.1, 0.25, 0.5):
        # +1: the server stamps a start a little after the fleet granted it,
        # so two grants one interval apart can land closer together.
        allowed = rate.burst_size + window * 40 + 1
        seen = _most_in_window(starts, window)
        assert seen <= allowed, f"{seen} starts within {window}s, rate allows {allowed:.1f}"
    assert elapsed >= (28 - 4) / 40 - 0.1, f"28 requests at 40/s took only {elapsed:.2f}s"


async def test_a_long_request_keeps_its_lease_by_renewal(
    redis_server: RedisServer, upstream: Upstream
) -> None:
    """lease_ttl 0.6 s, a request of 1.5 s: renewals keep the fleet's only slot taken."""
    quota = Quota(max_connections=5, fleet=FleetQuota(max_connections=1))
    async with _routers(
        [
            _router(redis_server, quota, lease_ttl=0.6, timeout=0.3),
            _router(redis_server, quota, lease_ttl=0.6, timeout=0.3, pool_timeout=0.4),
        ]
    ) as (holder, other):
        async with anyio.create_task_group() as group:
            group.start_soon(holder.get, upstream.url(HOST, "/delay?ms=1500"))
            await _eventually(
                lambda: upstream.stats(HOST).in_flight == 1, 5.0, "the long request to start"
            )
            await anyio.sleep(0.8)  # past the TTL: only renewal can keep the lease
            with pytest.raises(PoolTimeout, match="fleet"):
                await other.get(upstream.url(HOST, "/"))
        response = await other.get(upstream.url(HOST, "/"))
        assert response.status_code == 200
        assert holder.stats().fleet_leases_lost == 0
    assert upstream.stats(HOST).peak_in_flight == 1


async def test_a_retry_after_pause_is_shared_by_the_fleet(
    redis_server: RedisServer, upstream: Upstream
) -> None:
    """Router A gets 429 Retry-After: 1; router B, which saw nothing, waits it out too."""
    quota = Quota(max_connections=5, fleet=FleetQuota(max_connections=10), respect_retry_after=True)
    async with _routers([_router(redis_server, quota) for _ in range(2)]) as (a, b):
        response = await a.get(upstream.url(HOST, "/status?code=429&retry_after=1"))
        assert response.status_code == 429
        paused_at = time.monotonic()
        await _eventually(
            lambda: redis_server.command("EXISTS", f"hostpool:{{test:{HOST}}}:pause") == 1,
            2.0,
            "the pause to reach Redis",
        )
        upstream.reset_counters()
        response = await b.get(upstream.url(HOST, "/"))
        assert response.status_code == 200
        (start,) = _starts(upstream)
        assert start - paused_at >= 0.8, "B sent before the fleet's pause ended"
        assert b.stats().partitions[HOST].pause_delayed == 1
        # Another host is not paused.
        started = time.monotonic()
        await b.get(upstream.url(OTHER, "/"))
        assert time.monotonic() - started < 0.5


async def test_redis_restart_falls_back_to_local_caps_and_enforcement_resumes(
    fresh_redis_server: RedisServer, upstream: Upstream
) -> None:
    """on_unavailable="local": no request error while Redis is down; local caps hold; then fleet."""
    server = fresh_redis_server
    quota = Quota(max_connections=4, fleet=FleetQuota(max_connections=2))
    url = upstream.url(HOST, "/delay?ms=60")
    statuses: list[int] = []
    router = _router(server, quota, timeout=0.3, retry_interval=0.2)
    async with _routers([router]):
        await _fire(router, url, 8, statuses)
        assert upstream.stats(HOST).peak_in_flight == 2

        server.stop()
        upstream.reset_peaks()
        await _fire(router, url, 8, statuses)
        assert router.stats().fleet_degraded
        assert router.stats().fleet_unavailable >= 1
        assert 2 < upstream.stats(HOST).peak_in_flight <= 4  # local cap only, and held

        server.restart()  # same port, empty: the scripts must be loaded again
        await anyio.sleep(0.3)  # past retry_interval
        upstream.reset_peaks()
        await _fire(router, url, 8, statuses)
        assert upstream.stats(HOST).peak_in_flight <= 2, "fleet cap not enforced after restart"
        assert not router.stats().fleet_degraded
    assert statuses == [200] * 24


async def test_fail_policy_raises_fleet_unavailable_within_the_timeout(
    fresh_redis_server: RedisServer, upstream: Upstream
) -> None:
    quota = Quota(max_connections=4, fleet=FleetQuota(max_connections=2))
    router = _router(fresh_redis_server, quota, timeout=0.2, on_unavailable="fail")
    async with _routers([router]):
        assert (await router.get(upstream.url(HOST, "/"))).status_code == 200
        fresh_redis_server.kill()
        started = time.monotonic()
        with pytest.raises(FleetUnavailable) as caught:
            await router.get(upstream.url(HOST, "/"))
        assert time.monotonic() - started < 0.2 + 0.5
        assert caught.value.partition == HOST
        assert "on_unavailable='fail'" in str(caught.value)
        stats = router.stats()
        assert stats.in_flight == 0
        assert stats.waiting == 0
        assert stats.fleet_degraded


async def test_a_paused_redis_bounds_admission_latency_by_the_timeout(
    redis_server: RedisServer, upstream: Upstream
) -> None:
    """CLIENT PAUSE: the admission gives up on Redis after ``timeout`` and admits locally."""
    quota = Quota(max_connections=4, fleet=FleetQuota(max_connections=2))
    router = _router(redis_server, quota, timeout=0.2, retry_interval=5.0)
    async with _routers([router]):
        await router.get(upstream.url(HOST, "/"))  # connected, scripts loaded
        # Short: Redis 7.0 blocks CLIENT UNPAUSE itself until the pause ends.
        redis_server.command("CLIENT", "PAUSE", "1000", "ALL")
        try:
            started = time.monotonic()
            response = await router.get(upstream.url(HOST, "/"))
            first = time.monotonic() - started
            started = time.monotonic()
            await router.get(upstream.url(HOST, "/"))  # within retry_interval: Redis not asked
            second = time.monotonic() - started
        finally:
            redis_server.command("CLIENT", "UNPAUSE")
        assert response.status_code == 200
        assert 0.15 <= first < 0.2 + 0.6, f"admission took {first:.2f}s with Redis paused"
        assert second < 0.15
        assert router.stats().fleet_unavailable == 2


class _ReplyHoldingProxy:
    """A TCP proxy to Redis that can hold Redis's replies back: the command runs, the
    answer is late. So a client can be cancelled *after* Redis granted its lease."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.replies_flow = threading.Event()
        self.replies_flow.set()
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies:
                    self.replies_flow.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.replies_flow.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


async def test_cancelled_while_asking_redis_leaks_no_lease(
    redis_server: RedisServer, upstream: Upstream
) -> None:
    """Cancelled after Redis granted the lease but before the answer came: it is given back
    at once, not left to expire after lease_ttl."""
    quota = Quota(max_connections=4, fleet=FleetQuota(max_connections=1))
    ttl = 3.0
    proxy = _ReplyHoldingProxy(redis_server.port)
    fleet = RedisFleet(proxy.url, namespace="test", timeout=2.0, lease_ttl=ttl)
    router = HostRouter(quotas={HOST: quota}, fleet=fleet)
    try:
        async with _routers([router]):
            await router.get(upstream.url(HOST, "/"))  # connected, scripts loaded
            await _eventually(
                lambda: _lease_count(redis_server, HOST) == 0, 2.0, "the first lease's release"
            )
            proxy.replies_flow.clear()
            async with anyio.create_task_group() as group:
                group.start_soon(router.get, upstream.url(HOST, "/"))
                await _eventually(
                    lambda: _lease_count(redis_server, HOST) == 1, 2.0, "Redis to grant the lease"
                )
                group.cancel_scope.cancel()  # while its answer is held back
            stats = router.stats()
            assert stats.in_flight == 0
            assert stats.waiting == 0
            took = await _eventually(
                lambda: _lease_count(redis_server, HOST) == 0, ttl, "the lease to be given back"
            )
            assert took < ttl / 3, "the lease was left to expire instead of given back"
            proxy.replies_flow.set()
            response = await router.get(upstream.url(HOST, "/"), timeout=httpx.Timeout(5, pool=1))
            assert response.status_code == 200
    finally:
        proxy.close()


async def test_one_busy_process_does_not_starve_a_quiet_one(
    redis_server: RedisServer, upstream: Upstream
) -> None:
    """Fleet cap 2; A keeps 20 requests waiting, B sends one at a time: B is still served."""
    quota = Quota(max_connections=20, fleet=FleetQuota(max_connections=2))
    url = upstream.url(HOST, "/delay?ms=20")
    async with _routers([_router(redis_server, quota) for _ in range(2)]) as (busy, quiet):
        done = anyio.Event()
        served: list[float] = []

        async def flood() -> None:
            while not done.is_set():
                await busy.get(url)

        async def one_at_a_time() -> None:
            for _ in range(8):
                started = time.monotonic()
                await quiet.get(url)
                served.append(time.monotonic() - started)
            done.set()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                for _ in range(20):
                    group.start_soon(flood)
                # The busy router holds the fleet's two leases before B starts.
                await _eventually(
                    lambda: upstream.stats(HOST).in_flight == 2, 5.0, "the flood to start"
                )
                group.start_soon(one_at_a_time)
    assert len(served) == 8
    # Alone it takes ~20 ms; behind A's 20 waiters in one FIFO it would take
    # ~10 x 20 ms each. Only heads ask, so B's head competes with A's head.
    assert sorted(served)[len(served) // 2] < 0.5, f"the quiet router waited {served}"
    assert upstream.stats(HOST).peak_in_flight <= 2


async def test_waiting_routers_take_turns_across_the_fleet(
    redis_server: RedisServer, upstream: Upstream
) -> None:
    """Fleet cap 1, three routers with six requests waiting each: round-robin over routers.

    Once all three wait, a router is served again only after each other
    waiting router was served once: between two of its grants, at most two
    others. (Without the fleet's waiting order, whichever router asks first
    after a release wins, and one router can be served many times in a row.)
    """
    quota = Quota(max_connections=10, fleet=FleetQuota(max_connections=1))
    names = "abc"
    routers = [_router(redis_server, quota) for _ in names]
    async with _routers(routers), anyio.create_task_group() as group:
        for name, router in zip(names, routers, strict=True):
            url = upstream.url(HOST, f"/delay?ms=15&who={name}")
            for _ in range(6):
                group.start_soon(router.get, url)
    served = [
        record.target.rsplit("who=", 1)[1]
        for record in sorted(upstream.request_log(), key=lambda r: r.started_at)
    ]
    assert sorted(served) == sorted(names * 6)
    # From the first moment all three have been served (all are waiting by
    # then) while each still has requests left: the first 12 grants after it.
    start = max(served.index(name) for name in names)
    window = served[start : start + 12]
    for name in names:
        seen = [i for i, who in enumerate(window) if who == name]
        gaps = [b - a for a, b in itertools.pairwise(seen)]
        assert gaps, f"{name} not served in {window}"
        assert max(gaps) <= len(names), f"{name} waited {max(gaps)} grants: {served}"
    assert upstream.stats(HOST).peak_in_flight == 1


async def test_only_the_head_waiter_asks_redis_again(
    redis_server: RedisServer, upstream: Upstream
) -> None:
    """Twenty requests waiting for a full fleet: one asker polls, not twenty."""
    quota = Quota(max_connections=30, fleet=FleetQuota(max_connections=1))

    def script_calls() -> int:
        stats = redis_server.info("commandstats")
        return sum(
            int(stats[name].split("calls=")[1].split(",")[0])
            for name in ("cmdstat_evalsha", "cmdstat_eval")
            if name in stats
        )

    holder = _router(redis_server, quota)
    waiter = _router(redis_server, quota, poll_interval=0.01)
    async with _routers([holder, waiter]), anyio.create_task_group() as group:
        group.start_soon(holder.get, upstream.url(HOST, "/hold?key=full"))
        await _eventually(lambda: upstream.stats(HOST).in_flight == 1, 5.0, "the holder")
        before = script_calls()
        for _ in range(20):
            group.start_soon(waiter.get, upstream.url(HOST, "/"))
        await anyio.sleep(0.5)
        asked = script_calls() - before
        upstream.release("full")
    # 20 first asks (nobody queued yet when they set out), then one head,
    # first in the fleet's order, every 2.5-7.5 ms: at most 20 + 200.
    # Twenty heads would ask ~1000 times.
    assert asked <= 20 + 0.5 / 0.0025 + 10, f"{asked} script calls in 0.5 s"
    assert upstream.stats(HOST).peak_in_flight == 1


async def test_idle_keys_expire(redis_server: RedisServer, upstream: Upstream) -> None:
    """After the traffic: no lease left, and the rate's state expires on its own."""
    quota = Quota(max_connections=4, fleet=FleetQuota(max_connections=2, rate=Rate(50, burst=2)))
    async with _routers([_router(redis_server, quota)]) as (router,):
        await _fire(router, upstream.url(HOST, "/"), 6, [])
    assert _lease_count(redis_server, HOST) == 0
    await _eventually(
        lambda: redis_server.command("KEYS", "hostpool:*") == [], 3.0, "fleet keys to expire"
    )


async def test_a_redis_py_client_of_the_users_serves_as_the_store(
    redis_server: RedisServer, upstream: Upstream, anyio_backend_name: str
) -> None:
    """``RedisFleet(redis.asyncio.Redis(...))``: same cap, scripts loaded on NOSCRIPT."""
    if anyio_backend_name != "asyncio":
        pytest.skip("redis-py's asyncio client runs on asyncio only")
    redis_asyncio = pytest.importorskip("redis.asyncio")
    client = redis_asyncio.Redis.from_url(redis_server.url)
    quota = Quota(max_connections=10, fleet=FleetQuota(max_connections=3))
    routers = [
        HostRouter(quotas={HOST: quota}, fleet=RedisFleet(client, namespace="test", timeout=1.0))
        for _ in range(2)
    ]
    statuses: list[int] = []
    try:
        async with _routers(routers), anyio.create_task_group() as group:
            for router in routers:
                group.start_soon(_fire, router, upstream.url(HOST, "/delay?ms=30"), 10, statuses)
    finally:
        await client.aclose()
    assert statuses == [200] * 20
    assert upstream.stats(HOST).peak_in_flight == 3
    assert _lease_count(redis_server, HOST) == 0


# --------------------------------------------------------------------------
# Bad input: a clear error at construction, nothing started
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"url_or_client": "http://127.0.0.1:6379"}, ValueError, "scheme"),
        ({"url_or_client": "redis://127.0.0.1:99999/0"}, ValueError, "port"),
        ({"url_or_client": "redis://:s3cret@127.0.0.1:6379/x"}, ValueError, r"\*\*\*"),
        ({"url_or_client": 42}, TypeError, "URL or a client"),
        ({"on_unavailable": "sometimes"}, ValueError, "on_unavailable"),
        ({"lease_ttl": 0}, ValueError, "lease_ttl"),
        ({"lease_ttl": "10"}, TypeError, "lease_ttl"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"timeout": 20.0}, ValueError, "shorter than lease_ttl"),
        ({"namespace": ""}, ValueError, "namespace"),
        ({"namespace": "a{b}"}, ValueError, "braces"),
    ],
)
def test_bad_fleet_arguments_fail_in_the_constructor(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    arguments: dict[str, Any] = {"url_or_client": "redis://127.0.0.1:6379/0", **kwargs}
    with pytest.raises(error, match=match) as caught:
        RedisFleet(**arguments)
    assert "s3cret" not in str(caught.value)


def test_a_fleet_quota_without_a_fleet_and_a_shared_fleet_are_refused(
    redis_server: RedisServer,
) -> None:
    clients_before = redis_server.info("clients")["connected_clients"]
    with pytest.raises(ValueError, match="api.vendor.com"):
        HostRouter(quotas={"api.vendor.com": Quota(5, fleet=FleetQuota(max_connections=10))})
    fleet = RedisFleet(redis_server.url, namespace="test")
    HostRouter(quotas={"a.com": Quota(5, fleet=FleetQuota(max_connections=10))}, fleet=fleet)
    with pytest.raises(ValueError, match="another HostRouter"):
        HostRouter(fleet=fleet)
    with pytest.raises(TypeError, match="fleet store"):
        HostRouter(fleet="redis://127.0.0.1:6379/0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="below reserved"):
        Quota(10, reserved=5, fleet=FleetQuota(max_connections=4))
    # Nothing was opened by any of it.
    assert redis_server.info("clients")["connected_clients"] == clients_before
    assert "s3cret" not in repr(RedisFleet("redis://:s3cret@127.0.0.1:6379/0"))


# --------------------------------------------------------------------------
# Several processes
# --------------------------------------------------------------------------


class _Worker:
    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    def wait_ready(self, within: float = 20.0) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + within
        line = self.process.stdout.readline()
        assert line.strip() == "ready", f"worker said {line!r} (deadline {deadline})"

    def result(self, within: float = 60.0) -> dict[str, Any]:
        out, err = self.process.communicate(timeout=within)
        assert self.process.returncode == 0, f"worker failed:\n{err}"
        return dict(json.loads(out.strip().splitlines()[-1]))


@pytest.fixture
def spawn() -> Iterator[Callable[..., _Worker]]:
    workers: list[_Worker] = []

    def start(server: RedisServer, url: str, **options: Any) -> _Worker:
        command = [sys.executable, str(WORKER), "--redis", server.url, "--url", url]
        for name, value in options.items():
            command += [f"--{name.replace('_', '-')}", str(value)]
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        worker = _Worker(process)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGCONT)
            worker.process.kill()
        worker.process.communicate()


@pytest.fixture(params=["asyncio", "trio"])
def worker_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@_IN_ASYNCIO
async def test_fleet_cap_holds_across_processes(
    redis_server: RedisServer,
    upstream: Upstream,
    spawn: Callable[..., _Worker],
    worker_backend: str,
) -> None:
    """Four processes, local cap 10 each, fleet cap 8: the upstream sees <= 8, and >= 7."""
    workers = [
        spawn(
            redis_server,
            upstream.url(HOST, "/delay?ms=30"),
            requests=40,
            concurrency=10,
            local_cap=10,
            fleet_cap=8,
            backend=worker_backend,
        )
        for _ in range(4)
    ]
    results = [worker.result() for worker in workers]
    for result in results:
        assert result["statuses"] == {"200": 40}, result
        assert result["errors"] == {}, result
    peak = upstream.stats(HOST).peak_in_flight
    assert 7 <= peak <= 8, f"peak in flight at the upstream: {peak}"
    assert _lease_count(redis_server, HOST) == 0


@_IN_ASYNCIO
async def test_fleet_rate_holds_across_processes(
    redis_server: RedisServer, upstream: Upstream, spawn: Callable[..., _Worker]
) -> None:
    """Three processes share Rate(50/s, burst 5), checked in every window from the server."""
    workers = [
        spawn(
            redis_server,
            upstream.url(HOST, "/"),
            requests=20,
            concurrency=5,
            fleet_rate=50,
            fleet_burst=5,
            backend=backend,
        )
        for backend in ("asyncio", "trio", "uvloop")
    ]
    for worker in workers:
        assert worker.result()["statuses"] == {"200": 20}
    starts = _starts(upstream)
    assert len(starts) == 60
    for window in (0.1, 0.3, 1.0):
        allowed = 5 + 50 * window + 1
        seen = _most_in_window(starts, window)
        assert seen <= allowed, f"{seen} starts within {window}s, the fleet rate allows {allowed}"


@_IN_ASYNCIO
async def test_a_killed_holders_leases_come_back_after_the_ttl_not_before(
    redis_server: RedisServer, upstream: Upstream, spawn: Callable[..., _Worker]
) -> None:
    """SIGKILL with 3 leases held: the fleet's slots return within lease_ttl, not much earlier."""
    ttl = 1.5
    holder = spawn(
        redis_server,
        upstream.url(HOST, "/hold?key=held"),
        requests=3,
        concurrency=3,
        fleet_cap=3,
        ttl=ttl,
    )
    holder.wait_ready()
    await _eventually(lambda: upstream.stats(HOST).in_flight == 3, 20.0, "3 held requests")
    assert _lease_count(redis_server, HOST) == 3
    holder.process.kill()
    killed_at = time.monotonic()
    holder.process.wait()
    quota = Quota(max_connections=5, fleet=FleetQuota(max_connections=3))
    async with _routers([_router(redis_server, quota, lease_ttl=ttl)]) as (router,):
        response = await router.get(upstream.url(HOST, "/"))
    served = [t for t in _starts(upstream) if t > killed_at]
    assert response.status_code == 200
    assert len(served) == 1
    waited = served[0] - killed_at
    # The last renewal was at most lease_ttl/3 (plus a keeper's turn) before the kill.
    assert ttl / 2 <= waited <= ttl + 0.5, f"the slot came back {waited:.2f}s after the kill"
    upstream.release("held")


@_IN_ASYNCIO
async def test_a_stalled_holder_loses_its_lease_and_frees_nothing_of_others(
    redis_server: RedisServer, upstream: Upstream, spawn: Callable[..., _Worker]
) -> None:
    """SIGSTOP past the TTL: others take the slots; on resume the loss is reported, and its
    late releases leave the new holders' leases alone."""
    ttl = 1.0
    stalled = spawn(
        redis_server,
        upstream.url(HOST, "/hold?key=stalled"),
        requests=2,
        concurrency=2,
        fleet_cap=2,
        ttl=ttl,
        timeout=0.5,
    )
    stalled.wait_ready()
    await _eventually(lambda: upstream.stats(HOST).in_flight == 2, 20.0, "2 held requests")
    stalled.process.send_signal(signal.SIGSTOP)
    quota = Quota(max_connections=5, fleet=FleetQuota(max_connections=2))
    router = _router(redis_server, quota, lease_ttl=ttl, timeout=0.5)
    async with _routers([router]), anyio.create_task_group() as group:
        for _ in range(2):
            group.start_soon(router.get, upstream.url(HOST, "/hold?key=taker"))
        await _eventually(
            lambda: upstream.stats(HOST).in_flight == 4, 5.0, "the takers to get the slots"
        )
        stalled.process.send_signal(signal.SIGCONT)
        await anyio.sleep(ttl / 3 + 0.4)  # the resumed keeper renews and finds them lost
        upstream.release("stalled")
        result = stalled.result()
        assert result["statuses"] == {"200": 2}
        assert result["stats"]["fleet_leases_lost"] == 2
        # Its releases removed only its own (gone) ids: the takers' remain.
        assert _lease_count(redis_server, HOST) == 2
        upstream.release("taker")
    assert _lease_count(redis_server, HOST) == 0


@_IN_ASYNCIO
async def test_a_skewed_client_clock_changes_nothing(
    redis_server: RedisServer, upstream: Upstream, spawn: Callable[..., _Worker]
) -> None:
    """Members an hour ahead and behind share the cap exactly as the others: Redis keeps time."""
    workers = [
        spawn(
            redis_server,
            upstream.url(HOST, "/delay?ms=30"),
            requests=30,
            concurrency=6,
            fleet_cap=4,
            skew=skew,
            ttl=2.0,
        )
        for skew in (3600.0, -3600.0, 0.0)
    ]
    for worker in workers:
        result = worker.result()
        assert result["statuses"] == {"200": 30}, result
        assert result["stats"]["fleet_leases_lost"] == 0
    peak = upstream.stats(HOST).peak_in_flight
    assert 3 <= peak <= 4, f"peak {peak} with a fleet cap of 4"


@_IN_ASYNCIO
async def test_a_holder_stalled_past_the_ttl_reports_the_loss_even_if_nobody_took_it(
    redis_server: RedisServer, upstream: Upstream, spawn: Callable[..., _Worker]
) -> None:
    """Expired is lost, taken or not: a renewal never brings a lease back to life."""
    ttl = 1.0
    stalled = spawn(
        redis_server,
        upstream.url(HOST, "/hold?key=alone"),
        requests=2,
        concurrency=2,
        fleet_cap=2,
        ttl=ttl,
        timeout=0.5,
    )
    stalled.wait_ready()
    await _eventually(lambda: upstream.stats(HOST).in_flight == 2, 20.0, "2 held requests")
    stalled.process.send_signal(signal.SIGSTOP)
    await anyio.sleep(ttl + 0.4)
    stalled.process.send_signal(signal.SIGCONT)
    await anyio.sleep(ttl / 3 + 0.4)  # the resumed keeper's renewal
    upstream.release("alone")
    result = stalled.result()
    assert result["statuses"] == {"200": 2}
    assert result["stats"]["fleet_leases_lost"] == 2
    assert _lease_count(redis_server, HOST) == 0

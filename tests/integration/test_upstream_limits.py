"""The upstream's own limits against a real loopback upstream: rate, Retry-After pauses.

Every timing claim is read from the *server's* side: ``upstream.request_log()``
stamps each request with ``time.monotonic()`` when its head arrived, which is
the clock the client side measures with here too (trio's clock has another
origin, so nothing mixes loop-clock values with these). Bounds carry margins
for CI (2 slow cores, three event loops): no test asserts an exact duration.

The semantics checked, from ``Quota`` and ``Admission._admit_limited``:

- ``rate``: at most ``burst + w * requests / per`` requests *start* in any
  window of ``w`` seconds. A request reserves its start while holding its
  connection slot and sleeps until it, holding the slot, so a start is
  never spent late; so ``max_connections`` bounds what a queue of rate
  waiters holds of the router's budget.
- ``respect_retry_after``: a 429 or 503 answer with ``Retry-After`` is
  returned to the caller unchanged and pauses new admissions to its
  partition (only) until then, at most ``max_retry_after``. A paused
  partition's requests wait out the pause *without* a slot; a request that
  would wait past its pool timeout fails at once.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import math
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from upstream import Upstream

import hostpool
from hostpool import HostRouter, Quota, Rate

pytestmark = pytest.mark.anyio

H1, H2 = "127.0.0.1", "127.0.0.2"

#: Slack for "no earlier than": both sides read time.monotonic(); the loop may
#: wake a timer a clock tick early. Far below any pause or interval used here.
EARLY = 0.02


# -- helpers -----------------------------------------------------------------


async def get_all(router: HostRouter, urls: Sequence[str], **kwargs: Any) -> list[Any]:
    """GET every URL concurrently; return each response or exception, in order."""
    results: list[Any] = [None] * len(urls)

    async def one(i: int, url: str) -> None:
        try:
            results[i] = await router.get(url, **kwargs)
        except Exception as exc:
            results[i] = exc

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            for i, url in enumerate(urls):
                tg.start_soon(one, i, url)
    return results


@asynccontextmanager
async def background(
    router: HostRouter, urls: Sequence[str], results: list[Any]
) -> AsyncIterator[None]:
    """GET every URL in the background; on exit wait for them all (bounded)."""

    async def one(url: str) -> None:
        try:
            results.append(await router.get(url))
        except Exception as exc:
            results.append(exc)

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            for url in urls:
                tg.start_soon(one, url)
            yield


def starts(upstream: Upstream, host: str, prefix: str = "/") -> list[float]:
    """Server-side start times (monotonic) of the requests to ``host`` whose target starts so."""
    return sorted(
        r.started_at
        for r in upstream.request_log()
        if r.host == host and r.target.startswith(prefix)
    )


def start_of(upstream: Upstream, host: str, target: str) -> float:
    (only,) = [
        r.started_at for r in upstream.request_log() if r.host == host and r.target == target
    ]
    return only


def assert_rate_bound(seen: list[float], rate: Rate, *, jitter: int = 1) -> None:
    """At most ``burst + w * requests / per (+ jitter)`` starts in any window ``[a, a + w]``.

    The client keeps the bound exactly on its own clock; the server stamps a
    request when its head arrives, a little later and not always by the same
    amount (the event loop, the GIL shared with the server's thread). A
    request delayed by up to one interval more than a later one narrows a
    window by as much, which can let one more start into it: hence
    ``jitter=1``. With both cores busy that delay was seen to vary by ~30 ms,
    so the rates checked this way keep an interval of 50 ms. Windows bounded
    by two starts are the fullest there are.
    """
    for i, a in enumerate(seen):
        for j in range(i, len(seen)):
            w = seen[j] - a
            count = j - i + 1
            allowed = rate.burst_size + w / rate.interval + jitter
            assert count <= allowed, (
                f"{count} requests started within {w:.3f}s; {rate} allows {allowed:.2f} "
                f"(starts: {[round(s - seen[0], 3) for s in seen]})"
            )


def status_url(upstream: Upstream, host: str, code: int, retry_after: str | None = None) -> str:
    query: dict[str, Any] = {"code": code}
    if retry_after is not None:
        query["retry_after"] = retry_after
    return upstream.url(host, "/status?" + urllib.parse.urlencode(query))


def http_date(timestamp: float) -> str:
    return email.utils.format_datetime(
        datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc), usegmt=True
    )


def counted(router: HostRouter, key: str, name: str) -> int:
    """A count of partition ``key`` (0 before the partition exists)."""
    partition = router.stats().partitions.get(key)
    return 0 if partition is None else getattr(partition, name)


def quiet(router: HostRouter) -> bool:
    stats = router.stats()
    return stats.in_flight == 0 and stats.waiting == 0


def pausing(**kwargs: Any) -> Quota:
    return Quota(
        max_connections=kwargs.pop("max_connections", 5), respect_retry_after=True, **kwargs
    )


# -- 1, 2: the local rate -------------------------------------------------------


async def test_the_rate_bounds_the_starts_the_server_sees_in_every_window(
    upstream: Upstream,
) -> None:
    """25 concurrent requests under Rate(20/s, burst 5): the burst at once, then 20/s.

    Server side: no window of ``w`` seconds holds more than ``5 + 20 w`` starts
    (+1 for jitter, see :func:`assert_rate_bound`); the last starts at least
    ``(25 - 5) / 20`` s after the first (the rate is really applied), and the
    whole run takes about that long, not much more (it is not applied twice).
    """
    rate = Rate(20, per=1.0, burst=5)
    n = 25
    least = (n - rate.burst_size) * rate.interval  # 1.0 s
    async with HostRouter(quotas={H1: Quota(max_connections=20, rate=rate)}) as router:
        # Open a burst's worth of keep-alive connections first, so that connects
        # do not skew the timings, and let the bucket fill up again.
        assert all(r.status_code == 200 for r in await get_all(router, [upstream.url(H1)] * 5))
        await anyio.sleep(rate.burst_size * rate.interval + 0.1)
        upstream.reset_counters()
        began = time.monotonic()
        results = await get_all(router, [upstream.url(H1, "/ok")] * n)
        took = time.monotonic() - began
        stats = router.stats().partitions[H1]
    assert [getattr(r, "status_code", r) for r in results] == [200] * n
    seen = starts(upstream, H1)
    assert len(seen) == n
    assert_rate_bound(seen, rate)
    assert seen[-1] - seen[0] >= least - rate.interval
    assert least - 0.05 <= took <= least + 2.0
    # Every request past the burst waited for its start, and no other did.
    assert stats.rate_delayed == n - rate.burst_size
    assert stats.pool_timeouts == 0 and stats.in_flight == 0


async def test_a_slot_cap_below_the_burst_caps_concurrency_and_the_rate_still_holds(
    upstream: Upstream,
) -> None:
    """max_connections=2 under Rate(20/s, burst 8): both limits hold at once.

    A request takes its slot first and its start second, so the burst of 8
    can never run 8 at once: the server sees at most 2 in flight (and
    exactly 2: the cap is used), and the starts still keep to the rate once
    the slot cap no longer binds (10 ms requests: 2 slots could start 200/s).
    """
    rate = Rate(20, per=1.0, burst=8)
    n = 16
    async with HostRouter(quotas={H1: Quota(max_connections=2, rate=rate)}) as router:
        results = await get_all(router, [upstream.url(H1, "/delay?ms=10")] * n)
        stats = router.stats().partitions[H1]
    assert [getattr(r, "status_code", r) for r in results] == [200] * n
    assert upstream.stats(H1).peak_in_flight == 2
    seen = starts(upstream, H1)
    assert_rate_bound(seen, rate)
    assert seen[-1] - seen[0] >= (n - rate.burst_size - 1) * rate.interval
    assert stats.peak_in_flight == 2 and stats.in_flight == 0


async def test_requests_waiting_for_a_rate_start_hold_only_their_partitions_slots(
    upstream: Upstream,
) -> None:
    """Documented trade-off: a rate waiter holds its slot, so its quota bounds what it holds.

    H1 (max_connections=2, Rate(3/s, burst 1)) gets 3 requests: one starts,
    two hold H1's two slots while they wait for their starts (0.33 s and
    0.67 s away). The router's budget is 4: H2's two requests are served at
    once, side by side, while H1's still wait.
    """
    router = HostRouter(
        limits=httpx.Limits(max_connections=4),
        quotas={H1: Quota(max_connections=2, rate=Rate(3, per=1.0, burst=1))},
    )
    results: list[Any] = []
    async with router, background(router, [upstream.url(H1, "/ok")] * 3, results):
        await upstream.wait_until(lambda: counted(router, H1, "rate_delayed") == 2)
        assert router.stats().partitions[H1].in_flight == 2
        async with background(router, [upstream.url(H2, "/hold?key=b")] * 2, results):
            await upstream.wait_until(lambda: upstream.stats(H2).in_flight == 2)
            # H1's second and third requests have not started yet.
            assert upstream.stats(H1).requests == 1
            upstream.release("b")
    assert [getattr(r, "status_code", r) for r in results] == [200] * 5
    assert upstream.stats(H2).peak_in_flight == 2


# -- 3: a rate start past the pool timeout ------------------------------------------


async def test_a_rate_start_past_the_pool_timeout_fails_at_once_naming_the_rate(
    upstream: Upstream,
) -> None:
    """Rate(1 per 10 s): the second request's start is ~10 s away, past its 0.5 s pool timeout.

    It fails with :class:`hostpool.PoolTimeout` at once (no point waiting
    0.5 s for a start 10 s away), the message names the rate, the timeout
    is counted, nothing is left in flight or waiting, and the upstream saw
    one request.
    """
    quota = Quota(max_connections=5, rate=Rate(1, per=10.0, burst=1))
    async with HostRouter(quotas={H1: quota}) as router:
        assert (await router.get(upstream.url(H1, "/ok"))).status_code == 200
        began = time.monotonic()
        with anyio.fail_after(2), pytest.raises(hostpool.PoolTimeout, match="rate") as caught:
            await router.get(upstream.url(H1, "/ok"), timeout=httpx.Timeout(5.0, pool=0.5))
        took = time.monotonic() - began
        stats = router.stats()
    assert took < 0.25
    assert isinstance(caught.value, httpx.PoolTimeout)
    assert caught.value.partition == H1
    assert "1/10s (burst 1)" in str(caught.value)
    assert stats.partitions[H1].pool_timeouts == 1
    assert stats.partitions[H1].rate_delayed == 0
    assert stats.in_flight == 0 and stats.waiting == 0
    assert upstream.stats(H1).requests == 1


# -- 4, 5: Retry-After pauses -------------------------------------------------------


@pytest.mark.parametrize("code", [429, 503])
async def test_retry_after_seconds_pauses_the_partition_and_only_it(
    upstream: Upstream, code: int
) -> None:
    """``Retry-After: 1`` on a 429/503: returned unchanged; H1 waits ~1 s, H2 does not.

    The pause begins when the answer reaches the client, so after the
    server *sent* it: H1's next request starts no earlier than 1 s after the
    server saw the 429, and not much later either. H2 meanwhile is served
    at once.
    """
    async with HostRouter(default_quota=pausing(max_retry_after=10.0)) as router:
        response = await router.get(status_url(upstream, H1, code, "1"))
        answered = time.monotonic()
        assert response.status_code == code
        assert response.headers["retry-after"] == "1"
        assert response.text == f"status {code}"
        results = await get_all(router, [upstream.url(H1, "/ok?after"), upstream.url(H2, "/ok")])
        stats = router.stats()
    assert [r.status_code for r in results] == [200, 200]
    refused = start_of(upstream, H1, f"/status?code={code}&retry_after=1")
    after = start_of(upstream, H1, "/ok?after")
    assert after - refused >= 1.0 - EARLY
    assert after - answered <= 1.0 + 1.0
    assert start_of(upstream, H2, "/ok") - answered < 0.5
    assert stats.partitions[H1].pauses == 1
    assert stats.partitions[H1].pause_delayed == 1
    assert stats.partitions[H2].pause_delayed == 0
    assert stats.partitions[H1].paused_for == 0.0


@pytest.mark.parametrize(
    ("code", "respect"),
    [(500, True), (502, True), (200, True), (429, False), (503, False), (429, None)],
    ids=["500", "502", "200", "429-not-respected", "503-not-respected", "429-default-router"],
)
async def test_no_pause_for_other_statuses_or_without_respect_retry_after(
    upstream: Upstream, code: int, respect: bool | None
) -> None:
    """Only 429 and 503 pause, and only with ``respect_retry_after=True`` (default: False)."""
    if respect is None:
        router = HostRouter()
    else:
        router = HostRouter(default_quota=Quota(max_connections=5, respect_retry_after=respect))
    async with router:
        response = await router.get(status_url(upstream, H1, code, "5"))
        assert response.status_code == code and response.headers["retry-after"] == "5"
        began = time.monotonic()
        assert (await router.get(upstream.url(H1, "/ok"))).status_code == 200
        took = time.monotonic() - began
        stats = router.stats().partitions[H1]
    assert took < 0.5  # the pause asked for is 5 s
    assert stats.pauses == 0 and stats.pause_delayed == 0 and stats.paused_for == 0.0


async def test_retry_after_http_date_pauses_until_that_date(upstream: Upstream) -> None:
    """An IMF-fixdate 1-2 s ahead pauses H1 until that instant (wall clock mapped to monotonic)."""
    target = math.ceil(time.time()) + 1.0
    header = http_date(target)
    async with HostRouter(default_quota=pausing()) as router:
        response = await router.get(status_url(upstream, H1, 429, header))
        wall, answered = time.time(), time.monotonic()
        assert response.status_code == 429 and response.headers["retry-after"] == header
        resume = answered + (target - wall)  # the date, on the monotonic clock
        paused_for = router.stats().partitions[H1].paused_for
        assert target - wall - 0.1 <= paused_for <= target - wall + 0.1
        assert (await router.get(upstream.url(H1, "/ok"))).status_code == 200
        stats = router.stats().partitions[H1]
    after = start_of(upstream, H1, "/ok")
    assert after >= resume - EARLY
    assert after <= resume + 1.0
    assert after - starts(upstream, H1, "/status")[0] >= 0.9
    assert stats.pauses == 1 and stats.pause_delayed == 1


@pytest.mark.parametrize(
    ("retry_after", "logged"),
    [
        (http_date(time.time() - 60.0), None),  # in the past: nothing to wait for
        ("0", None),
        ("soon", "malformed Retry-After 'soon'"),
        ("-5", "malformed Retry-After '-5'"),
        ("Wed, 99 Foo", "malformed Retry-After 'Wed, 99 Foo'"),
    ],
    ids=["past-date", "zero", "soon", "negative", "bad-date"],
)
async def test_a_past_or_malformed_retry_after_does_not_pause(
    upstream: Upstream, caplog: pytest.LogCaptureFixture, retry_after: str, logged: str | None
) -> None:
    """A date in the past or 0 asks for nothing; a malformed value is ignored and logged."""
    caplog.set_level(logging.INFO, logger="hostpool")
    async with HostRouter(default_quota=pausing()) as router:
        response = await router.get(status_url(upstream, H1, 429, retry_after))
        assert response.status_code == 429 and response.headers["retry-after"] == retry_after
        began = time.monotonic()
        assert (await router.get(upstream.url(H1, "/ok"))).status_code == 200
        took = time.monotonic() - began
        stats = router.stats().partitions[H1]
    assert took < 0.5
    assert stats.pauses == 0 and stats.pause_delayed == 0 and stats.paused_for == 0.0
    messages = [r.getMessage() for r in caplog.records if r.name == "hostpool"]
    if logged is None:
        assert not [m for m in messages if "Retry-After" in m]
    else:
        (record,) = [r for r in caplog.records if logged in r.getMessage()]
        assert record.levelno == logging.WARNING
        assert H1 in record.getMessage() and "429" in record.getMessage()


async def test_a_huge_retry_after_is_capped_at_max_retry_after(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """``Retry-After: 3600`` with ``max_retry_after=0.5``: a 0.5 s pause, really over after it."""
    caplog.set_level(logging.INFO, logger="hostpool")
    async with HostRouter(default_quota=pausing(max_retry_after=0.5)) as router:
        response = await router.get(status_url(upstream, H1, 429, "3600"))
        answered = time.monotonic()
        assert response.status_code == 429
        paused_for = router.stats().partitions[H1].paused_for
        assert 0.3 < paused_for <= 0.5
        assert (await router.get(upstream.url(H1, "/ok"))).status_code == 200
        stats = router.stats().partitions[H1]
    after = start_of(upstream, H1, "/ok")
    assert after - start_of(upstream, H1, "/status?code=429&retry_after=3600") >= 0.5 - EARLY
    assert after - answered <= 0.5 + 1.0
    assert stats.pauses == 1 and stats.pause_delayed == 1 and stats.paused_for == 0.0
    assert any("capped at max_retry_after=0.5" in r.getMessage() for r in caplog.records)


async def test_a_shorter_retry_after_never_shortens_a_pause(upstream: Upstream) -> None:
    """Two requests in flight both get a 429: ``Retry-After: 2`` first, then ``1``.

    The second answer would end the pause sooner; the pause keeps its
    later end (and only the first counts as a pause): H1's next request
    starts no earlier than 2 s after the first 429 was let through.
    """
    gates = [anyio.Event(), anyio.Event()]

    async def body(gate: anyio.Event) -> AsyncIterator[bytes]:
        await gate.wait()
        yield b"x"

    results: list[Any] = []

    async def refused(seconds: str, gate: anyio.Event) -> None:
        url = status_url(upstream, H1, 429, seconds)
        results.append(await router.post(url, content=body(gate)))

    async with HostRouter(default_quota=pausing()) as router:
        async with anyio.create_task_group() as tg:
            tg.start_soon(refused, "2", gates[0])
            tg.start_soon(refused, "1", gates[1])
            await upstream.wait_until(lambda: upstream.stats(H1).requests == 2)
            gated = time.monotonic()
            gates[0].set()
            await upstream.wait_until(lambda: len(results) == 1)
            gates[1].set()
        assert [r.headers["retry-after"] for r in results] == ["2", "1"]
        assert router.stats().partitions[H1].paused_for > 0.5
        assert (await router.get(upstream.url(H1, "/ok"))).status_code == 200
        stats = router.stats().partitions[H1]
    assert start_of(upstream, H1, "/ok") - gated >= 2.0 - EARLY
    assert stats.pauses == 1


# -- 6, 7, 10: pauses and slots --------------------------------------------------------


async def test_a_paused_partition_waits_without_holding_slots(upstream: Upstream) -> None:
    """Budget 2; H1 paused for 1 s with 3 requests waiting it out; H2 still gets both slots.

    Server side: H2 reaches 2 requests in flight while none of H1's has
    started, and H1's start only once the pause is over.
    """
    router = HostRouter(
        limits=httpx.Limits(max_connections=2), default_quota=pausing(max_connections=2)
    )
    results: list[Any] = []
    async with router:
        assert (await router.get(status_url(upstream, H1, 429, "1"))).status_code == 429
        async with background(router, [upstream.url(H1, "/ok")] * 3, results):
            await upstream.wait_until(lambda: router.stats().partitions[H1].pause_delayed == 3)
            async with background(router, [upstream.url(H2, "/hold?key=b")] * 2, results):
                await upstream.wait_until(lambda: upstream.stats(H2).in_flight == 2)
                assert upstream.stats(H1).requests == 1  # only the 429: the rest still wait
                assert router.stats().partitions[H1].paused_for > 0
                assert router.stats().partitions[H1].in_flight == 0
                upstream.release("b")
    assert [getattr(r, "status_code", r) for r in results] == [200] * 5
    assert upstream.stats(H2).peak_in_flight == 2
    refused = starts(upstream, H1, "/status")[0]
    assert all(s - refused >= 1.0 - EARLY for s in starts(upstream, H1, "/ok"))


@pytest.mark.parametrize("where", ["quota", "request"])
async def test_a_pause_longer_than_the_pool_timeout_fails_at_once_naming_retry_after(
    upstream: Upstream, where: str
) -> None:
    """A 30 s pause against a 0.5 s pool timeout (the quota's or the request's): fail now."""
    quota = pausing(pool_timeout=0.5 if where == "quota" else None)
    timeout = httpx.Timeout(5.0, pool=None if where == "quota" else 0.5)
    async with HostRouter(default_quota=quota, timeout=timeout) as router:
        assert (await router.get(status_url(upstream, H1, 429, "30"))).status_code == 429
        began = time.monotonic()
        with (
            anyio.fail_after(2),
            pytest.raises(hostpool.PoolTimeout, match="Retry-After") as caught,
        ):
            await router.get(upstream.url(H1, "/ok"))
        took = time.monotonic() - began
        stats = router.stats()
    assert took < 0.25
    assert caught.value.partition == H1
    assert stats.partitions[H1].pause_delayed == 1
    assert stats.partitions[H1].pool_timeouts == 1
    assert stats.in_flight == 0 and stats.waiting == 0
    assert upstream.stats(H1).requests == 1


async def test_a_pause_that_begins_while_requests_wait_for_a_slot_holds_them_back(
    upstream: Upstream,
) -> None:
    """H1 at its cap of 2 (a held request, a 429 still uploading its body), 3 waiting for a slot.

    The 429 arrives and pauses H1 for 1 s; then both slots come free during
    the pause (the 429's response, then the held request). Each waiter
    granted a slot in the pause gives it back and waits out the pause: none
    starts, server side, before the pause is over.
    """
    gate = anyio.Event()
    answered = anyio.Event()
    finish = anyio.Event()

    async def body() -> AsyncIterator[bytes]:
        await gate.wait()
        yield b"x"

    async def refused() -> None:
        url = status_url(upstream, H1, 429, "1")
        async with router.stream("POST", url, content=body()) as response:
            assert response.status_code == 429
            answered.set()
            await finish.wait()

    router = HostRouter(default_quota=pausing(max_connections=2))
    results: list[Any] = []
    async with router:
        async with anyio.create_task_group() as tg:
            tg.start_soon(refused)
            async with background(router, [upstream.url(H1, "/hold?key=h")], results):
                await upstream.wait_until(lambda: upstream.stats(H1).requests == 2)
                async with background(router, [upstream.url(H1, "/ok")] * 3, results):
                    await upstream.wait_until(lambda: router.stats().partitions[H1].waiting == 3)
                    gated = time.monotonic()
                    gate.set()  # the server answers 429 once the body is in
                    with anyio.fail_after(5):
                        await answered.wait()
                    # A slot comes free during the pause: the held request's.
                    upstream.release("h")
                    await upstream.wait_until(lambda: upstream.stats(H1).completed == 2)
                    await upstream.wait_until(lambda: router.stats().partitions[H1].waiting == 0)
                    # The waiters wait out the pause without a slot: only the open 429 holds one.
                    partition = router.stats().partitions[H1]
                    assert partition.in_flight == 1 and partition.paused_for > 0
                    finish.set()  # and the 429's slot comes free too
        stats = router.stats().partitions[H1]
    assert [getattr(r, "status_code", r) for r in results] == [200] * 4
    waiters = starts(upstream, H1, "/ok")
    assert len(waiters) == 3
    assert all(s - gated >= 1.0 - EARLY for s in waiters), [s - gated for s in waiters]
    # Each waiter waited out the pause at least once (after giving its slot back).
    assert stats.pause_delayed >= 3 and stats.pauses == 1


# -- 8: cancellation ---------------------------------------------------------------


async def test_a_request_cancelled_while_waiting_for_its_rate_start_gives_it_back(
    upstream: Upstream,
) -> None:
    """Rate(1 per 0.3 s): A starts, B waits for the next start and is cancelled, C takes B's start.

    Nothing leaks (no slot held, nothing waiting), B never reaches the
    server, and C starts one interval after A, not two: the cancelled
    start was given back. C is still paced (not before that interval).
    """
    rate = Rate(10, per=3.0, burst=1)  # one start every 0.3 s
    async with HostRouter(quotas={H1: Quota(max_connections=5, rate=rate)}) as router:
        # Open the connection first (a connect would delay A's arrival, not C's),
        # and let that start's interval pass.
        assert (await router.get(upstream.url(H1, "/ok?warm"))).status_code == 200
        await anyio.sleep(rate.interval + 0.05)
        assert (await router.get(upstream.url(H1, "/ok?a"))).status_code == 200
        with anyio.move_on_after(0.1) as scope:
            await router.get(upstream.url(H1, "/ok?b"))
        assert scope.cancelled_caught
        assert quiet(router)
        assert router.stats().partitions[H1].rate_delayed == 1
        assert (await router.get(upstream.url(H1, "/ok?c"))).status_code == 200
        assert quiet(router)
    a, c = start_of(upstream, H1, "/ok?a"), start_of(upstream, H1, "/ok?c")
    assert [r.target for r in upstream.request_log()] == ["/ok?warm", "/ok?a", "/ok?c"]
    # C asked ~0.1 s after A: unpaced it would start then; paced, one interval
    # after A (B's start, given back); without the refund, two intervals after.
    # The margins absorb the server's stamping jitter.
    assert 0.67 * rate.interval <= c - a < 1.5 * rate.interval


async def test_a_request_cancelled_while_sitting_out_a_pause_leaks_nothing(
    upstream: Upstream,
) -> None:
    """Cancelled in a pause: no slot, no waiter left behind; the pause still holds for the next."""
    async with HostRouter(default_quota=pausing(max_connections=1)) as router:
        assert (await router.get(status_url(upstream, H1, 429, "1"))).status_code == 429
        with anyio.move_on_after(0.1) as scope:
            await router.get(upstream.url(H1, "/ok?cancelled"))
        assert scope.cancelled_caught
        assert quiet(router)
        assert router.stats().partitions[H1].pause_delayed == 1
        assert (await router.get(upstream.url(H1, "/ok"))).status_code == 200
        assert quiet(router)
    assert [r.target for r in upstream.request_log()][1:] == ["/ok"]
    assert start_of(upstream, H1, "/ok") - starts(upstream, H1, "/status")[0] >= 1.0 - EARLY


async def test_a_rate_limited_request_cancelled_while_waiting_for_a_slot_leaks_nothing(
    upstream: Upstream,
) -> None:
    """The limited path's slot wait: cancelled, it leaves the queue and takes no rate start."""
    quota = Quota(max_connections=1, rate=Rate(100, burst=1), respect_retry_after=True)
    results: list[Any] = []
    async with HostRouter(quotas={H1: quota}) as router:
        async with background(router, [upstream.url(H1, "/hold?key=h")], results):
            await upstream.wait_until(lambda: upstream.stats(H1).in_flight == 1)
            with anyio.move_on_after(0.1) as scope:
                await router.get(upstream.url(H1, "/ok?cancelled"))
            assert scope.cancelled_caught
            assert router.stats().partitions[H1].waiting == 0
            upstream.release("h")
        assert quiet(router)
        assert (await router.get(upstream.url(H1, "/ok"))).status_code == 200
        assert quiet(router)
    assert [r.target for r in upstream.request_log()] == ["/hold?key=h", "/ok"]


# -- 9: stats and exporters ----------------------------------------------------------


async def test_the_upstream_limits_show_in_stats_diagnose_repr_and_prometheus(
    upstream: Upstream,
) -> None:
    """``rate_delayed``, ``pauses``, ``pause_delayed``, ``paused_for``; the paused gauge."""
    prometheus = pytest.importorskip("prometheus_client")
    from hostpool.prometheus import HostpoolCollector

    registry = prometheus.CollectorRegistry()

    def scrape(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    quota = Quota(max_connections=5, rate=Rate(20, per=1.0, burst=2), respect_retry_after=True)
    async with HostRouter(quotas={H1: quota}) as router:
        HostpoolCollector(router, registry=registry)
        # Three at once against a burst of 2: one waits for its start.
        assert all(r.status_code == 200 for r in await get_all(router, [upstream.url(H1)] * 3))
        assert router.stats().partitions[H1].rate_delayed == 1
        await anyio.sleep(0.2)  # the bucket fills up again
        assert (await router.get(status_url(upstream, H1, 429, "1"))).status_code == 429
        during = router.stats()
        assert 0.5 < during.partitions[H1].paused_for <= 1.0
        assert during.pauses == 1 and during.partitions[H1].pauses == 1
        assert scrape("hostpool_paused", partition=H1) == 1
        assert scrape("hostpool_pauses_total", partition=H1) == 1
        assert scrape("hostpool_rate_delayed_total", partition=H1) == 1
        (finding,) = [f for f in router.diagnose() if "Retry-After" in f.problem]
        assert finding.partition == H1
        assert "1 pauses" in finding.figure and "paused for another" in finding.figure
        assert "Lower the rate" in finding.suggestion
        assert "HostRouter" in repr(router) and "1 partitions" in repr(router)
        assert (await router.get(upstream.url(H1, "/ok"))).status_code == 200
        after = router.stats()
        assert after.partitions[H1].paused_for == 0.0
        assert after.pause_delayed == 1 and after.partitions[H1].pause_delayed == 1
        assert after.rate_delayed == 1
        assert scrape("hostpool_paused", partition=H1) == 0
        assert scrape("hostpool_pause_delayed_total", partition=H1) == 1
        (finding,) = [f for f in router.diagnose() if "Retry-After" in f.problem]
        assert "paused for another" not in finding.figure
        assert "1 requests held back" in finding.figure
    assert "closed" in repr(router)


# -- bugs found while writing these -------------------------------------------------


async def test_a_pause_that_begins_while_a_request_waits_for_its_rate_start_holds_it_back(
    upstream: Upstream,
) -> None:
    """Rate(2/s, burst 1): A (a 429 still uploading) starts now, B waits 0.5 s for its start.

    A's 429 (Retry-After: 1) arrives while B sleeps toward its start; B
    must not start before the pause is over (at ~1 s), not at 0.5 s.
    """
    gate = anyio.Event()

    async def body() -> AsyncIterator[bytes]:
        await gate.wait()
        yield b"x"

    quota = Quota(max_connections=5, rate=Rate(2, per=1.0, burst=1), respect_retry_after=True)
    results: list[Any] = []
    async with HostRouter(quotas={H1: quota}) as router, anyio.create_task_group() as tg:

        async def refused() -> None:
            response = await router.post(status_url(upstream, H1, 429, "1"), content=body())
            results.append(response)

        tg.start_soon(refused)
        await upstream.wait_until(lambda: upstream.stats(H1).requests == 1)
        async with background(router, [upstream.url(H1, "/ok")], results):
            await upstream.wait_until(lambda: router.stats().partitions[H1].rate_delayed == 1)
            gated = time.monotonic()
            gate.set()
    assert sorted(r.status_code for r in results) == [200, 429]
    assert start_of(upstream, H1, "/ok") - gated >= 1.0 - EARLY


async def test_a_partition_is_not_dropped_while_requests_wait_out_its_pause(
    upstream: Upstream,
) -> None:
    """partition_idle_timeout=0.2 s, a 1 s pause with a request waiting it out.

    The 429 is streamed: its slot is held while the second request joins
    the pause, and given back after. H2's request 0.4 s later runs the
    sweep. The waiting request must still be served (200) and nothing may
    stay in flight.
    """
    router = HostRouter(partition_idle_timeout=0.2, default_quota=pausing())
    results: list[Any] = []
    async with router:
        url = status_url(upstream, H1, 429, "1")
        async with router.stream("GET", url) as response:
            assert response.status_code == 429
            async with background(router, [upstream.url(H1, "/ok")], results):
                await upstream.wait_until(lambda: counted(router, H1, "pause_delayed") == 1)
                await response.aread()  # H1 has nothing in flight now: it goes quiet
                await anyio.sleep(0.4)
                assert (await router.get(upstream.url(H2, "/ok"))).status_code == 200
        assert [getattr(r, "status_code", r) for r in results] == [200]
        assert quiet(router)


async def test_the_rate_outlives_partition_idle_timeout(upstream: Upstream) -> None:
    quota = Quota(max_connections=5, rate=Rate(1, per=2.0, burst=1))
    async with HostRouter(partition_idle_timeout=0.2, quotas={H1: quota}) as router:
        assert (await router.get(upstream.url(H1, "/ok?first"))).status_code == 200
        await anyio.sleep(0.4)
        with anyio.move_on_after(2.5):
            await router.get(upstream.url(H1, "/ok?second"))
    seen = starts(upstream, H1)
    assert len(seen) == 2
    # Forgotten with the partition, the second would start at ~0.4 s.
    assert seen[1] - seen[0] >= quota.rate.interval - EARLY


async def test_a_pause_outlives_partition_idle_timeout(upstream: Upstream) -> None:
    async with HostRouter(partition_idle_timeout=0.2, default_quota=pausing()) as router:
        assert (await router.get(status_url(upstream, H1, 429, "1"))).status_code == 429
        await anyio.sleep(0.4)
        assert (await router.get(upstream.url(H1, "/ok"))).status_code == 200
    assert start_of(upstream, H1, "/ok") - starts(upstream, H1, "/status")[0] >= 1.0 - EARLY


@pytest.mark.parametrize("waiting_for", ["pause", "rate"])
async def test_aclose_fails_requests_waiting_for_a_pause_or_a_rate_start_promptly(
    upstream: Upstream, waiting_for: str
) -> None:
    quota = Quota(max_connections=5, rate=Rate(1, per=30.0, burst=1), respect_retry_after=True)
    # No pool timeout: the request would wait the whole 30 s.
    router = HostRouter(quotas={H1: quota}, timeout=httpx.Timeout(30.0, pool=None))
    results: list[Any] = []
    first = status_url(upstream, H1, 429, "30") if waiting_for == "pause" else upstream.url(H1)
    await router.get(first)
    with anyio.move_on_after(1.5):
        async with background(router, [upstream.url(H1, "/ok")], results):
            await upstream.wait_until(
                lambda: counted(router, H1, "pause_delayed") + counted(router, H1, "rate_delayed")
            )
            with anyio.fail_after(1):
                await router.aclose()
    assert len(results) == 1 and isinstance(results[0], hostpool.RouterClosed)
    assert upstream.stats(H1).requests == 1

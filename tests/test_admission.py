"""Unit tests of :class:`hostpool._admission.Admission` on its own: no sockets, no HTTP.

An ``Admission`` is built exactly as ``HostRouter`` builds it (a quota table,
a partitioner, a budget) and driven with bare URLs: ``admit`` returns a
ticket, the test releases it. Waiters run as tasks; the test waits for them
by polling the admission's own counters inside ``anyio.fail_after``.

The idle sweep is driven by a hand-held clock (``admission._clock``), set
after the first ``admit`` has bound the admission to the running loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from hostpool import PendingLimitExceeded, PoolTimeout, Quota, RouterClosed
from hostpool._admission import Admission, Partition
from hostpool._quota import Partitioner, QuotaTable
from hostpool._scheduler import Status, Ticket
from hostpool._stats import RequestCounts

pytestmark = pytest.mark.anyio

A = httpx.URL("http://a.example/")
B = httpx.URL("http://b.example/")
C = httpx.URL("http://c.example/")
D = httpx.URL("http://d.example/")

#: Slack for timer granularity when checking that a wait lasted *at least* its
#: timeout (asyncio may run a timer up to its clock resolution early).
CLOCK_SLACK = 0.001
#: Generous upper margin for a timed wait on a loaded 2-core machine; still
#: short enough that a deadline four times too late (4 x TIMEOUT) fails.
LATE_MARGIN = 0.5
TIMEOUT = 0.2

IDLE = 10.0


def make_admission(
    quotas: dict[str, int | Quota] | None = None,
    *,
    default: Quota | None = None,
    budget: int = 10,
    idle: float = IDLE,
) -> Admission:
    """Build an Admission as ``HostRouter.__init__`` does."""
    table = QuotaTable(quotas or {}, default or Quota(max_connections=1), budget)
    return Admission(
        table, Partitioner("host"), budget, max_keepalive=budget, partition_idle_timeout=idle
    )


def partition(admission: Admission, key: str) -> Partition:
    found = {p.key: p for p in admission.partitions()}
    return found[key]


async def until(predicate: Callable[[], bool]) -> None:
    """Wait, bounded, until ``predicate()`` holds (polls the admission's counters)."""
    with anyio.fail_after(5):
        while not predicate():
            await anyio.sleep(0.001)


def hand_clock(admission: Admission, start: float = 1000.0) -> list[float]:
    """Drive the admission's clock by hand (after the first admit bound the loop)."""
    now = [start]
    admission._clock = lambda: now[0]
    return now


def counts(p: Partition) -> tuple[int, int, int, int, int]:
    c = p.counts
    return (c.requests, c.requests_completed, c.requests_failed, c.pool_timeouts, c.overflows)


def router_counts(admission: Admission) -> RequestCounts:
    """The router's totals as ``HostRouter.stats()`` adds them up."""
    total = RequestCounts()
    total.add(admission.totals.counts)
    for p in admission.partitions():
        total.add(p.counts)
    return total


class FakePool:
    """Stands in for a PartitionPool: socket figures, and whether it was retired."""

    def __init__(self, sockets_open: int, sockets_idle: int) -> None:
        self.sockets_open = sockets_open
        self.sockets_idle = sockets_idle
        self.opened = sockets_open
        self.evictions = 0
        self.retired = 0

    def retire(self) -> None:
        self.retired += 1


# -- granting and waiting ----------------------------------------------------------


async def test_below_the_cap_a_request_goes_at_once_and_the_next_waits_for_a_release_fifo() -> None:
    admission = make_admission()
    first = await admission.admit(A, None)
    assert first.status is Status.GRANTED
    part = admission.partition_of(first)
    assert part.key == "a.example"
    assert (part.lane.in_flight, part.lane.waiting, part.peak_in_flight) == (1, 0, 1)
    assert (part.wait.count, part.wait.zero, admission.router_wait.count) == (1, 1, 1)

    granted: list[tuple[str, Ticket]] = []

    async def waiter(name: str) -> None:
        granted.append((name, await admission.admit(A, None)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "w1")
        await until(lambda: part.lane.waiting == 1)
        tg.start_soon(waiter, "w2")
        await until(lambda: part.lane.waiting == 2)
        assert part.peak_waiting == 2
        assert granted == []

        admission.release(first)
        await until(lambda: len(granted) == 1)
        assert granted[0][0] == "w1"
        assert (part.lane.in_flight, part.lane.waiting) == (1, 1)

        admission.release(granted[0][1], failed=True)
        await until(lambda: len(granted) == 2)
        assert granted[1][0] == "w2"
        admission.release(granted[1][1])

    assert part.lane.idle
    assert counts(part) == (3, 2, 1, 0, 0)
    assert part.peak_in_flight == 1
    assert part.wait.count == 3
    assert admission.router_wait.count == 3
    assert admission.scheduler.in_flight == 0
    assert admission.scheduler.waiting == 0


async def test_a_release_in_one_partition_wakes_a_waiter_of_another_when_budget_is_full() -> None:
    admission = make_admission(default=Quota(max_connections=2), budget=1)
    holder = await admission.admit(A, None)
    granted: list[Ticket] = []

    async def waiter() -> None:
        granted.append(await admission.admit(B, None))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await until(lambda: admission.scheduler.waiting == 1)
        b = partition(admission, "b.example")
        assert (b.lane.in_flight, b.lane.waiting) == (0, 1)
        admission.release(holder)
        await until(lambda: bool(granted))
    assert admission.partition_of(granted[0]) is b
    assert b.peak_in_flight == 1
    admission.release(granted[0])
    assert admission.scheduler.in_flight == 0


async def test_forfeiting_a_granted_ticket_hands_its_slot_on_and_counts_no_outcome() -> None:
    admission = make_admission()
    holder = await admission.admit(A, None)
    part = admission.partition_of(holder)
    granted: list[Ticket] = []

    async def waiter() -> None:
        granted.append(await admission.admit(A, None))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await until(lambda: part.lane.waiting == 1)
        admission.forfeit(holder)
        await until(lambda: bool(granted))
    admission.forfeit(holder)  # a second forfeit is a no-op
    assert (part.lane.in_flight, part.lane.waiting) == (1, 0)
    admission.release(granted[0])
    assert part.lane.idle
    assert counts(part) == (2, 1, 0, 0, 0)


# -- pool timeouts -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("quota_timeout", "request_timeout", "expected"),
    [
        pytest.param(TIMEOUT, 30.0, TIMEOUT, id="quota-bounds-a-longer-request-timeout"),
        pytest.param(TIMEOUT, 0.001, TIMEOUT, id="quota-overrides-a-shorter-request-timeout"),
        pytest.param(None, TIMEOUT, TIMEOUT, id="request-timeout-when-the-quota-has-none"),
    ],
)
async def test_the_quota_pool_timeout_bounds_the_wait_and_the_request_one_applies_only_without_it(
    quota_timeout: float | None, request_timeout: float, expected: float
) -> None:
    admission = make_admission(default=Quota(max_connections=1, pool_timeout=quota_timeout))
    holder = await admission.admit(A, None)
    part = admission.partition_of(holder)
    start = anyio.current_time()
    with anyio.fail_after(5), pytest.raises(PoolTimeout) as caught:
        await admission.admit(A, request_timeout)
    elapsed = anyio.current_time() - start

    error = caught.value
    assert isinstance(error, httpx.PoolTimeout)
    assert not isinstance(error, PendingLimitExceeded)
    assert error.partition == "a.example"
    assert expected - CLOCK_SLACK <= error.waited <= expected + LATE_MARGIN
    assert expected - CLOCK_SLACK <= elapsed <= expected + LATE_MARGIN
    message = str(error)
    assert message.startswith("a.example: no connection slot within")
    assert f"within {expected}s" in message
    assert "(1/1 in flight, 0 waiting, 1/10 in the router)" in message

    # The timed-out waiter left the queue and is counted once.
    assert part.lane.waiting == 0
    assert counts(part) == (2, 0, 0, 1, 0)
    assert part.wait.count == 2
    assert part.wait.max >= expected - CLOCK_SLACK
    admission.release(holder)
    assert part.lane.idle


# -- max_pending -------------------------------------------------------------------


@pytest.mark.parametrize("max_pending", [0, 2])
async def test_past_max_pending_a_request_fails_at_once_and_counts_as_an_overflow(
    max_pending: int,
) -> None:
    admission = make_admission(default=Quota(max_connections=1, max_pending=max_pending))
    holder = await admission.admit(A, None)
    part = admission.partition_of(holder)
    granted: list[Ticket] = []

    async def waiter() -> None:
        granted.append(await admission.admit(A, None))

    async with anyio.create_task_group() as tg:
        for n in range(1, max_pending + 1):
            tg.start_soon(waiter)
            await until(lambda n=n: part.lane.waiting == n)

        start = anyio.current_time()
        with anyio.fail_after(5), pytest.raises(PendingLimitExceeded) as caught:
            await admission.admit(A, 30.0)
        assert anyio.current_time() - start < LATE_MARGIN
        error = caught.value
        assert isinstance(error, PoolTimeout)
        assert isinstance(error, httpx.PoolTimeout)
        assert (error.partition, error.waited) == ("a.example", 0.0)
        assert str(error) == (
            f"a.example: {max_pending} requests already waiting "
            f"(max_pending={max_pending}, 1/1 in flight)"
        )
        assert part.lane.waiting == max_pending
        assert counts(part) == (max_pending + 2, 0, 0, 0, 1)

        admission.release(holder)
        for n in range(1, max_pending + 1):
            await until(lambda n=n: len(granted) == n)
            admission.release(granted[-1])
    assert part.lane.idle
    assert counts(part) == (max_pending + 2, max_pending + 1, 0, 0, 1)


# -- closing -----------------------------------------------------------------------


async def test_close_fails_every_waiter_with_router_closed_and_refuses_new_requests() -> None:
    admission = make_admission()
    holders = [await admission.admit(A, None), await admission.admit(B, None)]
    outcomes: list[str] = []

    async def waiter(url: httpx.URL) -> None:
        try:
            ticket = await admission.admit(url, None)
        except RouterClosed as exc:
            outcomes.append(str(exc))
        else:  # pragma: no cover - reported by the assertion below
            admission.release(ticket)
            outcomes.append("granted")

    async with anyio.create_task_group() as tg:
        for url in (A, A, B):
            tg.start_soon(waiter, url)
        await until(lambda: admission.scheduler.waiting == 3)
        admission.close()
        await until(lambda: len(outcomes) == 3)
    assert sorted(outcomes) == [
        "a.example: the HostRouter was closed while waiting",
        "a.example: the HostRouter was closed while waiting",
        "b.example: the HostRouter was closed while waiting",
    ]
    assert admission.scheduler.waiting == 0
    # Closing is not a timeout, and the requests in flight go on.
    assert all(p.counts.pool_timeouts == 0 for p in admission.partitions())
    assert admission.scheduler.in_flight == 2

    for url in (A, C):
        with anyio.fail_after(5), pytest.raises(RouterClosed, match="has been closed"):
            await admission.admit(url, None)
    for ticket in holders:
        admission.release(ticket)
    assert admission.scheduler.in_flight == 0


async def test_a_waiter_granted_as_the_router_closes_gives_its_slot_back_and_fails() -> None:
    admission = make_admission()
    holder = await admission.admit(A, None)
    part = admission.partition_of(holder)
    outcomes: list[str] = []

    async def waiter() -> None:
        try:
            ticket = await admission.admit(A, None)
        except RouterClosed as exc:
            outcomes.append(str(exc))
        else:  # pragma: no cover - reported by the assertion below
            admission.release(ticket)
            outcomes.append("granted")

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await until(lambda: part.lane.waiting == 1)
        # No await between the two: the slot is handed over, then the router closes.
        admission.release(holder)
        admission.close()
        await until(lambda: bool(outcomes))
    assert outcomes == ["a.example: the HostRouter was closed while waiting"]
    assert part.lane.idle
    assert counts(part) == (2, 1, 1, 0, 0)


# -- cancellation ------------------------------------------------------------------


async def test_a_cancelled_waiter_leaves_the_queue_and_is_granted_nothing() -> None:
    admission = make_admission()
    holder = await admission.admit(A, None)
    part = admission.partition_of(holder)
    scope = anyio.CancelScope()
    outcome: list[str] = []

    async def waiter() -> None:
        with scope:
            ticket = await admission.admit(A, None)
            admission.release(ticket)  # pragma: no cover - reported below
            outcome.append("granted")  # pragma: no cover
        outcome.append("cancelled" if scope.cancelled_caught else "not cancelled")

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await until(lambda: part.lane.waiting == 1)
        scope.cancel()
        await until(lambda: bool(outcome))
    assert outcome == ["cancelled"]
    assert (part.lane.in_flight, part.lane.waiting) == (1, 0)
    assert admission.scheduler.waiting == 0
    admission.release(holder)
    # Nobody took the freed slot: the cancelled waiter was granted nothing.
    assert part.lane.idle
    assert admission.scheduler.in_flight == 0
    assert counts(part) == (2, 1, 0, 0, 0)
    assert part.peak_in_flight == 1
    assert part.wait.count == 1  # only the holder's (zero) wait was recorded
    assert part.quiet_since is not None


async def test_a_waiter_granted_then_cancelled_before_it_runs_hands_its_slot_on(
    anyio_backend_name: str,
) -> None:
    # The only slot is handed to waiter W by a release, and W is cancelled in
    # the same instant, before it has run. Under asyncio the task is cancelled
    # directly (W wakes both granted and cancelled: it must forfeit the slot);
    # under trio the grant wins and W fails at its next checkpoint, holding the
    # slot, which it releases. Either way the next waiter X gets the slot.
    admission = make_admission()
    holder = await admission.admit(A, None)
    part = admission.partition_of(holder)
    w_scope = anyio.CancelScope()
    w_task: list[asyncio.Task[Any]] = []
    outcomes: dict[str, Any] = {}

    async def waiter() -> None:
        if anyio_backend_name == "asyncio":
            w_task.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            with w_scope:
                ticket = await admission.admit(A, None)
                outcomes["w"] = "granted"
                try:
                    await anyio.lowlevel.checkpoint()
                finally:
                    admission.release(ticket, failed=True)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        outcomes.setdefault("w", "cancelled")
        outcomes["w_done"] = True

    async def next_waiter() -> None:
        outcomes["x"] = await admission.admit(A, None)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await until(lambda: part.lane.waiting == 1)
        tg.start_soon(next_waiter)
        await until(lambda: part.lane.waiting == 2)
        admission.release(holder)
        if w_task:
            w_task[0].cancel()
        else:
            w_scope.cancel()
        await until(lambda: "x" in outcomes and "w_done" in outcomes)
    expected_w = "cancelled" if anyio_backend_name == "asyncio" else "granted"
    assert outcomes["w"] == expected_w
    x = outcomes["x"]
    assert x.status is Status.GRANTED
    assert (part.lane.in_flight, part.lane.waiting) == (1, 0)
    admission.release(x)
    assert part.lane.idle
    assert admission.scheduler.in_flight == 0
    failed = 1 if expected_w == "granted" else 0
    assert counts(part) == (3, 2, failed, 0, 0)


# -- the idle sweep ----------------------------------------------------------------


async def test_a_partition_quiet_for_the_idle_timeout_is_dropped_on_another_hosts_admit() -> None:
    admission = make_admission()
    ticket = await admission.admit(A, None)  # binds the loop
    now = hand_clock(admission)
    admission.release(ticket)  # A goes quiet at 1000.0
    a = partition(admission, "a.example")
    assert admission.totals.created == 1

    now[0] += IDLE - 0.5
    admission.release(await admission.admit(B, None))  # B quiet at 1009.5
    assert [p.key for p in admission.partitions()] == ["a.example", "b.example"]
    assert admission.totals.dropped == 0

    now[0] += 0.5  # A has been quiet for exactly the idle timeout
    before = router_counts(admission)
    ticket = await admission.admit(C, None)
    assert [p.key for p in admission.partitions()] == ["b.example", "c.example"]
    assert (admission.totals.created, admission.totals.dropped) == (3, 1)
    assert len(admission) == 2
    # The dropped partition's counts live on in the totals: nothing goes down.
    assert admission.totals.counts.requests == 1
    assert admission.totals.counts.requests_completed == 1
    after = router_counts(admission)
    assert after.requests == before.requests + 1
    assert after.requests_completed == before.requests_completed
    admission.release(ticket)

    # A comes back as a new partition.
    again = await admission.admit(A, None)
    assert admission.partition_of(again) is not a
    assert admission.partition_of(again).serial == 4
    admission.release(again)
    assert router_counts(admission).requests == 4
    assert router_counts(admission).requests_completed == 4


async def test_a_partition_with_a_request_in_flight_or_waiting_is_never_dropped() -> None:
    admission = make_admission(quotas={"a.example": 2})
    first = await admission.admit(A, None)
    second = await admission.admit(A, None)
    now = hand_clock(admission)
    a = admission.partition_of(first)
    # One of the two requests finishes: the other is still in flight.
    admission.release(first)
    assert a.quiet_since is None
    holder = await admission.admit(B, None)
    b = admission.partition_of(holder)
    granted: list[Ticket] = []

    async def waiter() -> None:
        granted.append(await admission.admit(B, None))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await until(lambda: b.lane.waiting == 1)
        now[0] += 100 * IDLE
        admission.release(await admission.admit(C, None))
        assert {p.key for p in admission.partitions()} == {"a.example", "b.example", "c.example"}
        assert admission.totals.dropped == 0
        admission.release(holder)
        await until(lambda: bool(granted))
    admission.release(granted[0])
    admission.release(second)
    # Now both are quiet, from this instant on: not yet dropped...
    now[0] += IDLE - 1
    admission.release(await admission.admit(D, None))
    assert len(admission) == 4  # a, b, c and d
    # ... until the idle timeout has passed for them too.
    now[0] += 1
    admission.release(await admission.admit(C, None))
    assert {p.key for p in admission.partitions()} == {"c.example", "d.example"}
    assert (admission.totals.created, admission.totals.dropped) == (5, 3)
    assert admission.totals.counts.requests == 2 + 2 + 1
    assert router_counts(admission).requests == 2 + 2 + 1 + 1 + 1


async def test_a_dropped_partition_retires_its_pools() -> None:
    admission = make_admission()
    ticket = await admission.admit(A, None)
    now = hand_clock(admission)
    a = admission.partition_of(ticket)
    pool = FakePool(sockets_open=2, sockets_idle=1)
    a.pools[object()] = pool  # type: ignore[assignment]
    assert (a.sockets_open, a.sockets_idle, a.connections_opened) == (2, 1, 2)
    assert "2 sockets open, 1 idle" in repr(a)
    admission.release(ticket)

    now[0] += IDLE - 1
    admission.release(await admission.admit(B, None))
    assert pool.retired == 0
    now[0] += 1
    admission.release(await admission.admit(B, None))
    assert pool.retired == 1
    assert a.pools == {}
    assert [p.key for p in admission.partitions()] == ["b.example"]


# -- event loops -------------------------------------------------------------------

BACKENDS = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}


def run_on(name: str, func: Callable[..., Any], *args: Any) -> Any:
    if name == "uvloop":
        pytest.importorskip("uvloop")
    backend, options = BACKENDS[name]
    return anyio.run(func, *args, backend=backend, backend_options=options)


@pytest.mark.parametrize(
    ("first", "second"),
    [("asyncio", "trio"), ("asyncio", "asyncio"), ("trio", "uvloop"), ("uvloop", "trio")],
)
def test_an_admission_used_from_a_new_event_loop_starts_from_a_clean_slate(
    first: str, second: str
) -> None:
    admission = make_admission()

    async def first_run() -> Ticket:
        admission.release(await admission.admit(A, None))
        admission.release(await admission.admit(B, None), failed=True)
        # Left in flight when the loop ends: the loop is gone, so it binds nobody.
        return await admission.admit(B, None)

    async def second_run() -> None:
        ticket = await admission.admit(C, None)
        # A ticket of the former loop is ignored (its scheduler is gone).
        admission.release(abandoned)
        assert admission.scheduler.in_flight == 1
        admission.release(ticket)

    abandoned = run_on(first, first_run)
    assert len(admission) == 2
    old_scheduler = admission.scheduler
    run_on(second, second_run)
    assert admission.scheduler is not old_scheduler
    assert [p.key for p in admission.partitions()] == ["c.example"]
    assert (admission.totals.created, admission.totals.dropped) == (3, 2)
    kept = admission.totals.counts
    assert (kept.requests, kept.requests_completed, kept.requests_failed) == (3, 1, 1)
    total = router_counts(admission)
    assert (total.requests, total.requests_completed, total.requests_failed) == (4, 2, 1)
    assert admission.scheduler.in_flight == 0


async def test_an_admission_used_from_a_second_loop_while_the_first_has_a_request_in_flight_refuses(
    anyio_backend_name: str,
) -> None:
    admission = make_admission()
    other = "trio" if anyio_backend_name == "asyncio" else "asyncio"
    results: list[object] = []

    async def from_the_other_loop() -> None:
        ticket = await admission.admit(B, None)
        admission.release(ticket)

    def in_a_thread() -> None:
        try:
            run_on(other, from_the_other_loop)
        except BaseException as exc:
            results.append(exc)
        else:
            results.append("admitted")

    async def attempt() -> object:
        results.clear()
        # A new thread starts with an empty context: its loop is its own.
        thread = threading.Thread(target=in_a_thread)
        thread.start()
        await anyio.to_thread.run_sync(thread.join, 10)
        assert not thread.is_alive()
        return results[0]

    ticket = await admission.admit(A, None)
    refused = await attempt()
    assert isinstance(refused, RuntimeError)
    assert "in use by another event loop" in str(refused)
    # Nothing changed on this loop's side.
    assert [p.key for p in admission.partitions()] == ["a.example"]
    assert admission.partition_of(ticket).lane.in_flight == 1
    admission.release(ticket)

    # With nothing in flight here, the other loop may take the admission over.
    assert await attempt() == "admitted"
    assert [p.key for p in admission.partitions()] == ["b.example"]
    assert admission.totals.counts.requests == 1


# -- odds and ends -----------------------------------------------------------------


@pytest.mark.parametrize("url", ["/relative", "http:///path"])
async def test_a_url_without_a_host_is_refused_with_value_error(url: str) -> None:
    admission = make_admission()
    with pytest.raises(ValueError, match="has no host"):
        await admission.admit(httpx.URL(url), None)
    assert len(admission) == 0
    assert admission.totals.created == 0


async def test_repr_of_a_partition_shows_its_key_in_flight_over_cap_and_waiting() -> None:
    admission = make_admission()
    holder = await admission.admit(A, None)
    part = admission.partition_of(holder)
    assert repr(part) == (
        "<Partition 'a.example' [busy | 1/1 in flight, 0 waiting | 0 sockets open, 0 idle]>"
    )
    granted: list[Ticket] = []

    async def waiter() -> None:
        granted.append(await admission.admit(A, None))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await until(lambda: part.lane.waiting == 1)
        assert repr(part) == (
            "<Partition 'a.example' [busy | 1/1 in flight, 1 waiting | 0 sockets open, 0 idle]>"
        )
        admission.release(holder)
        await until(lambda: bool(granted))
    admission.release(granted[0])
    assert repr(part) == (
        "<Partition 'a.example' [idle | 0/1 in flight, 0 waiting | 0 sockets open, 0 idle]>"
    )

"""The anyio layer: turns the scheduler's decisions into waits with deadlines.

It owns the partitions (created on first use, dropped when idle) and, through
them, everything a partition has: its lane in the scheduler, its counters and
its connection pools. It never decides who goes next: that is
``_scheduler.Scheduler``'s job.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import anyio
import httpx

from ._errors import PendingLimitExceeded, PoolTimeout, RouterClosed
from ._fleet import Fleet
from ._ledger import SocketLedger
from ._limits import Bucket, parse_retry_after
from ._loops import current_loop
from ._pool import PartitionPool, close_connections
from ._quota import Partitioner, QuotaEntry, QuotaTable
from ._scheduler import Lane, Scheduler, Status, Ticket
from ._stats import PartitionStats, RequestCounts, RouterStats, WaitHistogram

__all__ = ["Admission", "Partition"]

logger = logging.getLogger("hostpool")


class Partition:
    """One unit of isolation: its quota, its lane in the scheduler, its pools, its counters.

    ``pools`` holds one pool per transport that sent to the partition (the
    router's own, a proxy mount, ...), keyed by that transport's connection
    factory; it goes when the partition goes.
    """

    __slots__ = (
        "bucket",
        "counts",
        "entry",
        "key",
        "lane",
        "paused_until",
        "peak_in_flight",
        "peak_waiting",
        "pools",
        "quiet_since",
        "reserved_admissions",
        "serial",
        "wait",
    )

    def __init__(self, key: str, entry: QuotaEntry, lane: Lane, serial: int) -> None:
        self.key = key
        self.serial = serial
        self.entry = entry
        self.lane = lane
        self.pools: dict[object, PartitionPool] = {}
        self.quiet_since: float | None = None
        self.counts = RequestCounts()
        self.peak_in_flight = 0
        self.peak_waiting = 0
        self.reserved_admissions = 0
        self.wait = WaitHistogram()
        # The upstream's limits: the local rate's GCRA state, and the end of
        # a Retry-After pause (loop clock; -inf: not paused).
        rate = entry.quota.rate
        self.bucket = None if rate is None else Bucket(rate)
        self.paused_until = -math.inf

    def remembers_until(self) -> float:
        """When the partition's pause and rate state run out (loop clock; -inf: none)."""
        bucket = self.bucket
        if bucket is None:
            return self.paused_until
        return max(self.paused_until, bucket.tat)

    @property
    def sockets_open(self) -> int:
        """Open sockets of the partition, active and idle, across its pools."""
        return sum(pool.sockets_open for pool in self.pools.values())

    @property
    def sockets_idle(self) -> int:
        """Idle sockets of the partition across its pools."""
        return sum(pool.sockets_idle for pool in self.pools.values())

    @property
    def connections_opened(self) -> int:
        """Sockets opened by the partition's pools."""
        return sum(pool.opened for pool in self.pools.values())

    @property
    def evictions(self) -> int:
        """Idle sockets of the partition closed to respect a keepalive or budget limit."""
        return sum(pool.evictions for pool in self.pools.values())

    def snapshot(self, now: float) -> PartitionStats:
        """Return an immutable snapshot of the partition (``now``: the loop's clock)."""
        lane = self.lane
        return PartitionStats(
            key=self.key,
            serial=self.serial,
            quota=self.entry.quota,
            quota_key=self.entry.group,
            in_flight=lane.in_flight,
            waiting=lane.waiting,
            sockets_open=self.sockets_open,
            sockets_idle=self.sockets_idle,
            connections_opened=self.connections_opened,
            **self.counts.as_fields(),
            evictions=self.evictions,
            peak_in_flight=self.peak_in_flight,
            peak_waiting=self.peak_waiting,
            reserved_admissions=self.reserved_admissions,
            wait=self.wait.summary(),
            paused_for=max(0.0, self.paused_until - now),
        )

    def __repr__(self) -> str:
        lane = self.lane
        state = "idle" if self.quiet_since is not None else "busy"
        return (
            f"<Partition {self.key!r} [{state} | {lane.in_flight}/{lane.cap} in flight, "
            f"{lane.waiting} waiting | {self.sockets_open} sockets open, "
            f"{self.sockets_idle} idle]>"
        )


@dataclass
class _Totals:
    """Counts of partitions that no longer exist, so router totals never go down."""

    counts: RequestCounts = field(default_factory=RequestCounts)
    created: int = 0
    dropped: int = 0


class _Waiting:
    """How requests wait on the bound event loop: chosen once per loop (any anyio backend).

    ``park`` returns when the ticket is woken (a grant, the router closing)
    or its deadline passes (the caller tells them apart by the ticket's
    status), and raises when cancelled from outside. ``clock`` is the loop's
    clock, bound once: ``anyio.current_time()`` asks sniffio which library
    runs each time, which costs more than the bookkeeping around it.
    """

    def __init__(self, loop: object) -> None:
        self.loop = loop
        self.clock: Callable[[], float] = anyio.current_time

    def alive(self) -> bool:
        """Tell whether the loop still runs (a trio run that ended does not)."""
        try:
            import trio
        except ImportError:  # pragma: no cover - trio tokens only exist with trio
            return True
        if isinstance(self.loop, trio.lowlevel.TrioToken):
            try:
                self.loop.run_sync_soon(lambda: None)
            except trio.RunFinishedError:
                return False
        return True

    async def park(self, ticket: Ticket, start: float, patience: float | None) -> None:
        """Sleep on an anyio Event until woken, or until ``start + patience``."""
        event = anyio.Event()
        ticket.payload = event
        deadline = math.inf if patience is None else start + patience
        with anyio.CancelScope(deadline=deadline):
            await event.wait()

    @staticmethod
    def wake(payload: Any) -> None:
        """Wake a parked request (no-op if it already woke)."""
        if payload is not None:
            payload.set()


class _AsyncioWaiting(_Waiting):
    """:class:`_Waiting` on asyncio (its own loop or uvloop): a bare future and one timer.

    The same contract. An anyio cancel scope around the request still works:
    it cancels the task, and so the awaited future. Under load half the
    requests wait (more requests than sockets), and an anyio Event plus a
    CancelScope with a deadline cost several times this (benchmarks:
    throughput at concurrency 200).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._asyncio = loop
        self.clock = loop.time

    def alive(self) -> bool:
        return not self._asyncio.is_closed()

    async def park(self, ticket: Ticket, start: float, patience: float | None) -> None:
        loop = self._asyncio
        future = loop.create_future()
        ticket.payload = future
        timer = None if patience is None else loop.call_at(start + patience, self.wake, future)
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()

    @staticmethod
    def wake(payload: Any) -> None:
        if payload is not None and not payload.done():
            payload.set_result(None)


def _left(deadline: float, now: float) -> float | None:
    """Seconds left before ``deadline`` (None: no deadline), never negative."""
    if deadline == math.inf:
        return None
    return max(0.0, deadline - now)


def _waiting_on(loop: object) -> _Waiting:
    if isinstance(loop, asyncio.AbstractEventLoop):
        return _AsyncioWaiting(loop)
    return _Waiting(loop)


async def _collect(step: Awaitable[None], errors: list[BaseException]) -> None:
    """Run one closing step; keep its error (logged) for the end instead of stopping."""
    try:
        await step
    except BaseException as exc:
        if isinstance(exc, Exception):
            logger.warning("error while closing the HostRouter", exc_info=True)
        errors.append(exc)


class Admission:
    """Admit requests per partition, with waits, deadlines, and no leaks.

    Invariant (G7): every ticket this class grants is released exactly once,
    on every path: response closed, error, or cancellation at any await.
    """

    def __init__(
        self,
        table: QuotaTable,
        partitioner: Partitioner,
        budget: int,
        *,
        max_keepalive: int,
        partition_idle_timeout: float,
        fleet: Fleet | None = None,
    ) -> None:
        self.table = table
        self.fleet = fleet
        self.partitioner = partitioner
        self.budget = budget
        self.max_keepalive = max_keepalive
        self.idle_timeout = partition_idle_timeout
        self.scheduler = self._new_scheduler()
        # The socket ledger of the pools of the current event loop (a new
        # loop gets a new one: sockets of the old loop are not ours to count).
        self.ledger = SocketLedger(budget, max_keepalive)
        self._partitions: dict[str, Partition] = {}
        # Partitions with nothing in flight or waiting, in the order they
        # went quiet (oldest first): the idle sweep looks only at the head,
        # O(1) per request, and a busy partition never blocks it.
        self._quiet: OrderedDict[str, Partition] = OrderedDict()
        self._peak_partitions = 0
        # Response bodies not closed yet (the transports' body wrappers add
        # and remove themselves): closing the router closes them, so every
        # slot comes back even if a caller abandoned a stream.
        self.open_bodies: set[Any] = set()
        # Called when a crowd of partitions has gone (_shrink), to give back
        # what the router keeps beside them (its parsed URL strings).
        self.on_shrink: list[Callable[[], None]] = []
        # Cancel scopes of requests waiting out a pause, a rate's start or
        # the fleet: close() cancels them (see _interruptible).
        self._sleepers: set[anyio.CancelScope] = set()
        # How requests wait on the bound event loop (None until first use).
        self._waiting: _Waiting | None = None
        # The bound loop's clock (looked up once per loop, see _Waiting).
        self._clock: Callable[[], float] = anyio.current_time
        self.totals = _Totals()
        self.router_wait = WaitHistogram()
        self.closed = False

    # -- partitions ----------------------------------------------------------

    def __len__(self) -> int:
        """Number of live partitions."""
        return len(self._partitions)

    def partitions(self) -> Iterator[Partition]:
        """Iterate over the live partitions."""
        return iter(list(self._partitions.values()))

    async def admit(self, url: httpx.URL, pool_timeout: float | None) -> Ticket:
        """Find the partition of ``url`` (creating it) and wait for a slot in it.

        Return the granted ticket; the caller releases it exactly once
        (:meth:`release`). The wait is bounded by the quota's ``pool_timeout``,
        or else by ``pool_timeout`` (the request's own). Raise ``ValueError``
        for a URL that has no partition (no host), and otherwise as
        :meth:`_acquire`.

        Invariant: nothing awaits between the lookup and the admission, so
        the partition is never dropped under the request (the sweep runs
        only inside the lookup, and drops only partitions with nothing
        admitted or waiting).
        """
        key, quota_name = self.partitioner(url)
        partition = self._partition(key, quota_name)
        quota = partition.entry.quota
        patience = quota.pool_timeout
        if patience is None:
            patience = pool_timeout
        if quota.upstream_limited:
            ticket = await self._admit_limited(partition, patience)
        else:
            ticket = await self._acquire(partition, patience)
        if self.closed:
            # Granted by a release in the same instant the router closed.
            self.release(ticket, failed=True)
            raise RouterClosed(f"{partition.key}: the HostRouter was closed while waiting")
        return ticket

    async def _admit_limited(self, partition: Partition, patience: float | None) -> Ticket:
        """Admission with the upstream's limits: pause, slot, rate, fleet, in that order.

        A paused partition waits *without* a slot (so a pause never holds
        budget other partitions could use); a pause that began while a
        request waited for its slot sends the slot back. The rate's start
        and the fleet's lease are taken while holding the slot, right
        before sending, so the upstream sees the rate that was asked for
        (a start taken earlier could be spent late, in a bunch). Every wait
        shares one deadline: ``patience`` from now.
        """
        clock = self._clock
        deadline = math.inf if patience is None else clock() + patience
        partition.counts.requests += 1
        while True:
            if partition.paused_until > clock():
                await self._sit_out_pause(partition, deadline, patience)
            ticket = await self._acquire(partition, _left(deadline, clock()), count=False)
            try:
                if partition.paused_until <= clock():
                    bucket = partition.bucket
                    if bucket is not None:
                        await self._take_start(partition, bucket, deadline, patience)
                    fleet = self.fleet
                    if fleet is not None and partition.entry.quota.fleet is not None:
                        with self._interruptible(partition):
                            pause = await fleet.admit(partition, ticket, deadline, clock)
                        if pause is not None:
                            self._pause(partition, pause, share=False)
                if partition.paused_until <= clock():
                    return ticket
            except BaseException:
                self.forfeit(ticket)
                raise
            # Paused while this request waited (for its slot, its start or
            # the fleet): give the slot back, wait the pause out, start over.
            self.forfeit(ticket)

    @contextmanager
    def _interruptible(self, partition: Partition) -> Iterator[None]:
        """Let :meth:`close` end a wait for the upstream's limits at once.

        Waits for a pause, a rate's start or the fleet are sleeps, not
        scheduler waits, so ``close()`` cancels them here; the request then
        fails with :class:`RouterClosed` (the caller gives its slot back).
        """
        scope = anyio.CancelScope()
        self._sleepers.add(scope)
        try:
            with scope:
                yield
        finally:
            self._sleepers.discard(scope)
        if scope.cancelled_caught:  # only close() cancels these scopes
            raise RouterClosed(f"{partition.key}: the HostRouter was closed while waiting")

    async def _sit_out_pause(
        self, partition: Partition, deadline: float, patience: float | None
    ) -> None:
        """Sleep until the partition's pause ends, or fail now if it outlasts the deadline."""
        partition.counts.pause_delayed += 1
        resume = partition.paused_until
        if resume > deadline:
            partition.counts.pool_timeouts += 1
            left = resume - self._clock()
            logger.info("%s: pool timeout, paused by Retry-After for %.1fs", partition.key, left)
            raise PoolTimeout(
                f"{partition.key}: paused by the upstream's Retry-After for another "
                f"{left:.1f}s, longer than the pool timeout ({patience}s)",
                partition=partition.key,
                waited=0.0,
            )
        if partition.quiet_since is not None:
            partition.quiet_since = None
            del self._quiet[partition.key]
        # These requests are in no lane, so the partition may look idle
        # meanwhile; the sweep still keeps it until its pause is over (see
        # Partition.remembers_until), so it is never dropped under them.
        try:
            with self._interruptible(partition):
                await anyio.sleep(resume - self._clock())
        finally:
            self._settle(partition)

    async def _take_start(
        self, partition: Partition, bucket: Bucket, deadline: float, patience: float | None
    ) -> None:
        """Reserve the local rate's next start and sleep until it (holding the slot)."""
        clock = self._clock
        now = clock()
        delay = bucket.reserve(now, None if deadline == math.inf else deadline - now)
        if delay is None:
            partition.counts.pool_timeouts += 1
            rate = partition.entry.quota.rate
            logger.info("%s: pool timeout waiting for the rate %s", partition.key, rate)
            raise PoolTimeout(
                f"{partition.key}: the rate {rate} has no start free before the pool "
                f"timeout ({patience}s); the next is in {bucket.ready_in(now):.3f}s",
                partition=partition.key,
                waited=0.0,
            )
        if delay > 0.0:
            partition.counts.rate_delayed += 1
            mark = bucket.tat
            try:
                with self._interruptible(partition):
                    await anyio.sleep(delay)
            except BaseException:
                bucket.refund(mark, clock())
                raise

    def pause_from(self, partition: Partition, status: int, retry_after: str | None) -> None:
        """Pause a partition as its upstream's 429/503 ``Retry-After`` asks (capped)."""
        if retry_after is None:
            return
        seconds = parse_retry_after(retry_after)
        if seconds is None:
            logger.warning(
                "%s: ignored a malformed Retry-After %r (status %d)",
                partition.key,
                retry_after,
                status,
            )
            return
        cap = partition.entry.quota.max_retry_after
        if seconds > cap:
            logger.info(
                "%s: Retry-After of %.0fs capped at max_retry_after=%gs",
                partition.key,
                seconds,
                cap,
            )
            seconds = cap
        if seconds > 0:
            self._pause(partition, seconds, share=True, status=status)

    def _pause(
        self, partition: Partition, seconds: float, *, share: bool, status: int | None = None
    ) -> None:
        until = self._clock() + seconds
        if until <= partition.paused_until:
            return  # never shortens a pause
        partition.paused_until = until
        if status is not None:
            partition.counts.pauses += 1
            logger.warning(
                "%s: paused for %.1fs by the upstream (status %d with Retry-After)",
                partition.key,
                seconds,
                status,
            )
        fleet = self.fleet
        if share and fleet is not None and partition.entry.quota.fleet is not None:
            fleet.share_pause(partition.key, seconds)

    def partition_of(self, ticket: Ticket) -> Partition:
        """Return the partition a granted ticket belongs to."""
        return self._partitions[ticket.lane.key]

    def _partition(self, key: str, quota_name: str) -> Partition:
        """Return the partition for ``key``, creating it on first use (see :meth:`admit`)."""
        self._check_loop()
        partition = self._partitions.get(key)
        if partition is None or partition.quiet_since is not None:
            self._sweep()
            partition = self._partitions.get(key)
        if partition is None:
            entry = self.table.lookup(quota_name)
            quota = entry.quota
            lane = self.scheduler.lane(
                key, entry.group, min(quota.max_connections, self.budget), quota.max_pending
            )
            self.totals.created += 1
            partition = self._partitions[key] = Partition(key, entry, lane, self.totals.created)
            if len(self._partitions) > self._peak_partitions:
                self._peak_partitions = len(self._partitions)
            # Born quiet: if admission never happens (the router is closed),
            # the sweep still drops it.
            partition.quiet_since = self._clock()
            self._quiet[key] = partition
            logger.debug("partition %s created (quota %s)", key, entry.group)
        return partition

    def _sweep(self) -> None:
        """Drop partitions that have been quiet for ``partition_idle_timeout`` (G9)."""
        quiet = self._quiet
        if not quiet:
            return
        now = self._clock()
        dropped = False
        while quiet:
            partition = next(iter(quiet.values()))
            since = partition.quiet_since
            assert since is not None
            if now - since < self.idle_timeout:
                break
            remembered = partition.remembers_until()
            if remembered > now:
                # Dropped now, it would forget a pause or a rate's debt (a
                # new partition starts with neither): keep it idle until
                # they run out, then for partition_idle_timeout. (Put last
                # with a later time than the others; a later one kept
                # before it only delays its drop, never hastens it.)
                partition.quiet_since = remembered
                quiet.move_to_end(partition.key)
                continue
            self._drop(partition)
            dropped = True
        if dropped and len(self._partitions) * 4 < self._peak_partitions:
            self._shrink()

    def _shrink(self) -> None:
        """Give back the memory of a crowd of partitions that has gone (G9).

        Python dicts never shrink as keys are deleted, and the partition-key
        cache outlives partitions: after a crawl over 100,000 hosts both would
        keep their peak size. Rebuild them at the size of what is left.
        """
        live = len(self._partitions)
        self._partitions = dict(self._partitions)
        self._quiet = OrderedDict(self._quiet)
        self._peak_partitions = live
        self.partitioner.shrink(live)
        self.ledger.compact()
        # Shared with the body wrappers (they remove themselves), so rebuilt
        # in place: emptied, which frees its table, and refilled.
        still_open = list(self.open_bodies)
        self.open_bodies.clear()
        self.open_bodies.update(still_open)
        for partition in self._partitions.values():
            partition.pools = dict(partition.pools)
        for forget in self.on_shrink:
            forget()

    def _drop(self, partition: Partition) -> None:
        # Runs without an await from check to removal, so no request can be
        # admitted to a partition that is being dropped (urllib3#1252).
        assert partition.lane.idle
        del self._partitions[partition.key]
        self._quiet.pop(partition.key, None)
        # Its idle sockets go to the ledger, to be closed by the next request
        # of any partition or by aclose() (see SocketLedger.retire).
        for pool in partition.pools.values():
            pool.retire()
        partition.pools.clear()
        self._retire(partition)
        logger.debug("partition %s dropped after %.0fs idle", partition.key, self.idle_timeout)

    def _retire(self, partition: Partition) -> None:
        """Fold a partition's counts into the totals, so router totals never go down."""
        totals = self.totals
        totals.dropped += 1
        totals.counts.add(partition.counts)

    def _check_loop(self) -> None:
        loop = current_loop()
        waiting = self._waiting
        if waiting is not None and loop is waiting.loop:
            return
        if waiting is not None and waiting.alive() and self._busy():
            raise RuntimeError(
                "this HostRouter is in use by another event loop; "
                "create one router per event loop (or per thread)"
            )
        # First use, or the previous loop is gone or left nothing in flight:
        # bind to this one. Sockets and waiters of the previous loop cannot be
        # used from here, so start from a clean slate.
        if waiting is not None:
            for partition in self._partitions.values():
                self._retire(partition)
            self._partitions.clear()
            self._quiet.clear()
            # Tickets and pools of the old loop keep the old scheduler and
            # ledger; release() ignores such tickets (see _current).
            self.scheduler = self._new_scheduler()
            self.ledger = SocketLedger(self.budget, self.max_keepalive)
            # Their pools went with the partitions: the connections belong to
            # a loop we no longer run in, and can be neither used nor closed.
            self.open_bodies.clear()
        self._waiting = _waiting_on(loop)
        self._clock = self._waiting.clock

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(
            self.budget, {entry.group: entry.quota.reserved for entry in self.table.entries()}
        )

    def _current(self, ticket: Ticket) -> Partition | None:
        """Return the live partition of a ticket, or None for a ticket of a former loop."""
        partition = self._partitions.get(ticket.lane.key)
        if partition is None or partition.lane is not ticket.lane:
            return None
        return partition

    def _busy(self) -> bool:
        return bool(self.scheduler.in_flight or self.scheduler.waiting)

    # -- admission -----------------------------------------------------------

    async def _acquire(
        self, partition: Partition, patience: float | None, *, count: bool = True
    ) -> Ticket:
        """Wait for a slot in ``partition``; return the granted ticket.

        Raise :class:`PoolTimeout` when ``patience`` (seconds, or None for no
        limit) passes first, :class:`PendingLimitExceeded` when the queue is
        full, and :class:`RouterClosed` when the router closes meanwhile.
        ``count``: count the request (False when the caller counted it already).
        """
        if self.closed:
            raise RouterClosed("the HostRouter has been closed")
        lane = partition.lane
        ticket = self.scheduler.admit(lane)
        if count:
            partition.counts.requests += 1
        if partition.quiet_since is not None:
            partition.quiet_since = None
            del self._quiet[partition.key]
        if ticket.status is Status.GRANTED:
            self._on_granted(ticket)
            partition.wait.record(0.0)
            self.router_wait.record(0.0)
            return ticket
        if ticket.status is Status.REJECTED:
            partition.counts.overflows += 1
            self._settle(partition)
            logger.info(
                "%s: request rejected, %d already waiting (max_pending)",
                partition.key,
                lane.waiting,
            )
            raise PendingLimitExceeded(
                f"{partition.key}: {lane.waiting} requests already waiting "
                f"(max_pending={lane.max_pending}, {lane.in_flight}/{lane.cap} in flight)",
                partition=partition.key,
                waited=0.0,
            )
        if lane.waiting > partition.peak_waiting:
            partition.peak_waiting = lane.waiting
        return await self._wait(partition, ticket, patience)

    async def _wait(self, partition: Partition, ticket: Ticket, patience: float | None) -> Ticket:
        clock = self._clock
        start = clock()
        waiting = self._waiting
        assert waiting is not None  # bound by admit()
        try:
            await waiting.park(ticket, start, patience)
        except BaseException:
            # Cancelled from outside. If a release handed us the slot in the
            # meantime, hand it on; otherwise leave the queue. Either way
            # nothing is lost (httpcore#1093, aiohttp#9670).
            self.forfeit(ticket)
            raise
        waited = clock() - start
        partition.wait.record(waited)
        self.router_wait.record(waited)
        if ticket.status is Status.GRANTED:
            # Granted, even if the deadline passed in the same instant: the
            # slot is ours, so use it rather than waste it.
            return ticket
        if ticket.status is Status.CANCELLED and self.closed:
            raise RouterClosed(f"{partition.key}: the HostRouter was closed while waiting")
        self.scheduler.cancel(ticket)
        partition.counts.pool_timeouts += 1
        lane = partition.lane
        self._settle(partition)
        logger.info("%s: pool timeout after %.3fs", partition.key, waited)
        raise PoolTimeout(
            f"{partition.key}: no connection slot within {patience}s "
            f"({lane.in_flight}/{lane.cap} in flight, {lane.waiting} waiting, "
            f"{self.scheduler.in_flight}/{self.budget} in the router)",
            partition=partition.key,
            waited=waited,
        )

    def forfeit(self, ticket: Ticket) -> None:
        """Give up a ticket, whatever its state: waiting, granted, or gone."""
        partition = self._current(ticket)
        if partition is None:
            return  # a ticket of a former event loop: its scheduler is gone
        fleet = self.fleet
        if fleet is not None and fleet.held:
            fleet.release(ticket)
        woken = self.scheduler.cancel(ticket)
        if woken is not None:
            self._wake(woken)
        self._settle(partition)

    def release(self, ticket: Ticket, *, failed: bool = False) -> None:
        """Return a granted ticket's slot and wake the next waiter, if any."""
        partition = self._current(ticket)
        if partition is None:
            return  # a ticket of a former event loop: its scheduler is gone
        woken = self.scheduler.release(ticket)
        fleet = self.fleet
        if fleet is not None and fleet.held:
            fleet.release(ticket)
        if failed:
            partition.counts.requests_failed += 1
        else:
            partition.counts.requests_completed += 1
        if woken is not None:
            self._wake(woken)
        self._settle(partition)

    def _wake(self, ticket: Ticket) -> None:
        self._on_granted(ticket)
        self._wake_payload(ticket.payload)

    def _wake_payload(self, payload: Any) -> None:
        waiting = self._waiting
        if waiting is not None:
            waiting.wake(payload)

    def _on_granted(self, ticket: Ticket) -> None:
        lane = ticket.lane
        partition = self._partitions[lane.key]
        if lane.in_flight > partition.peak_in_flight:
            partition.peak_in_flight = lane.in_flight
        scheduler = self.scheduler
        if (
            lane.group.used <= lane.group.reserved
            and scheduler.shared_used >= scheduler.shared_total
        ):
            # Admitted only thanks to the reservation: shared slots were all in use.
            partition.reserved_admissions += 1

    def _settle(self, partition: Partition) -> None:
        """Start the idle clock of a partition that has nothing in flight or waiting."""
        if (
            partition.lane.idle
            and partition.quiet_since is None
            and self._partitions.get(partition.key) is partition
        ):
            partition.quiet_since = self._clock()
            self._quiet[partition.key] = partition

    # -- closing -------------------------------------------------------------

    def close(self) -> None:
        """Refuse new requests and fail every waiter with :class:`RouterClosed`."""
        self.closed = True
        for scope in list(self._sleepers):
            scope.cancel()
        lanes = [p.lane for p in self._partitions.values()]
        for ticket in self.scheduler.drain(lanes):
            self._wake_payload(ticket.payload)

    async def aclose(self) -> None:
        """Close everything: fail waiters, close open bodies (slots back), close every socket.

        Idempotent. Requests still sending fail as their connections close.
        Every step runs even if an earlier one fails (a user's transport
        whose body raises on close); the first error is raised at the end.
        """
        self.close()
        errors: list[BaseException] = []
        for body in list(self.open_bodies):
            await _collect(body.aclose(), errors)
        ledger = self.ledger
        retired = ledger.take_retired()
        try:
            await _collect(close_connections(retired), errors)
        finally:
            ledger.closed(len(retired))
        for partition in list(self._partitions.values()):
            for pool in partition.pools.values():
                await _collect(pool.aclose(), errors)
        for partition in list(self._partitions.values()):
            if partition.lane.idle:
                self._drop(partition)
        if self.fleet is not None:
            await _collect(self.fleet.aclose(), errors)
        if errors:
            raise errors[0]

    # -- figures -------------------------------------------------------------

    def snapshot(self) -> RouterStats:
        """Return an immutable snapshot of the router and of every live partition."""
        scheduler = self.scheduler
        ledger = self.ledger
        totals = self.totals
        counts = RequestCounts()
        counts.add(totals.counts)
        partitions: dict[str, PartitionStats] = {}
        now = self._clock() if self._waiting is not None and self._waiting.alive() else 0.0
        for partition in self._partitions.values():
            counts.add(partition.counts)
            partitions[partition.key] = partition.snapshot(now)
        return RouterStats(
            budget=scheduler.budget,
            max_keepalive=ledger.max_keepalive,
            shared_slots=scheduler.shared_total,
            shared_in_use=scheduler.shared_used,
            in_flight=scheduler.in_flight,
            waiting=scheduler.waiting,
            sockets_open=ledger.open,
            sockets_idle=len(ledger.idle),
            connections_opened=ledger.opened,
            **counts.as_fields(),
            evictions=ledger.evictions,
            partitions_created=totals.created,
            partitions_dropped=totals.dropped,
            wait=self.router_wait.summary(),
            partitions=MappingProxyType(partitions),
            fleet_degraded=self.fleet is not None and self.fleet.unavailable_since is not None,
        )

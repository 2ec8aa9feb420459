"""Fleet-wide quotas: the part that lives in this process.

A :class:`FleetStore` (``hostpool.redis.RedisFleet``) keeps the shared state
and answers one question per admission in one round trip: "may this request
start, and if not, how long until it is worth asking again?". Everything
else stays here, in process, where it is cheap:

- **Waiting is local.** A request asks the store only once it holds its local
  slot (so the in-process FIFO and round-robin order, and the local caps,
  are kept). While the fleet says no, only the *head* waiter of a partition
  asks again, sleeping the answered wait (with jitter) between asks; the
  others queue behind it in FIFO order.
- **Across routers, turns.** A router whose head was refused a lease is
  queued in the store (its *line*, by when it started waiting); while lines
  wait, n free leases go only to the n oldest, and a line served goes to
  the back. So with P routers waiting for a partition, each is served within
  the next P leases freed (round-robin, as G5 is across partitions). The
  oldest line asks about four times as often as the others, since a free
  lease waits for it; a line that stops asking (its process died) loses its
  place after ``max(0.25 s, 10 x poll_interval)``.
- **Leases are renewed and given back by one keeper task** per event loop
  (``release`` is synchronous: it runs where a response body closes). The
  keeper renews every held lease each ``lease_ttl / 3`` in one round trip and
  sends the releases that piled up, at most one round trip per wake-up.
- **When the store cannot answer** within its timeout, ``on_unavailable``
  decides: ``"local"`` admits on the local quota alone (and asks the store
  again after ``retry_interval``), ``"fail"`` raises
  :class:`~hostpool.FleetUnavailable`.

Invariant (no lease leaks): every lease id this process sent in an acquire
is either held (and so renewed, then released exactly once when its ticket
is released) or queued for release: also when the acquire was cancelled or
timed out, since the store may have granted it before the answer was lost.
A release of an id that is not held is harmless (ids are unique), so it
never frees another holder's lease.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import anyio
import sniffio

from ._errors import FleetUnavailable, PoolTimeout
from ._loops import current_loop
from ._quota import FleetQuota

if TYPE_CHECKING:
    from ._admission import Partition
    from ._scheduler import Ticket

__all__ = ["Fleet", "FleetAnswer", "FleetStore", "FleetStoreError"]

logger = logging.getLogger("hostpool")

OnUnavailable = Literal["local", "fail"]


@dataclass(frozen=True)
class FleetAnswer:
    """The store's answer to one acquire.

    ``granted``: the lease (if the fleet quota caps connections) is held and
    the fleet rate's start taken. Otherwise ``reason`` says what is full
    (``"connections"``, ``"rate"`` or ``"pause"``) and ``wait`` how many
    seconds until asking again is worth it (0.0: unknown, poll). ``first``:
    this router's line is the oldest waiting across the fleet (the next free
    lease is its), so it polls faster.
    """

    granted: bool
    wait: float = 0.0
    reason: str = ""
    first: bool = False


class FleetStoreError(Exception):
    """The store could not answer (connection lost, server error): its errors, as one class."""


class FleetStore(Protocol):
    """Where a fleet keeps its shared state (``hostpool.redis.RedisFleet``)."""

    namespace: str
    lease_ttl: float
    on_unavailable: OnUnavailable
    timeout: float
    retry_interval: float
    poll_interval: float

    def claim(self) -> None:
        """Bind the store to the router being built; ValueError if another router has it."""
        ...

    async def acquire(
        self,
        key: str,
        lease: str,
        quota: FleetQuota,
        line: str,
        releases: Sequence[tuple[str, str]] = (),
    ) -> FleetAnswer:
        """Take a lease (if capped) and a start (if rated) for ``key``, or say how long to wait.

        ``line`` names the asking router: while routers wait for a lease, the
        store serves them in the order they started waiting. ``releases``:
        ``(key, lease)`` pairs to give back first, in the same round trip.
        """
        ...

    async def forget(self, lines: Sequence[tuple[str, str]]) -> None:
        """Take ``(key, line)`` out of the waiting order (its waiters all gave up)."""
        ...

    async def release(self, leases: Sequence[tuple[str, str]]) -> None:
        """Give back ``(key, lease)`` pairs; ids no longer held are ignored."""
        ...

    async def renew(self, leases: Sequence[tuple[str, str]]) -> list[bool]:
        """Extend each ``(key, lease)`` by ``lease_ttl``; False for a lease that was lost."""
        ...

    async def pause(self, key: str, seconds: float) -> None:
        """Pause ``key`` across the fleet for ``seconds`` (never shortens a pause)."""
        ...

    async def aclose(self) -> None:
        """Close the store's connections."""
        ...


class _Line:
    """A partition's requests waiting for the fleet, in FIFO order: only the head asks."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: deque[anyio.Event] = deque()


class Fleet:
    """This process's side of a fleet: asks, waits, keeps leases alive, gives them back."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store
        # Lease ids are unique across processes and restarts: a random
        # prefix per router, then a counter.
        self._prefix = os.urandom(6).hex()
        self._serial = itertools.count(1)
        self._lines: dict[str, _Line] = {}
        # Leases held, by ticket: the ticket's release gives its lease back.
        self.held: dict[Ticket, tuple[str, str]] = {}
        self._held_by: dict[str, Partition] = {}
        # (key, lease) pairs to give back, and pauses to share, sent by the keeper.
        self._to_release: list[tuple[str, str]] = []
        self._to_pause: list[tuple[str, float]] = []
        # Partitions whose waiters all gave up: their place in the fleet's
        # waiting order is given up too (sent by the keeper).
        self._to_forget: list[tuple[str, str]] = []
        # Leases of acquires whose answer was lost, given back again later.
        self._recheck: list[tuple[str, str]] = []
        self.unavailable_until = -1.0
        self.unavailable_since: float | None = None
        self.closed = False
        self._keeper: _Keeper | None = None
        self._clock: Callable[[], float] = anyio.current_time

    # -- admission -------------------------------------------------------------

    async def admit(
        self,
        partition: Partition,
        ticket: Ticket,
        deadline: float,
        clock: Callable[[], float],
    ) -> float | None:
        """Hold ``ticket`` until the fleet lets its request start.

        Return None once admitted (a lease recorded against ``ticket`` if the
        fleet quota caps connections), or the seconds of a fleet-wide pause
        the caller must sit out without its slot. Raise :class:`PoolTimeout`
        when ``deadline`` (loop clock) passes first, and
        :class:`FleetUnavailable` when the store cannot answer and the policy
        is ``"fail"``.
        """
        self._clock = clock
        quota = partition.entry.quota.fleet
        assert quota is not None
        line = self._lines.get(partition.key)
        if line is None or not line.queue:
            answer = await self._ask(partition, ticket, quota)
            if answer is None or answer.granted:
                return None
            if answer.reason == "pause":
                return answer.wait
            # Looked up again: others may have asked at the same time and
            # queued first. One line per partition, so one head asks.
            line = self._lines.get(partition.key)
            if line is None:
                line = self._lines[partition.key] = _Line()
        else:
            answer = None
        partition.counts.fleet_waits += 1
        turn = anyio.Event()
        line.queue.append(turn)
        admitted = False
        try:
            if line.queue[0] is not turn:
                with anyio.fail_after(None if deadline == math.inf else deadline - clock()):
                    await turn.wait()
            while True:
                if answer is not None:
                    await self._sleep_before_asking(partition, answer, deadline, clock)
                answer = await self._ask(partition, ticket, quota)
                if answer is None or answer.granted:
                    admitted = True
                    return None
                if answer.reason == "pause":
                    return answer.wait
        except TimeoutError:
            raise self._timeout(partition, answer, deadline, clock) from None
        finally:
            # Leave the line; the next in it becomes the head and asks at once.
            if line.queue and line.queue[0] is turn:
                line.queue.popleft()
                if line.queue:
                    line.queue[0].set()
            else:
                line.queue.remove(turn)
            if not line.queue:
                self._lines.pop(partition.key, None)
                if not admitted:
                    # Nobody here waits any more: give up the fleet-wide place.
                    self._to_forget.append((partition.key, self._prefix))
                    if not self.closed:
                        self._keeper_for().wake()

    async def _sleep_before_asking(
        self,
        partition: Partition,
        answer: FleetAnswer,
        deadline: float,
        clock: Callable[[], float],
    ) -> None:
        poll = self.store.poll_interval
        if answer.wait > 0:
            # The store knows when (a rate's next start): go then, plus a
            # little jitter so that the heads of several processes spread out.
            delay = answer.wait + random.uniform(0.0, min(poll, answer.wait * 0.1))
        elif answer.first:
            # Next in the fleet's order: the next lease freed is ours, and
            # the others are held back until we ask, so ask soon.
            delay = poll * random.uniform(0.25, 0.75)
        else:
            delay = poll * random.uniform(0.5, 1.5)
        if clock() + delay > deadline:
            raise TimeoutError
        await anyio.sleep(delay)

    def _timeout(
        self,
        partition: Partition,
        answer: FleetAnswer | None,
        deadline: float,
        clock: Callable[[], float],
    ) -> PoolTimeout:
        quota = partition.entry.quota.fleet
        assert quota is not None
        partition.counts.pool_timeouts += 1
        if answer is not None and answer.reason == "rate":
            what = f"the fleet rate {quota.rate} has no start free"
        else:
            what = f"all {quota.max_connections} fleet connections are in use"
        logger.info("%s: pool timeout waiting for the fleet (%s)", partition.key, what)
        return PoolTimeout(
            f"{partition.key}: {what} across namespace {self.store.namespace!r} "
            "before the pool timeout",
            partition=partition.key,
            waited=0.0,
        )

    async def _ask(
        self, partition: Partition, ticket: Ticket, quota: FleetQuota
    ) -> FleetAnswer | None:
        """One round trip. None: admitted on the local quota alone (store unavailable)."""
        store = self.store
        now = self._clock()
        if now < self.unavailable_until:
            self._unavailable(partition, None)
            return None
        lease = f"{self._prefix}:{next(self._serial)}"
        key = partition.key
        # Releases not sent yet go along, ahead of the acquire in the same
        # write (the keeper would send them alone). A lease released and
        # asked for again in one round trip stays with this router only if
        # no other router waits: the script serves waiting routers first.
        releases = self._to_release
        if releases:
            self._to_release = []
        answered = False
        try:
            with anyio.fail_after(store.timeout):
                answer = await store.acquire(key, lease, quota, self._prefix, releases)
            answered = True
        except (TimeoutError, OSError, FleetStoreError) as exc:
            self._unavailable(partition, exc)
            return None
        finally:
            if not answered and releases:
                # Maybe not sent: send them again (removing an id is idempotent).
                self._to_release.extend(releases)
                if not self.closed:
                    self._keeper_for().wake()
            if not answered and quota.max_connections is not None:
                # Cancelled or timed out mid round trip: the store may have
                # granted the lease before the answer was lost. Give it back
                # now, and once more at the next renewal: the acquire may
                # still be on its way (a paused or slow server runs it after
                # the release). Nobody renews it, so at worst it expires
                # after lease_ttl.
                self._give_back(key, lease)
                self._recheck.append((key, lease))
        if self.unavailable_since is not None:
            logger.warning("fleet %r answers again: fleet quotas enforced again", store.namespace)
            self.unavailable_since = None
        if answer.granted and quota.max_connections is not None:
            self.held[ticket] = (key, lease)
            self._held_by[lease] = partition
            self._keeper_for().wake()
        return answer

    def _unavailable(self, partition: Partition, exc: BaseException | None) -> None:
        store = self.store
        partition.counts.fleet_unavailable += 1
        now = self._clock()
        if exc is not None:
            self.unavailable_until = now + store.retry_interval
            if self.unavailable_since is None:
                self.unavailable_since = now
                logger.warning(
                    "fleet %r unavailable (%s: %s): %s for %.1fs",
                    store.namespace,
                    type(exc).__name__,
                    exc,
                    "admitting on local quotas only"
                    if store.on_unavailable == "local"
                    else "failing fleet admissions",
                    store.retry_interval,
                )
        if store.on_unavailable == "fail":
            raise FleetUnavailable(
                f"{partition.key}: the fleet store {store.namespace!r} did not answer "
                f"within {store.timeout}s (on_unavailable='fail')",
                partition=partition.key,
            ) from exc
        return None

    # -- releases, renewals, pauses -------------------------------------------

    def release(self, ticket: Ticket) -> None:
        """Give back the lease of a released ticket, if it holds one (sync, O(1))."""
        held = self.held.pop(ticket, None)
        if held is not None:
            self._held_by.pop(held[1], None)
            self._give_back(*held)

    def _give_back(self, key: str, lease: str) -> None:
        self._to_release.append((key, lease))
        if not self.closed:
            self._keeper_for().wake()

    def share_pause(self, key: str, seconds: float) -> None:
        """Tell the fleet about a Retry-After pause (sent by the keeper)."""
        self._to_pause.append((key, seconds))
        if not self.closed:
            self._keeper_for().wake()

    def _keeper_for(self) -> _Keeper:
        keeper = self._keeper
        if keeper is None or not keeper.alive():
            keeper = self._keeper = _Keeper(self)
        return keeper

    async def flush(self) -> None:
        """Send queued releases and pauses now (one round trip each at most)."""
        store = self.store
        releases, self._to_release = self._to_release, []
        pauses, self._to_pause = self._to_pause, []
        forgotten, self._to_forget = self._to_forget, []
        try:
            with anyio.fail_after(store.timeout * 4):
                if releases:
                    await store.release(releases)
                if forgotten:
                    await store.forget(forgotten)
                for key, seconds in pauses:
                    await store.pause(key, seconds)
        except (TimeoutError, OSError, FleetStoreError) as exc:
            # Unsent releases expire with their TTL; that is the bound.
            logger.debug("fleet %r: releases not sent (%s)", store.namespace, exc)

    async def renew(self) -> None:
        """Extend every held lease; report (and forget) the ones the store lost.

        Also gives back, a second time, the leases of acquires whose answer
        was lost (see :meth:`_ask`).
        """
        store = self.store
        if self._recheck:
            self._to_release.extend(self._recheck)
            self._recheck = []
            await self.flush()
        held = list(self.held.items())
        if not held:
            return
        try:
            with anyio.fail_after(store.timeout * 4):
                alive = await store.renew([pair for _, pair in held])
        except (TimeoutError, OSError, FleetStoreError) as exc:
            logger.debug("fleet %r: renewal failed (%s)", store.namespace, exc)
            return
        for (ticket, (key, lease)), ok in zip(held, alive, strict=False):
            if ok:
                continue
            # Lost (this process stalled past the TTL, or the store was
            # restarted): someone else may hold the slot now. Stop renewing;
            # the release later removes nothing but our own id.
            if self.held.pop(ticket, None) is not None:
                partition = self._held_by.pop(lease, None)
                if partition is not None:
                    partition.counts.fleet_leases_lost += 1
                logger.warning(
                    "%s: fleet lease %s was lost (expired or the store restarted); "
                    "the fleet may be over its cap until this request ends",
                    key,
                    lease,
                )

    async def aclose(self) -> None:
        """Stop the keeper, send what is queued, close the store."""
        self.closed = True
        keeper = self._keeper
        if keeper is not None:
            await keeper.stop()
        self._to_release.extend(self.held.values())
        self._to_release.extend(self._recheck)
        self._recheck = []
        self.held.clear()
        self._held_by.clear()
        try:
            await self.flush()
        finally:
            await self.store.aclose()


class _Keeper:
    """The one background task of a fleet on its event loop: renew, release, share pauses.

    Started on first need (asyncio: a task; trio: a system task, which needs
    no nursery of the user's). It sleeps until woken by a release or a pause,
    or until the next renewal is due.
    """

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._wakeup = anyio.Event()
        self._done = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._stopping = False
        self._loop = current_loop()
        self._spawn(self._run)

    def alive(self) -> bool:
        return not self._done.is_set() and self._loop is current_loop()

    def wake(self) -> None:
        self._wakeup.set()

    def _spawn(self, run: Callable[[], Awaitable[None]]) -> None:
        if sniffio.current_async_library() == "trio":
            import trio

            trio.lowlevel.spawn_system_task(run, name="hostpool fleet keeper")
        else:
            loop = asyncio.get_running_loop()
            task: asyncio.Task[None] = loop.create_task(run())  # type: ignore[arg-type]
            _TASKS.add(task)
            task.add_done_callback(_TASKS.discard)

    async def _run(self) -> None:
        fleet = self._fleet
        every = fleet.store.lease_ttl / 3
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                renew_at = anyio.current_time() + every
                while not self._stopping:
                    with anyio.move_on_after(max(0.0, renew_at - anyio.current_time())):
                        await self._wakeup.wait()
                    self._wakeup = anyio.Event()
                    try:
                        await fleet.flush()
                        if anyio.current_time() >= renew_at:
                            renew_at = anyio.current_time() + every
                            await fleet.renew()
                    except Exception:  # never let the keeper die of one bad round
                        logger.exception("fleet %r keeper error", fleet.store.namespace)
        finally:
            self._done.set()

    async def stop(self) -> None:
        if self._loop is not current_loop():
            return  # a keeper of a loop that is gone
        self._stopping = True
        self._wakeup.set()
        if self._scope is not None:
            self._scope.cancel()
        await self._done.wait()


_TASKS: set[asyncio.Task[None]] = set()

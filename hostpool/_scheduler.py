"""The admission scheduler: who may send a request now, and who waits.

Pure logic in the sans-I/O style of h11: no awaits, no clock, no sockets.
Callers report events (a request arrives, completes, or gives up waiting) and
get decisions back (admitted now, queued, rejected, or which waiter to wake).
The anyio layer in ``_admission.py`` turns those decisions into waits.

Accounting
----------
The budget ``B`` is split into reservations and shared slots. Every quota
entry is a *group* with ``reserved`` slots held for its partitions alone
(an exact hostname is a group of one partition; a wildcard or the default
entry is shared by every partition it matches). ``shared_total = B - sum of
reservations`` slots may be borrowed by anyone. With ``used(g)`` the requests
in flight across the partitions of group ``g``, the shared slots in use are::

    shared_used = sum over groups of max(0, used(g) - reserved(g))

No slot carries a label: a request is "on a reserved slot" or "on a shared
slot" only through these counts. So when a group's reserved request finishes
while its shared-slot requests go on, the counts say a shared slot is free,
and a waiter elsewhere gets it: reservations never sit idle while their own
group's requests hold shared slots.

Invariants (checked after every step by ``tests/properties``)
-------------------------------------------------------------
I1  in_flight(p) <= cap(p) for every partition; sum of used(g) <= B.
I2  A partition is *budget-waiting* when it has waiters and
    in_flight(p) < cap(p). Every budget-waiting partition is in the global
    ring and in its group's ring, and nothing else is.
I3  If any partition is budget-waiting, no shared slot is free, and its
    group's reservation is fully used. (G3 and G4: nobody waits while
    capacity they may use is free.)
I4  Shared slots go round-robin: a shared admission takes the head of the
    global ring and moves that partition to the tail. So between two shared
    admissions to partition p, every other partition that stayed
    budget-waiting the whole time gets one (G5).
I5  Waiters are served FIFO within a partition; a newcomer never overtakes
    a waiter (it queues whenever its partition has waiters).

Each release frees exactly one unit of one partition's cap, one group's usage
and one unit of the budget, so it wakes at most one waiter. Cancelling a
waiter frees nothing and wakes nobody.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["Group", "Lane", "Scheduler", "Status", "Ticket"]


class Status(enum.Enum):
    """Where a ticket stands."""

    GRANTED = "granted"
    WAITING = "waiting"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    RELEASED = "released"


class Ticket:
    """One request's claim on a slot.

    ``payload`` is free for the caller (the anyio layer keeps its wake-up
    event there); the scheduler never reads it.
    """

    __slots__ = ("lane", "payload", "status")

    def __init__(self, lane: Lane, status: Status) -> None:
        self.lane = lane
        self.status = status
        self.payload: Any = None

    def __repr__(self) -> str:
        return f"<Ticket {self.lane.key!r} {self.status.value}>"


class Group:
    """A reservation group: one quota entry and the partitions it matches."""

    __slots__ = ("name", "reserved", "used", "waiting")

    def __init__(self, name: str, reserved: int) -> None:
        self.name = name
        self.reserved = reserved
        self.used = 0
        # Budget-waiting lanes of this group, in round-robin order (I2).
        self.waiting: OrderedDict[Lane, None] = OrderedDict()

    def __repr__(self) -> str:
        return f"<Group {self.name!r} used={self.used}/{self.reserved}>"


class _EmptyQueue(OrderedDict["Ticket", None]):
    """The queue of every lane nobody waits in: one shared, always empty object.

    A partition touched once never queues, so it never pays for an
    OrderedDict of its own (~130 bytes, a tenth of an idle partition). A lane
    gets a real queue when its first waiter arrives and gives it back when
    the last one leaves.
    """

    def __setitem__(self, key: Ticket, value: None) -> None:
        raise RuntimeError("the shared empty queue must stay empty")


_NO_QUEUE = _EmptyQueue()


class Lane:
    """The scheduler's view of one partition: its cap, in-flight count and queue."""

    __slots__ = ("cap", "group", "in_flight", "key", "max_pending", "queue")

    def __init__(self, key: str, group: Group, cap: int, max_pending: int | None) -> None:
        self.key = key
        self.group = group
        self.cap = cap
        self.max_pending = max_pending
        self.in_flight = 0
        self.queue: OrderedDict[Ticket, None] = _NO_QUEUE

    @property
    def waiting(self) -> int:
        """Number of requests queued for this partition."""
        return len(self.queue)

    @property
    def idle(self) -> bool:
        """True when nothing is in flight and nobody waits."""
        return self.in_flight == 0 and not self.queue

    def __repr__(self) -> str:
        return f"<Lane {self.key!r} {self.in_flight}/{self.cap} waiting={len(self.queue)}>"


class Scheduler:
    """Decide admissions for many partitions sharing one budget.

    >>> s = Scheduler(budget=2, reservations={"a": 1})
    >>> a = s.lane("a", "a", cap=2)
    >>> b = s.lane("b", "<default>", cap=2)
    >>> s.admit(b).status, s.admit(b).status, s.admit(a).status
    (<Status.GRANTED: 'granted'>, <Status.WAITING: 'waiting'>, <Status.GRANTED: 'granted'>)
    """

    def __init__(self, budget: int, reservations: Mapping[str, int]) -> None:
        if budget < 1:
            raise ValueError(f"budget must be >= 1; got {budget}")
        for name, reserved in reservations.items():
            # A negative reservation would inflate shared_total past the budget.
            if reserved < 0:
                raise ValueError(f"reservation of {name!r} must be >= 0; got {reserved}")
        total = sum(reservations.values())
        if total > budget:
            raise ValueError(f"reservations ({total}) exceed the budget ({budget})")
        self.budget = budget
        self.shared_total = budget - total
        self.shared_used = 0
        self.in_flight = 0
        self.waiting = 0
        self._groups = {name: Group(name, reserved) for name, reserved in reservations.items()}
        # Budget-waiting lanes across all groups, in round-robin order (I2, I4).
        self._ring: OrderedDict[Lane, None] = OrderedDict()

    # -- configuration -------------------------------------------------------

    def group(self, name: str) -> Group:
        """Return the group called ``name``, creating it without reservation if new."""
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = Group(name, 0)
        return group

    def lane(self, key: str, group: str, cap: int, max_pending: int | None = None) -> Lane:
        """Create the lane of a partition. The caller keeps it and passes it back."""
        if cap < 1:
            raise ValueError(f"cap must be >= 1; got {cap}")
        if max_pending is not None and max_pending < 0:
            raise ValueError(f"max_pending must be >= 0 or None; got {max_pending}")
        return Lane(key, self.group(group), cap, max_pending)

    def groups(self) -> Iterator[Group]:
        """Iterate over the groups."""
        return iter(self._groups.values())

    @property
    def shared_free(self) -> int:
        """Shared slots not in use."""
        return self.shared_total - self.shared_used

    def budget_waiting(self) -> list[Lane]:
        """Return the budget-waiting lanes in round-robin order (for tests and stats)."""
        return list(self._ring)

    # -- events --------------------------------------------------------------

    def admit(self, lane: Lane) -> Ticket:
        """Report that a request for ``lane`` arrived; return its ticket.

        The ticket is GRANTED (send now), WAITING (wait for :meth:`release`
        to hand it a slot) or REJECTED (the queue is at ``max_pending``).
        """
        if not lane.queue and lane.in_flight < lane.cap:
            group = lane.group
            if group.used < group.reserved or self.shared_used < self.shared_total:
                ticket = Ticket(lane, Status.GRANTED)
                self._take_slot(lane)
                return ticket
        if lane.max_pending is not None and len(lane.queue) >= lane.max_pending:
            return Ticket(lane, Status.REJECTED)
        ticket = Ticket(lane, Status.WAITING)
        if lane.queue is _NO_QUEUE:
            lane.queue = OrderedDict()
        lane.queue[ticket] = None
        self.waiting += 1
        self._sync_rings(lane)
        return ticket

    def release(self, ticket: Ticket) -> Ticket | None:
        """Report that a granted request finished; return the waiter to wake, if any.

        The returned ticket is already GRANTED: its slot was handed over here,
        so no newcomer can take it before the waiter runs (no barging).
        """
        if ticket.status is not Status.GRANTED:
            raise RuntimeError(f"release of a ticket that is {ticket.status.value}")
        ticket.status = Status.RELEASED
        lane = ticket.lane
        group = lane.group
        lane.in_flight -= 1
        group.used -= 1
        self.in_flight -= 1
        if group.used >= group.reserved:
            self.shared_used -= 1
        self._sync_rings(lane)
        if group.used < group.reserved and group.waiting:
            # A reserved slot of this group is free: it goes to the group's
            # next budget-waiting lane, whichever partition released it.
            nxt = next(iter(group.waiting))
            group.waiting.move_to_end(nxt)
            return self._grant_head(nxt)
        if self.shared_used < self.shared_total and self._ring:
            nxt = next(iter(self._ring))
            self._ring.move_to_end(nxt)
            return self._grant_head(nxt)
        return None

    def cancel(self, ticket: Ticket) -> Ticket | None:
        """Report that a request gave up (cancelled, deadline passed, or done).

        A waiting ticket leaves its queue. A granted ticket is released, and
        the waiter it wakes is returned. Anything else is a no-op, so calling
        this twice, or after the race with a grant, is safe.
        """
        if ticket.status is Status.WAITING:
            lane = ticket.lane
            del lane.queue[ticket]
            if not lane.queue:
                lane.queue = _NO_QUEUE
            self.waiting -= 1
            ticket.status = Status.CANCELLED
            self._sync_rings(lane)
            return None
        if ticket.status is Status.GRANTED:
            return self.release(ticket)
        return None

    def drain(self, lanes: Iterable[Lane]) -> list[Ticket]:
        """Cancel every waiter of ``lanes`` (the router is closing); return their tickets."""
        drained: list[Ticket] = []
        for lane in dict.fromkeys(lanes):  # each lane once, in order
            drained.extend(lane.queue)
        for ticket in drained:
            self.cancel(ticket)
        return drained

    # -- internals -----------------------------------------------------------

    def _take_slot(self, lane: Lane) -> None:
        group = lane.group
        if group.used >= group.reserved:
            self.shared_used += 1
        group.used += 1
        lane.in_flight += 1
        self.in_flight += 1

    def _grant_head(self, lane: Lane) -> Ticket:
        ticket = next(iter(lane.queue))
        del lane.queue[ticket]
        if not lane.queue:
            lane.queue = _NO_QUEUE
        self.waiting -= 1
        ticket.status = Status.GRANTED
        self._take_slot(lane)
        self._sync_rings(lane)
        return ticket

    def _sync_rings(self, lane: Lane) -> None:
        """Keep I2: a lane is in the rings exactly while it is budget-waiting."""
        waiting = bool(lane.queue) and lane.in_flight < lane.cap
        if waiting:
            if lane not in self._ring:
                self._ring[lane] = None
                lane.group.waiting[lane] = None
        elif lane in self._ring:
            del self._ring[lane]
            del lane.group.waiting[lane]

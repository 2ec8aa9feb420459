"""The admission scheduler against a reference model, under random interleavings.

A hypothesis state machine draws a configuration (partitions, caps, groups,
reservations, budget, ``max_pending``) and then random sequences of events:
requests arrive, in-flight requests complete, waiters are cancelled or reach
their deadline, a waiter woken by a release is cancelled before it runs,
lanes are drained, and now and then everything finishes.

Every decision of the real :class:`~hostpool._scheduler.Scheduler` (grant,
wait or reject for an arrival; which waiter a release or cancel wakes) is
compared with :class:`Model`, a deliberately naive reference written from the
design's rules with plain lists and everything recomputed from scratch. The
guarantees (the README's "Guarantees" and "Design" sections) are checked
after every step as invariants, read off the real scheduler's lanes and groups.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import hypothesis.strategies as st
from hypothesis import event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from hostpool._scheduler import Lane, Scheduler, Status, Ticket

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionConfig:
    """One partition: its key, reservation group, cap and queue bound."""

    key: str
    group: str
    cap: int
    max_pending: int | None


@dataclass(frozen=True)
class Config:
    """A scheduler configuration: the budget, the reservations and the partitions."""

    budget: int
    reservations: dict[str, int]
    partitions: tuple[PartitionConfig, ...]


ORPHAN_GROUP = "*.nobody.example"


@st.composite
def configs(draw: st.DrawFn) -> Config:
    """Draw 1-8 partitions (caps 1-6), each alone in its group or sharing one of up to 3.

    Every group may or may not have a reservation entry (a group without one
    is created by ``Scheduler.lane`` with no reservation); sometimes a group
    with no partition holds back part of the budget. The reservations never
    sum to more than the budget (1-20).
    """
    shared_groups = [f"*.g{i}.example" for i in range(draw(st.integers(0, 3)))]
    partitions = []
    for i in range(draw(st.integers(1, 8))):
        key = f"p{i}"
        shared = bool(shared_groups) and draw(st.booleans())
        group = draw(st.sampled_from(shared_groups)) if shared else key
        cap = draw(st.integers(1, 6))
        max_pending = draw(st.none() | st.integers(0, 5))
        partitions.append(PartitionConfig(key, group, cap, max_pending))
    # Mostly less than the partitions could use together, so that they contend.
    demand = sum(p.cap for p in partitions)
    budget = draw(st.integers(1, max(1, min(20, demand - 1))) | st.integers(1, 20))
    groups = sorted({p.group for p in partitions})
    if draw(st.booleans()):
        groups.append(ORPHAN_GROUP)
    reservations: dict[str, int] = {}
    remaining = budget
    for group in groups:
        if draw(st.booleans()):
            reservations[group] = draw(st.integers(0, min(remaining, 6)))
            remaining -= reservations[group]
    return Config(budget, reservations, tuple(partitions))


# ---------------------------------------------------------------------------
# The reference model
# ---------------------------------------------------------------------------

# A model ticket's state. The real scheduler has fewer statuses; see STATUS_OF.
WAITING = "waiting"
GRANTED = "granted"
REJECTED = "rejected"
COMPLETED = "completed"  # released after it ran
WITHDRAWN = "withdrawn"  # granted by a release, cancelled before it ran
CANCELLED = "cancelled"  # a waiter gave up
TIMED_OUT = "timed out"  # a waiter's deadline passed
DRAINED = "drained"  # a waiter cancelled by drain()

STATUS_OF = {
    WAITING: Status.WAITING,
    GRANTED: Status.GRANTED,
    REJECTED: Status.REJECTED,
    COMPLETED: Status.RELEASED,
    WITHDRAWN: Status.RELEASED,
    CANCELLED: Status.CANCELLED,
    TIMED_OUT: Status.CANCELLED,
    DRAINED: Status.CANCELLED,
}


@dataclass(frozen=True)
class SharedAdmission:
    """One admission on a shared slot, with what G5 needs to judge it.

    ``previous`` is the tick of the partition's previous shared admission;
    ``others`` maps every *other* partition that was budget-waiting just
    before this admission to (tick it started budget-waiting, tick of its
    last shared admission).
    """

    tick: int
    partition: int
    previous: int | None
    others: dict[int, tuple[int, int | None]]


class Model:
    """A naive reference scheduler: plain lists, recomputed from scratch.

    Rules, straight from the design:

    - A request is granted iff its partition has no waiters, is under its
      cap, and its group has a free reserved slot or a shared slot is free.
      Otherwise it queues at the tail of its partition, unless the queue
      already holds ``max_pending`` waiters: then it is rejected.
    - After every event, while some budget-waiting partition (waiters, under
      cap) can take a slot, its head waiter is granted: first a partition
      whose group has a free reserved slot, taking turns within the group;
      else, if a shared slot is free, the partitions take turns across all
      groups. "Taking turns": whoever started budget-waiting, or last got a
      turn, longest ago goes first (a ``tick`` stamp, lowest wins).

    ``ticks`` order every state change; they stamp turns and the G5 history.
    """

    def __init__(self, cfg: Config) -> None:
        self.budget = cfg.budget
        self.parts = cfg.partitions
        groups = {p.group for p in cfg.partitions} | set(cfg.reservations)
        self.reserved = {g: cfg.reservations.get(g, 0) for g in groups}
        n = len(cfg.partitions)
        self.in_flight = [0] * n
        self.queues: list[list[int]] = [[] for _ in range(n)]
        self.ticket_partition: list[int] = []
        self.ticket_state: list[str] = []
        self.woken: list[int] = []  # tickets granted by a release, not finished yet
        self.clock = 0
        # Round-robin turns (the model's only ordering state).
        self.group_turn = [0] * n
        self.shared_turn = [0] * n
        # G5 bookkeeping, never used for decisions. ahead[q]: the partitions
        # that may still take a shared slot before q, namely those that were
        # budget-waiting when q's wait (or its last shared turn) began and
        # have neither had a shared turn nor stopped waiting since.
        self.waiting_since: list[int | None] = [None] * n
        self.last_shared: list[int | None] = [None] * n
        self.ahead: list[set[int]] = [set() for _ in range(n)]
        self.overtakes: list[tuple[int, int]] = []  # (p, q): p got a shared slot ahead of q
        self.shared_log: list[SharedAdmission] = []

    # -- derived quantities, recomputed every time --------------------------

    def used(self, group: str) -> int:
        return sum(self.in_flight[i] for i, p in enumerate(self.parts) if p.group == group)

    @property
    def shared_total(self) -> int:
        return self.budget - sum(self.reserved.values())

    @property
    def shared_used(self) -> int:
        return sum(max(0, self.used(g) - r) for g, r in self.reserved.items())

    def reserved_free(self, i: int) -> bool:
        group = self.parts[i].group
        return self.used(group) < self.reserved[group]

    def budget_waiting(self, i: int) -> bool:
        return bool(self.queues[i]) and self.in_flight[i] < self.parts[i].cap

    def waiting_partitions(self) -> list[int]:
        """Budget-waiting partitions in shared round-robin order."""
        waiting = [i for i in range(len(self.parts)) if self.budget_waiting(i)]
        return sorted(waiting, key=lambda i: self.shared_turn[i])

    def tickets_in(self, state: str) -> list[int]:
        return [t for t, s in enumerate(self.ticket_state) if s == state]

    # -- events ---------------------------------------------------------------

    def admit(self, i: int) -> tuple[str, list[int]]:
        """A request for partition ``i`` arrives: return its state and who was woken."""
        tid = len(self.ticket_state)
        self.ticket_partition.append(i)
        self.ticket_state.append(WAITING)
        part = self.parts[i]
        free = self.reserved_free(i) or self.shared_used < self.shared_total
        if not self.queues[i] and self.in_flight[i] < part.cap and free:
            self._grant(i, tid)
        elif part.max_pending is not None and len(self.queues[i]) >= part.max_pending:
            self.ticket_state[tid] = REJECTED
        else:
            self.queues[i].append(tid)
            self._refresh()
        return self.ticket_state[tid], self._settle()

    def release(self, tid: int, state: str = COMPLETED) -> list[int]:
        """A granted request finishes (or is withdrawn): return who was woken."""
        assert self.ticket_state[tid] == GRANTED
        self.ticket_state[tid] = state
        if tid in self.woken:
            self.woken.remove(tid)
        self.in_flight[self.ticket_partition[tid]] -= 1
        self._refresh()
        return self._settle()

    def cancel_waiter(self, tid: int, state: str) -> list[int]:
        """A waiter gives up (cancelled, timed out, drained): return who was woken."""
        assert self.ticket_state[tid] == WAITING
        self.ticket_state[tid] = state
        self.queues[self.ticket_partition[tid]].remove(tid)
        self._refresh()
        return self._settle()

    # -- internals --------------------------------------------------------------

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _settle(self) -> list[int]:
        woken: list[int] = []
        while True:
            waiting = [i for i in range(len(self.parts)) if self.budget_waiting(i)]
            by_reservation = [i for i in waiting if self.reserved_free(i)]
            if by_reservation:
                i = min(by_reservation, key=lambda i: self.group_turn[i])
                self.group_turn[i] = self._tick()
            elif waiting and self.shared_used < self.shared_total:
                i = min(waiting, key=lambda i: self.shared_turn[i])
                self.shared_turn[i] = self._tick()
            else:
                return woken
            tid = self.queues[i].pop(0)
            self._grant(i, tid)
            self.woken.append(tid)
            woken.append(tid)

    def _grant(self, i: int, tid: int) -> None:
        shared = not self.reserved_free(i)
        tick = self._tick()
        if shared:
            others = {
                j: (since, self.last_shared[j])
                for j, since in enumerate(self.waiting_since)
                if since is not None and j != i
            }
            self.shared_log.append(SharedAdmission(tick, i, self.last_shared[i], others))
            self.last_shared[i] = tick
            for j in others:
                if i not in self.ahead[j]:
                    self.overtakes.append((i, j))
                self.ahead[j].discard(i)
        self.in_flight[i] += 1
        self.ticket_state[tid] = GRANTED
        self._refresh()
        if shared and self.waiting_since[i] is not None:
            self.ahead[i] = self._others_waiting(i)

    def _refresh(self) -> None:
        """Stamp partitions that start budget-waiting; forget those that stop."""
        n = len(self.parts)
        for i in range(n):
            if not self.budget_waiting(i) and self.waiting_since[i] is not None:
                self.waiting_since[i] = None
                self.ahead[i] = set()
                for ahead in self.ahead:
                    ahead.discard(i)
        for i in range(n):
            if self.budget_waiting(i) and self.waiting_since[i] is None:
                tick = self._tick()
                self.waiting_since[i] = tick
                self.group_turn[i] = self.shared_turn[i] = tick
                self.ahead[i] = self._others_waiting(i)

    def _others_waiting(self, i: int) -> set[int]:
        return {j for j, since in enumerate(self.waiting_since) if since is not None and j != i}


# ---------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------


@settings(stateful_step_count=80)
class SchedulerMachine(RuleBasedStateMachine):
    """Drive the real scheduler and the model with the same events; compare."""

    cfg: Config
    scheduler: Scheduler
    lanes: list[Lane]
    model: Model

    def __init__(self) -> None:
        super().__init__()
        self.ready = False
        self.tickets: list[Ticket] = []
        self.tid_by_id: dict[int, int] = {}
        self.g5_checked = 0
        self.tickets_at_last_sweep = 0

    @initialize(cfg=configs(), data=st.data())
    def configure(self, cfg: Config, data: st.DataObject) -> None:
        """Build the scheduler and its lanes, then let a first wave of requests arrive."""
        self.cfg = cfg
        self.scheduler = Scheduler(cfg.budget, cfg.reservations)
        self.lanes = [
            self.scheduler.lane(p.key, p.group, p.cap, p.max_pending) for p in cfg.partitions
        ]
        self.model = Model(cfg)
        self.ready = True
        keys = [p.key for p in cfg.partitions]
        wave = data.draw(
            st.lists(st.sampled_from(keys), min_size=len(keys), max_size=30), label="first wave"
        )
        for key in wave:
            self.arrive(keys.index(key))

    # -- helpers ----------------------------------------------------------------

    def active(self) -> bool:
        """Some request is in flight or waiting (rules that only poke need one)."""
        return self.ready and any(s in (WAITING, GRANTED) for s in self.model.ticket_state)

    def pick_partition(self, data: st.DataObject) -> int:
        keys = [p.key for p in self.cfg.partitions]
        return keys.index(data.draw(st.sampled_from(keys), label="partition"))

    def pick_ticket(self, data: st.DataObject, tids: list[int]) -> int:
        return data.draw(st.sampled_from(tids), label="ticket")

    def tid_of(self, ticket: Ticket | None) -> int | None:
        """The index of a real ticket in ``self.tickets`` (which keeps every one alive)."""
        if ticket is None:
            return None
        return self.tid_by_id[id(ticket)]

    def check_woken(self, real: Ticket | None, expected: list[int]) -> None:
        """The real call woke the same waiter as the model, already GRANTED."""
        assert len(expected) <= 1, f"model woke several waiters: {expected}"
        assert self.tid_of(real) == (expected[0] if expected else None)
        assert real is None or real.status is Status.GRANTED

    def snapshot(self) -> tuple[object, ...]:
        s = self.scheduler
        return (
            s.in_flight,
            s.waiting,
            s.shared_used,
            tuple(g.used for g in s.groups()),
            tuple((lane.in_flight, tuple(lane.queue)) for lane in self.lanes),
            tuple(s.budget_waiting()),
            tuple(t.status for t in self.tickets),
        )

    def arrive(self, i: int) -> None:
        lane, part, model = self.lanes[i], self.cfg.partitions[i], self.model
        had_waiters = bool(model.queues[i])
        queued = len(model.queues[i])
        in_flight = model.in_flight[i]
        group_full = not model.reserved_free(i)
        shared_full = model.shared_used >= model.shared_total
        alone = sum(p.group == part.group for p in self.cfg.partitions) == 1

        ticket = self.scheduler.admit(lane)
        self.tid_by_id[id(ticket)] = len(self.tickets)
        self.tickets.append(ticket)
        expected, woken = model.admit(i)
        assert ticket.status is STATUS_OF[expected]
        assert woken == [], "an arrival must leave nothing admissible waiting"
        event(f"arrival {ticket.status.value}")
        event(f"budget-waiting partitions: {min(len(self.scheduler.budget_waiting()), 3)}+")

        if had_waiters:  # I5: no barging
            assert ticket.status is not Status.GRANTED
        if ticket.status is Status.REJECTED:  # G6
            assert part.max_pending is not None and queued >= part.max_pending
            assert lane.waiting == queued
        if ticket.status is not Status.GRANTED:
            # G4 (design wording): a request waits only while its partition is
            # at its cap, or every shared slot and its group's reservation are in use.
            assert in_flight >= part.cap or (shared_full and group_full)
        if alone and in_flight < min(part.cap, model.reserved[part.group]):
            # G3 (design wording): in_flight(p) < reserved(p) means admitted at once.
            assert ticket.status is Status.GRANTED

    def complete(self, tid: int, state: str) -> None:
        woken = self.model.release(tid, state)
        if state == COMPLETED:
            real = self.scheduler.release(self.tickets[tid])
        else:
            real = self.scheduler.cancel(self.tickets[tid])
        self.check_woken(real, woken)
        assert self.tickets[tid].status is Status.RELEASED
        event("release woke a waiter" if woken else "release woke nobody")

    def give_up(self, tid: int, state: str) -> None:
        woken = self.model.cancel_waiter(tid, state)
        assert woken == [], "cancelling a waiter frees nothing"
        assert self.scheduler.cancel(self.tickets[tid]) is None
        assert self.tickets[tid].status is Status.CANCELLED

    def finish_everything(self, cancel_waiters_first: bool) -> None:
        """G7: complete every request and cancel every waiter; all comes back to zero."""
        model = self.model
        if cancel_waiters_first:
            for tid in model.tickets_in(WAITING):
                self.give_up(tid, CANCELLED)
        while model.tickets_in(GRANTED):
            self.complete(model.tickets_in(GRANTED)[0], COMPLETED)
        # Nothing in flight: a waiter left now can never be admitted, which
        # only happens when its group reserves nothing and there are no shared slots.
        for tid in model.tickets_in(WAITING):
            group = self.cfg.partitions[model.ticket_partition[tid]].group
            assert model.reserved[group] == 0 and model.shared_total == 0
            self.give_up(tid, CANCELLED)

        s = self.scheduler
        assert s.in_flight == 0 and s.waiting == 0
        assert s.shared_used == 0 and s.shared_free == s.shared_total
        assert all(g.used == 0 and not g.waiting for g in s.groups())
        assert all(lane.idle and not lane.queue for lane in self.lanes)
        assert s.budget_waiting() == []
        assert all(t.status not in (Status.GRANTED, Status.WAITING) for t in self.tickets)
        self.tickets_at_last_sweep = len(self.tickets)

    # -- rules ----------------------------------------------------------------

    @rule(data=st.data())
    def request_arrives(self, data: st.DataObject) -> None:
        self.arrive(self.pick_partition(data))

    @rule(data=st.data(), count=st.integers(2, 6))
    def burst_of_requests_arrives(self, data: st.DataObject, count: int) -> None:
        i = self.pick_partition(data)
        for _ in range(count):
            self.arrive(i)

    @precondition(lambda self: self.ready and self.model.tickets_in(GRANTED))
    @rule(data=st.data())
    def request_completes(self, data: st.DataObject) -> None:
        self.complete(self.pick_ticket(data, self.model.tickets_in(GRANTED)), COMPLETED)

    @precondition(lambda self: self.ready and self.model.woken)
    @rule(data=st.data())
    def woken_waiter_is_cancelled_before_it_runs(self, data: st.DataObject) -> None:
        """The race: a release granted the waiter, but its task was cancelled meanwhile."""
        self.complete(self.pick_ticket(data, list(self.model.woken)), WITHDRAWN)

    @precondition(lambda self: self.ready and self.model.tickets_in(WAITING))
    @rule(data=st.data())
    def waiter_is_cancelled(self, data: st.DataObject) -> None:
        self.give_up(self.pick_ticket(data, self.model.tickets_in(WAITING)), CANCELLED)

    @precondition(lambda self: self.ready and self.model.tickets_in(WAITING))
    @rule(data=st.data())
    def waiter_deadline_passes(self, data: st.DataObject) -> None:
        """Deadlines are set on arrival, so a partition's head waiter expires first."""
        heads = [q[0] for q in self.model.queues if q]
        self.give_up(self.pick_ticket(data, heads), TIMED_OUT)

    @precondition(
        lambda self: (
            self.active() and any(s not in (WAITING, GRANTED) for s in self.model.ticket_state)
        )
    )
    @rule(data=st.data())
    def finished_ticket_is_cancelled_again(self, data: st.DataObject) -> None:
        """Cancelling a rejected, cancelled or released ticket changes nothing."""
        done = [t for t, s in enumerate(self.model.ticket_state) if s not in (WAITING, GRANTED)]
        ticket = self.tickets[self.pick_ticket(data, done)]
        before = self.snapshot()
        assert self.scheduler.cancel(ticket) is None
        assert self.snapshot() == before

    @precondition(lambda self: self.active() and any(s != GRANTED for s in self.model.ticket_state))
    @rule(data=st.data())
    def release_of_a_ticket_not_granted_raises(self, data: st.DataObject) -> None:
        """Releasing a ticket that holds no slot raises and changes nothing."""
        held = [t for t, s in enumerate(self.model.ticket_state) if s != GRANTED]
        ticket = self.tickets[self.pick_ticket(data, held)]
        before = self.snapshot()
        try:
            self.scheduler.release(ticket)
        except RuntimeError:
            pass
        else:
            raise AssertionError("release of a ticket that holds no slot did not raise")
        assert self.snapshot() == before

    @precondition(lambda self: self.ready and self.model.tickets_in(WAITING))
    @rule(data=st.data())
    def lanes_are_drained(self, data: st.DataObject) -> None:
        """drain() cancels the waiters of the given lanes, lane by lane, FIFO."""
        keys = [p.key for p in self.cfg.partitions]
        chosen = data.draw(st.lists(st.sampled_from(keys), unique=True), label="lanes")
        indexes = [keys.index(k) for k in chosen]
        expected = [tid for i in indexes for tid in self.model.queues[i]]
        drained = self.scheduler.drain(self.lanes[i] for i in indexes)
        assert [self.tid_of(t) for t in drained] == expected
        for tid in expected:
            assert self.model.cancel_waiter(tid, DRAINED) == []
        assert all(t.status is Status.CANCELLED for t in drained)

    @precondition(lambda self: self.active() and any(lane.idle for lane in self.lanes))
    @rule(data=st.data())
    def idle_partition_is_dropped_and_recreated(self, data: st.DataObject) -> None:
        """G9: an idle partition's lane is forgotten; its next request gets a new one."""
        idle = [p.key for p, lane in zip(self.cfg.partitions, self.lanes) if lane.idle]
        key = data.draw(st.sampled_from(idle), label="partition")
        i = [p.key for p in self.cfg.partitions].index(key)
        p = self.cfg.partitions[i]
        self.lanes[i] = self.scheduler.lane(p.key, p.group, p.cap, p.max_pending)

    @precondition(lambda self: self.ready and len(self.tickets) - self.tickets_at_last_sweep >= 25)
    @rule(cancel_waiters_first=st.booleans())
    def everything_finishes(self, cancel_waiters_first: bool) -> None:
        self.finish_everything(cancel_waiters_first)

    def teardown(self) -> None:
        # Skipped while a failure propagates, so that it is not masked.
        if self.ready and sys.exc_info()[1] is None:
            self.finish_everything(cancel_waiters_first=False)

    # -- invariants -----------------------------------------------------------

    @invariant()
    def scheduler_agrees_with_model(self) -> None:
        """Counters, queues (FIFO order), ring order and every ticket's status match."""
        if not self.ready:
            return
        s, model = self.scheduler, self.model
        assert s.in_flight == sum(model.in_flight)
        assert s.waiting == sum(len(q) for q in model.queues)
        assert s.shared_used == model.shared_used
        assert s.shared_free == model.shared_total - model.shared_used
        for i, lane in enumerate(self.lanes):
            assert lane.in_flight == model.in_flight[i]
            assert [self.tid_of(t) for t in lane.queue] == model.queues[i]
        for group in s.groups():
            assert group.used == model.used(group.name)
            assert group.reserved == model.reserved[group.name]
        assert [self.lanes.index(lane) for lane in s.budget_waiting()] == (
            model.waiting_partitions()
        )
        statuses = [t.status for t in self.tickets]
        assert statuses == [STATUS_OF[state] for state in model.ticket_state]

    @invariant()
    def g1_caps_and_budget_hold(self) -> None:
        """G1: in_flight(p) <= cap(p) for every partition; their sum <= budget."""
        if not self.ready:
            return
        assert all(lane.in_flight <= lane.cap for lane in self.lanes)
        assert sum(lane.in_flight for lane in self.lanes) <= self.cfg.budget
        assert self.scheduler.in_flight <= self.cfg.budget

    def recomputed_shared_used(self) -> int:
        """shared_used from the lanes alone: sum over groups of max(0, used - reserved)."""
        used: dict[str, int] = {}
        for lane in self.lanes:
            used[lane.group.name] = used.get(lane.group.name, 0) + lane.in_flight
        return sum(max(0, used.get(g.name, 0) - g.reserved) for g in self.scheduler.groups())

    @invariant()
    def g3_no_waiter_beside_a_free_reserved_slot(self) -> None:
        """G3: no partition below its cap has a waiter while its group has a free reserved slot."""
        if not self.ready:
            return
        for lane in self.lanes:
            group_used = sum(x.in_flight for x in self.lanes if x.group is lane.group)
            if lane.queue and lane.in_flight < lane.cap:
                assert group_used >= lane.group.reserved, lane

    @invariant()
    def g4_no_waiter_beside_a_free_shared_slot(self) -> None:
        """G4: no partition below its cap has a waiter while a shared slot is free.

        ``shared_used`` is recomputed from the lanes, not read from the scheduler.
        """
        if not self.ready:
            return
        shared_free = self.scheduler.shared_total - self.recomputed_shared_used()
        assert shared_free >= 0
        for lane in self.lanes:
            if lane.queue and lane.in_flight < lane.cap:
                assert shared_free == 0, lane

    @invariant()
    def g5_shared_slots_go_round_robin(self) -> None:
        """G5: between two shared admissions to p, every other partition that was
        budget-waiting (waiters and in_flight < cap) for the whole interval got a
        shared admission in between.

        An admission is *shared* when, just before it, used(g) >= reserved(g)
        for the partition's group; admissions on reserved slots are not counted.

        The bound: while q is budget-waiting, every shared admission to another
        partition goes to one of ``ahead[q]`` (partitions that were budget-waiting
        when q's wait, or its last shared turn, began, and have neither had a
        shared turn nor stopped waiting since), and removes it from there.
        ``ahead[q]`` holds only partitions budget-waiting now, so when P
        partitions are budget-waiting, each one's head is admitted within the
        next P shared admissions.
        """
        if not self.ready:
            return
        model = self.model
        for admission in model.shared_log[self.g5_checked :]:
            if admission.previous is None:
                continue
            for other, (since, last) in admission.others.items():
                if since < admission.previous:
                    assert last is not None and last > admission.previous, (
                        f"p{admission.partition} got two shared slots while "
                        f"p{other} waited without one"
                    )
        self.g5_checked = len(model.shared_log)
        assert model.overtakes == [], "(p, q): p got a shared slot while behind waiting q"
        waiting = {i for i, since in enumerate(model.waiting_since) if since is not None}
        for i in waiting:
            assert model.ahead[i] <= waiting - {i}

    @invariant()
    def g6_queues_are_bounded(self) -> None:
        """G6: no queue is longer than its max_pending (overflow is rejected, see arrive)."""
        if not self.ready:
            return
        for lane in self.lanes:
            if lane.max_pending is not None:
                assert len(lane.queue) <= lane.max_pending

    @invariant()
    def i2_ring_holds_exactly_the_budget_waiting_partitions(self) -> None:
        """I2: a lane is in the global ring and its group's ring iff it is budget-waiting."""
        if not self.ready:
            return
        ring = self.scheduler.budget_waiting()
        assert len(set(map(id, ring))) == len(ring)
        for lane in self.lanes:
            waiting = bool(lane.queue) and lane.in_flight < lane.cap
            assert (lane in ring) == waiting
            assert (lane in lane.group.waiting) == waiting
        assert sum(len(g.waiting) for g in self.scheduler.groups()) == len(ring)

    @invariant()
    def i5_waiters_are_in_arrival_order(self) -> None:
        """I5: each partition's queue holds its waiters in arrival order."""
        if not self.ready:
            return
        for lane in self.lanes:
            tids = [self.tid_by_id[id(t)] for t in lane.queue]
            assert tids == sorted(tids)
            assert all(t.status is Status.WAITING and t.lane is lane for t in lane.queue)


TestScheduler = SchedulerMachine.TestCase

"""Unit tests of the socket ledger: pure bookkeeping, plain calls, no I/O, no clock.

Connections are tiny stand-ins (the ledger only uses them as dict keys) and
owners are fakes that record which idle connections the ledger told them to
forget. A hypothesis state machine at the end drives random sequences of
reserve/park/unpark/close/retire against a plain-list model.

Division of labour the tests pin down: the ledger calls ``owner.evicted(conn)``
for every idle connection it closes, and it is the owner
(``PartitionPool.evicted``) that increments ``ledger.evictions``; the ledger
never counts evictions itself, or each one would be counted twice.
"""

from __future__ import annotations

import math
from typing import Any

import hypothesis.strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from hostpool._ledger import SocketLedger

NEVER = math.inf


class Conn:
    """A stand-in connection: hashable by identity, named for readable failures."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Conn({self.name!r})"


class Owner:
    """A fake partition pool: records every ``evicted(conn, origin)`` call."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.evicted_conns: list[Any] = []
        self.evicted_origins: list[Any] = []

    def evicted(self, conn: Any, origin: object) -> None:
        self.evicted_conns.append(conn)
        self.evicted_origins.append(origin)

    def __repr__(self) -> str:
        return f"Owner({self.key!r})"


def owners(ledger: SocketLedger) -> list[tuple[Any, Any]]:
    """The idle connections, least recently used first, with their owners."""
    return [(conn, parked.owner) for conn, parked in ledger.idle.items()]


def test_a_parked_connection_keeps_its_owner_origin_and_deadline_and_hands_them_back() -> None:
    ledger = SocketLedger(max_connections=2, max_keepalive=2)
    owner = Owner("a")
    first, second = Conn("first"), Conn("second")
    for conn, origin in ((first, "origin-1"), (second, "origin-2")):
        ledger.reserve()
        ledger.park(conn, owner, now=0.0, expires=5.0, origin=origin)
    parked = ledger.idle[first]
    assert (parked.owner, parked.origin, parked.expires) == (owner, "origin-1", 5.0)
    ledger.reserve()  # at the ceiling: the least recently used goes, with its origin
    assert (owner.evicted_conns, owner.evicted_origins) == ([first], ["origin-1"])


def opened_and_parked(
    ledger: SocketLedger, owner: Owner, *names: str, expires: float = NEVER
) -> list[Conn]:
    """Reserve and park one connection per name, in order (so the first is the LRU)."""
    conns = [Conn(name) for name in names]
    for _ in conns:
        assert ledger.reserve() == []
    for conn in conns:
        assert ledger.park(conn, owner, now=0.0, expires=expires) == []
    return conns


# -- reserve -----------------------------------------------------------------------


def test_a_new_ledger_counts_nothing() -> None:
    ledger = SocketLedger(max_connections=3, max_keepalive=2)
    assert (ledger.open, ledger.opened, ledger.evictions) == (0, 0, 0)
    assert not ledger.idle and ledger.retired == []


def test_reserve_below_the_ceiling_counts_the_socket_and_closes_nothing() -> None:
    ledger = SocketLedger(max_connections=3, max_keepalive=3)
    assert ledger.reserve() == []
    assert ledger.reserve() == []
    assert (ledger.open, ledger.opened) == (2, 2)


def test_reserve_at_the_ceiling_closes_the_least_recently_used_idle_connection() -> None:
    ledger = SocketLedger(max_connections=3, max_keepalive=3)
    owner = Owner("a")
    first, second, third = opened_and_parked(ledger, owner, "first", "second", "third")
    assert ledger.reserve() == [first]
    assert owner.evicted_conns == [first]
    assert list(ledger.idle) == [second, third]
    assert (ledger.open, ledger.opened) == (3, 4)


def test_reserve_at_the_ceiling_evicts_across_owners_in_lru_order() -> None:
    ledger = SocketLedger(max_connections=2, max_keepalive=2)
    a, b = Owner("a"), Owner("b")
    conn_a, conn_b = Conn("a1"), Conn("b1")
    ledger.reserve()
    ledger.reserve()
    ledger.park(conn_b, b, now=0.0, expires=NEVER)
    ledger.park(conn_a, a, now=0.0, expires=NEVER)
    # b's connection went idle first, so it goes first, whoever asks.
    assert ledger.reserve() == [conn_b]
    assert (a.evicted_conns, b.evicted_conns) == ([], [conn_b])
    assert ledger.reserve() == [conn_a]
    assert (a.evicted_conns, b.evicted_conns) == ([conn_a], [conn_b])
    assert ledger.open == 2


def test_reserve_evicts_as_many_idle_connections_as_it_takes_to_make_room() -> None:
    ledger = SocketLedger(max_connections=3, max_keepalive=3)
    owner = Owner("a")
    conns = opened_and_parked(ledger, owner, "c1", "c2", "c3")
    ledger.max_connections = 1
    assert ledger.reserve() == conns
    assert owner.evicted_conns == conns
    assert ledger.open == 1 and not ledger.idle


def test_reserve_at_the_ceiling_without_idle_connections_counts_the_socket_anyway() -> None:
    # Admission makes this unreachable (an active socket carries an admitted
    # request); the ledger still never loses count of a socket being opened.
    ledger = SocketLedger(max_connections=1, max_keepalive=1)
    ledger.reserve()
    assert ledger.reserve() == []
    assert (ledger.open, ledger.opened) == (2, 2)


def test_reserve_never_evicts_a_connection_taken_back_into_use() -> None:
    ledger = SocketLedger(max_connections=2, max_keepalive=2)
    owner = Owner("a")
    busy, idle = opened_and_parked(ledger, owner, "busy", "idle")
    ledger.unpark(busy)
    assert ledger.reserve() == [idle]
    assert owner.evicted_conns == [idle]


def test_the_ledger_leaves_counting_evictions_to_the_owner() -> None:
    # PartitionPool.evicted() increments ledger.evictions; if the ledger did
    # too, every eviction would count twice.
    ledger = SocketLedger(max_connections=1, max_keepalive=1)
    owner = Owner("a")
    opened_and_parked(ledger, owner, "c1")
    assert len(ledger.reserve()) == 1
    assert ledger.evictions == 0


def test_opened_counts_every_reservation_and_never_goes_down() -> None:
    ledger = SocketLedger(max_connections=1, max_keepalive=1)
    owner = Owner("a")
    for i in range(4):
        conn = Conn(str(i))
        ledger.reserve()
        ledger.park(conn, owner, now=0.0, expires=NEVER)
    assert (ledger.opened, ledger.open) == (4, 1)


# -- park ----------------------------------------------------------------------


def test_park_within_the_keepalive_cap_closes_nothing() -> None:
    ledger = SocketLedger(max_connections=3, max_keepalive=2)
    owner = Owner("a")
    first, second = opened_and_parked(ledger, owner, "first", "second")
    assert owners(ledger) == [(first, owner), (second, owner)]
    assert ledger.open == 2 and owner.evicted_conns == []


def test_park_beyond_the_keepalive_cap_closes_the_least_recently_used() -> None:
    ledger = SocketLedger(max_connections=5, max_keepalive=2)
    a, b = Owner("a"), Owner("b")
    conns = [Conn(f"c{i}") for i in range(3)]
    for _ in conns:
        ledger.reserve()
    ledger.park(conns[0], a, now=0.0, expires=NEVER)
    ledger.park(conns[1], b, now=0.0, expires=NEVER)
    assert ledger.park(conns[2], b, now=0.0, expires=NEVER) == [conns[0]]
    assert (a.evicted_conns, b.evicted_conns) == ([conns[0]], [])
    assert list(ledger.idle) == conns[1:]
    assert ledger.open == 2


def test_park_with_no_keepalive_closes_the_connection_just_parked() -> None:
    ledger = SocketLedger(max_connections=1, max_keepalive=0)
    owner = Owner("a")
    conn = Conn("only")
    ledger.reserve()
    assert ledger.park(conn, owner, now=0.0, expires=NEVER) == [conn]
    assert owner.evicted_conns == [conn]
    assert ledger.open == 0 and not ledger.idle


def test_a_connection_parked_again_becomes_the_most_recently_used() -> None:
    ledger = SocketLedger(max_connections=2, max_keepalive=2)
    owner = Owner("a")
    first, second = opened_and_parked(ledger, owner, "first", "second")
    ledger.unpark(first)
    ledger.park(first, owner, now=0.0, expires=NEVER)
    assert list(ledger.idle) == [second, first]
    assert ledger.reserve() == [second]


def test_park_closes_the_oldest_idle_connection_once_its_keepalive_expired() -> None:
    ledger = SocketLedger(max_connections=3, max_keepalive=3)
    owner = Owner("a")
    old, new = Conn("old"), Conn("new")
    ledger.reserve()
    ledger.reserve()
    ledger.park(old, owner, now=0.0, expires=5.0)
    assert ledger.park(new, owner, now=5.0, expires=10.0) == [old]
    assert owner.evicted_conns == [old]
    assert list(ledger.idle) == [new]
    assert ledger.open == 1


def test_park_keeps_the_oldest_idle_connection_before_its_keepalive_runs_out() -> None:
    ledger = SocketLedger(max_connections=3, max_keepalive=3)
    owner = Owner("a")
    old, new = Conn("old"), Conn("new")
    ledger.reserve()
    ledger.reserve()
    ledger.park(old, owner, now=0.0, expires=5.0)
    assert ledger.park(new, owner, now=4.9, expires=9.9) == []
    assert list(ledger.idle) == [old, new]


def test_park_sweeps_at_most_one_expired_connection_per_call() -> None:
    ledger = SocketLedger(max_connections=4, max_keepalive=4)
    owner = Owner("a")
    first, second = opened_and_parked(ledger, owner, "first", "second", expires=1.0)
    third, fourth = Conn("third"), Conn("fourth")
    ledger.reserve()
    ledger.reserve()
    assert ledger.park(third, owner, now=2.0, expires=NEVER) == [first]
    assert ledger.park(fourth, owner, now=2.0, expires=NEVER) == [second]
    assert list(ledger.idle) == [third, fourth]


def test_park_only_looks_at_the_head_for_expiry() -> None:
    # O(1) per call: a later expired connection waits until it is the head.
    ledger = SocketLedger(max_connections=3, max_keepalive=3)
    owner = Owner("a")
    head, expired, new = Conn("head"), Conn("expired"), Conn("new")
    for _ in range(3):
        ledger.reserve()
    ledger.park(head, owner, now=0.0, expires=100.0)
    ledger.park(expired, owner, now=0.0, expires=1.0)
    assert ledger.park(new, owner, now=50.0, expires=NEVER) == []
    assert list(ledger.idle) == [head, expired, new]


def test_park_never_sweeps_the_connection_just_parked() -> None:
    ledger = SocketLedger(max_connections=1, max_keepalive=1)
    owner = Owner("a")
    conn = Conn("already-expired")
    ledger.reserve()
    assert ledger.park(conn, owner, now=10.0, expires=0.0) == []
    assert list(ledger.idle) == [conn] and owner.evicted_conns == []


def test_park_applies_the_keepalive_cap_then_the_expiry_sweep() -> None:
    ledger = SocketLedger(max_connections=3, max_keepalive=2)
    owner = Owner("a")
    first, second = opened_and_parked(ledger, owner, "first", "second", expires=1.0)
    third = Conn("third")
    ledger.reserve()
    assert ledger.park(third, owner, now=2.0, expires=NEVER) == [first, second]
    assert owner.evicted_conns == [first, second]
    assert list(ledger.idle) == [third]
    assert ledger.open == 1


# -- unpark --------------------------------------------------------------------


def test_unpark_takes_the_connection_out_of_idle_and_keeps_it_counted() -> None:
    ledger = SocketLedger(max_connections=2, max_keepalive=2)
    owner = Owner("a")
    first, second = opened_and_parked(ledger, owner, "first", "second", expires=1.0)
    ledger.unpark(first)
    assert list(ledger.idle) == [second]
    assert ledger.open == 2
    assert owner.evicted_conns == []


def test_an_unparked_connection_is_forgotten_by_the_expiry_sweep() -> None:
    ledger = SocketLedger(max_connections=3, max_keepalive=3)
    owner = Owner("a")
    (first,) = opened_and_parked(ledger, owner, "first", expires=1.0)
    ledger.unpark(first)
    later = Conn("later")
    ledger.reserve()
    assert ledger.park(later, owner, now=5.0, expires=NEVER) == []
    assert owner.evicted_conns == []


# -- retire / take_retired / closed ----------------------------------------------


def test_retired_connections_stay_counted_until_they_are_reported_closed() -> None:
    ledger = SocketLedger(max_connections=3, max_keepalive=3)
    owner = Owner("a")
    conns = opened_and_parked(ledger, owner, "c1", "c2")
    for conn in conns:
        ledger.unpark(conn)
    ledger.retire(conns)
    assert ledger.open == 2 and ledger.retired == conns
    taken = ledger.take_retired()
    assert taken == conns and ledger.retired == []
    assert ledger.open == 2, "uncounted before the socket was closed"
    ledger.closed(len(taken))
    assert ledger.open == 0


def test_take_retired_with_nothing_retired_returns_an_empty_list() -> None:
    ledger = SocketLedger(max_connections=1, max_keepalive=1)
    assert ledger.take_retired() == []
    assert ledger.open == 0


def test_retire_appends_to_connections_already_queued() -> None:
    ledger = SocketLedger(max_connections=3, max_keepalive=3)
    first, second = Conn("first"), Conn("second")
    ledger.retire([first])
    ledger.retire([second])
    assert ledger.take_retired() == [first, second]


def test_retired_connections_are_never_evicted_at_the_ceiling() -> None:
    ledger = SocketLedger(max_connections=1, max_keepalive=1)
    owner = Owner("a")
    (conn,) = opened_and_parked(ledger, owner, "retired")
    ledger.unpark(conn)
    ledger.retire([conn])
    assert ledger.reserve() == []
    assert owner.evicted_conns == []
    assert ledger.open == 2


def test_closed_uncounts_one_socket_by_default() -> None:
    ledger = SocketLedger(max_connections=3, max_keepalive=3)
    for _ in range(3):
        ledger.reserve()
    ledger.closed()
    assert ledger.open == 2
    ledger.closed(2)
    assert (ledger.open, ledger.opened) == (0, 3)


# -- compact -------------------------------------------------------------------


def test_compact_keeps_idle_connections_their_owners_order_and_expiry() -> None:
    ledger = SocketLedger(max_connections=5, max_keepalive=5)
    a, b = Owner("a"), Owner("b")
    conns = [Conn(f"c{i}") for i in range(4)]
    for _ in conns:
        ledger.reserve()
    for i, conn in enumerate(conns):
        ledger.park(conn, a if i % 2 else b, now=0.0, expires=1.0 if i == 1 else NEVER)
    ledger.unpark(conns[0])  # leaves a deleted slot behind in the dicts
    before = [(c, p.owner, p.origin, p.expires) for c, p in ledger.idle.items()]
    ledger.compact()
    assert [(c, p.owner, p.origin, p.expires) for c, p in ledger.idle.items()] == before
    assert ledger.open == 4
    # The expiry of conns[1], now the head, survived the rebuild.
    newest = Conn("newest")
    ledger.reserve()
    assert ledger.park(newest, a, now=2.0, expires=NEVER) == [conns[1]]
    # And the LRU order too.
    ledger.max_connections = ledger.open
    assert ledger.reserve() == [conns[2]]


# -- random sequences against a model ---------------------------------------------


class LedgerMachine(RuleBasedStateMachine):
    """Random reserve/park/unpark/close/retire/compact sequences against a list model.

    The model keeps idle connections in a plain list (least recently used
    first) and recomputes every decision of the ledger from the docstrings'
    rules: which connections ``reserve`` and ``park`` close, in what order,
    and which owner is told.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ledger = SocketLedger(1, 1)
        self.owners = [Owner("a"), Owner("b"), Owner("c")]
        self.model_idle: list[tuple[Conn, Owner, float]] = []
        self.model_active: list[Conn] = []
        self.model_retired: list[Conn] = []
        self.expected_evicted: dict[str, list[Conn]] = {o.key: [] for o in self.owners}
        self.now = 0.0
        self.reserves = 0

    @initialize(max_connections=st.integers(1, 6), max_keepalive=st.integers(0, 6))
    def configure(self, max_connections: int, max_keepalive: int) -> None:
        self.ledger = SocketLedger(max_connections, max_keepalive)

    def _evict_model_head(self) -> Conn:
        conn, owner, _ = self.model_idle.pop(0)
        self.expected_evicted[owner.key].append(conn)
        return conn

    @rule()
    def reserve(self) -> None:
        ledger = self.ledger
        open_before, idle_before = ledger.open, len(self.model_idle)
        expected = []
        open_now = open_before
        while open_now >= ledger.max_connections and self.model_idle:
            expected.append(self._evict_model_head())
            open_now -= 1
        assert ledger.reserve() == expected
        self.reserves += 1
        self.model_active.append(Conn(f"c{self.reserves}"))
        # G2: the new socket stays within the ceiling whenever enough idle
        # connections were there to make room; otherwise every one was closed.
        if idle_before >= open_before + 1 - ledger.max_connections:
            assert ledger.open <= ledger.max_connections
        else:
            assert not ledger.idle

    @precondition(lambda self: self.model_active)
    @rule(
        data=st.data(),
        owner=st.integers(0, 2),
        elapsed=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
        keepalive=st.sampled_from([0.0, 1.0, 2.0, NEVER]),
    )
    def park(self, data: st.DataObject, owner: int, elapsed: float, keepalive: float) -> None:
        i = data.draw(st.integers(0, len(self.model_active) - 1), label="active index")
        conn = self.model_active.pop(i)
        self.now += elapsed
        pool = self.owners[owner]
        expires = self.now + keepalive
        self.model_idle.append((conn, pool, expires))
        expected = []
        while len(self.model_idle) > self.ledger.max_keepalive:
            expected.append(self._evict_model_head())
        if self.model_idle:
            head, _, head_expires = self.model_idle[0]
            if head is not conn and head_expires <= self.now:
                expected.append(self._evict_model_head())
        assert self.ledger.park(conn, pool, self.now, expires) == expected

    @precondition(lambda self: self.model_idle)
    @rule(data=st.data())
    def unpark(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.model_idle) - 1), label="idle index")
        conn, _, _ = self.model_idle.pop(i)
        self.ledger.unpark(conn)
        self.model_active.append(conn)

    @precondition(lambda self: self.model_active)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.model_active) - 1), label="active index")
        self.model_active.pop(i)
        self.ledger.closed()

    @precondition(lambda self: self.model_idle)
    @rule(owner=st.integers(0, 2))
    def retire_owner(self, owner: int) -> None:
        pool = self.owners[owner]
        conns = [c for c, o, _ in self.model_idle if o is pool]
        self.model_idle = [entry for entry in self.model_idle if entry[1] is not pool]
        for conn in conns:
            self.ledger.unpark(conn)
        self.ledger.retire(conns)
        self.model_retired.extend(conns)

    @precondition(lambda self: self.model_retired)
    @rule()
    def close_retired(self) -> None:
        taken = self.ledger.take_retired()
        assert taken == self.model_retired
        self.model_retired = []
        self.ledger.closed(len(taken))

    @rule()
    def compact(self) -> None:
        self.ledger.compact()

    @invariant()
    def bookkeeping_matches_the_model(self) -> None:
        ledger = self.ledger
        assert owners(ledger) == [(c, o) for c, o, _ in self.model_idle]
        assert [p.expires for p in ledger.idle.values()] == [e for _, _, e in self.model_idle]
        assert ledger.retired == self.model_retired
        counted = len(self.model_active) + len(self.model_idle) + len(self.model_retired)
        assert ledger.open == counted
        assert ledger.opened == self.reserves
        for owner in self.owners:
            assert owner.evicted_conns == self.expected_evicted[owner.key]
        # The owners count evictions (PartitionPool.evicted), not the ledger.
        assert ledger.evictions == 0

    @invariant()
    def idle_stays_within_the_keepalive_cap(self) -> None:
        assert len(self.ledger.idle) <= self.ledger.max_keepalive


TestLedgerAgainstModel = LedgerMachine.TestCase

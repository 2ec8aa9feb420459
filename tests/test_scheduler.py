"""Unit tests of the admission scheduler: one behaviour each, plain calls, no clock.

``tests/properties/test_scheduler_machine.py`` drives the same object through
random interleavings against a reference model; these tests pin down each
rule by itself, so a regression names the rule it broke.
"""

from __future__ import annotations

import doctest

import pytest

from hostpool import _scheduler
from hostpool._scheduler import Lane, Scheduler, Status, Ticket

GRANTED = Status.GRANTED
WAITING = Status.WAITING
REJECTED = Status.REJECTED


def statuses(tickets: list[Ticket]) -> list[Status]:
    return [t.status for t in tickets]


def admit_n(s: Scheduler, lane: Lane, n: int) -> list[Ticket]:
    return [s.admit(lane) for _ in range(n)]


def assert_all_free(s: Scheduler, *lanes: Lane) -> None:
    """G7: nothing in flight, nobody waiting, every counter back to zero."""
    assert (s.in_flight, s.waiting, s.shared_used) == (0, 0, 0)
    assert s.shared_free == s.shared_total
    assert all(g.used == 0 and not g.waiting for g in s.groups())
    assert all(lane.idle for lane in lanes)
    assert s.budget_waiting() == []


# -- the docstring example ---------------------------------------------------------


def test_module_doctests_pass() -> None:
    result = doctest.testmod(_scheduler)
    assert result.attempted > 0
    assert result.failed == 0


def test_docstring_example_reserved_partition_passes_a_queued_one() -> None:
    s = Scheduler(budget=2, reservations={"a": 1})
    a = s.lane("a", "a", cap=2)
    b = s.lane("b", "<default>", cap=2)
    first_b, second_b, first_a = s.admit(b), s.admit(b), s.admit(a)
    assert statuses([first_b, second_b, first_a]) == [GRANTED, WAITING, GRANTED]


# -- construction ------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, -1])
def test_budget_below_one_is_rejected(budget: int) -> None:
    with pytest.raises(ValueError, match="budget must be >= 1"):
        Scheduler(budget, {})


def test_reservations_exceeding_the_budget_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"reservations \(5\) exceed the budget \(4\)"):
        Scheduler(4, {"a": 3, "b": 2})


def test_negative_reservation_is_rejected() -> None:
    # Accepted before: shared_total became budget + 1 and G1's budget broke.
    with pytest.raises(ValueError, match="reservation of 'a' must be >= 0"):
        Scheduler(1, {"a": -1})


def test_reservations_may_take_the_whole_budget() -> None:
    s = Scheduler(3, {"a": 2, "b": 1})
    assert s.shared_total == 0
    assert s.shared_free == 0


def test_shared_slots_are_the_budget_minus_reservations() -> None:
    s = Scheduler(10, {"a": 3, "*.example.com": 2, "idle": 0})
    assert s.shared_total == 5
    assert s.shared_free == 5


@pytest.mark.parametrize("cap", [0, -3])
def test_lane_cap_below_one_is_rejected(cap: int) -> None:
    s = Scheduler(2, {})
    with pytest.raises(ValueError, match="cap must be >= 1"):
        s.lane("a", "a", cap=cap)


def test_lane_of_an_unlisted_group_has_no_reservation() -> None:
    s = Scheduler(2, {"a": 1})
    lane = s.lane("b", "<default>", cap=1)
    assert lane.group.reserved == 0
    assert s.shared_total == 1


def test_lanes_naming_the_same_group_share_it() -> None:
    s = Scheduler(4, {"*.example.com": 2})
    one = s.lane("one.example.com", "*.example.com", cap=2)
    two = s.lane("two.example.com", "*.example.com", cap=2)
    assert one.group is two.group is s.group("*.example.com")
    assert [g.name for g in s.groups()] == ["*.example.com"]


def test_new_lane_is_idle() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=1)
    assert lane.idle
    assert (lane.in_flight, lane.waiting) == (0, 0)


# -- admission ---------------------------------------------------------------------


def test_request_is_granted_while_capacity_is_free() -> None:
    s = Scheduler(3, {})
    lane = s.lane("a", "a", cap=3)
    tickets = admit_n(s, lane, 3)
    assert statuses(tickets) == [GRANTED] * 3
    assert (lane.in_flight, s.in_flight, s.shared_used) == (3, 3, 3)
    assert not lane.idle


def test_partition_at_its_cap_queues_while_budget_is_free() -> None:
    s = Scheduler(10, {})
    lane = s.lane("a", "a", cap=2)
    tickets = admit_n(s, lane, 3)
    assert statuses(tickets) == [GRANTED, GRANTED, WAITING]
    assert s.shared_free == 8
    # At its cap a partition is not budget-waiting: freed budget is not for it.
    assert s.budget_waiting() == []


def test_unreserved_partition_waits_while_shared_slots_are_exhausted() -> None:
    s = Scheduler(2, {})
    a = s.lane("a", "a", cap=5)
    b = s.lane("b", "b", cap=5)
    admit_n(s, a, 2)
    assert s.admit(b).status is WAITING
    assert s.budget_waiting() == [b]


def test_reserved_partition_is_admitted_while_budget_is_exhausted() -> None:
    s = Scheduler(3, {"api": 1})
    api = s.lane("api", "api", cap=5)
    crawl = s.lane("crawl", "<default>", cap=10)
    assert statuses(admit_n(s, crawl, 3)) == [GRANTED, GRANTED, WAITING]
    assert s.admit(api).status is GRANTED


def test_reservation_is_held_for_its_group_alone() -> None:
    s = Scheduler(2, {"api": 1})
    s.lane("api", "api", cap=5)
    other = s.lane("other", "<default>", cap=5)
    assert statuses(admit_n(s, other, 2)) == [GRANTED, WAITING]


def test_reserved_partition_borrows_shared_slots_beyond_its_reservation() -> None:
    s = Scheduler(4, {"api": 1})
    api = s.lane("api", "api", cap=5)
    assert statuses(admit_n(s, api, 5)) == [GRANTED] * 4 + [WAITING]
    assert (api.group.used, s.shared_used, s.shared_free) == (4, 3, 0)


def test_reservation_of_wildcard_group_is_shared() -> None:
    s = Scheduler(3, {"*.example.com": 2})
    one = s.lane("one.example.com", "*.example.com", cap=5)
    two = s.lane("two.example.com", "*.example.com", cap=5)
    other = s.lane("other.org", "<default>", cap=5)
    assert s.admit(other).status is GRANTED  # the one shared slot
    assert s.admit(one).status is GRANTED  # first reserved slot of the group
    assert s.admit(two).status is GRANTED  # second reserved slot, same group
    assert s.admit(one).status is WAITING
    assert s.admit(two).status is WAITING
    assert one.group.used == 2
    assert s.shared_used == 1


def test_reservation_larger_than_a_cap_does_not_lift_the_cap() -> None:
    s = Scheduler(5, {"a": 4})
    lane = s.lane("a", "a", cap=2)
    assert statuses(admit_n(s, lane, 3)) == [GRANTED, GRANTED, WAITING]


# -- waiting, FIFO and no barging --------------------------------------------------


def test_newcomer_queues_behind_existing_waiter() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=1)
    holder, first, second = admit_n(s, lane, 3)
    assert statuses([first, second]) == [WAITING, WAITING]
    assert list(lane.queue) == [first, second]
    assert s.release(holder) is first
    assert s.release(first) is second


def test_release_hands_slot_to_waiter_not_newcomer() -> None:
    s = Scheduler(1, {})
    a = s.lane("a", "a", cap=1)
    b = s.lane("b", "b", cap=1)
    holder = s.admit(a)
    waiter = s.admit(b)
    woken = s.release(holder)
    assert woken is waiter
    assert waiter.status is GRANTED
    # The slot was handed over inside release(): a newcomer finds none.
    assert s.admit(a).status is WAITING
    assert s.admit(s.lane("c", "c", cap=1)).status is WAITING


def test_newcomer_is_not_granted_while_its_partition_has_waiters() -> None:
    s = Scheduler(10, {})
    lane = s.lane("a", "a", cap=1)
    holder, waiter = admit_n(s, lane, 2)
    s.release(holder)  # the waiter now holds the slot
    assert waiter.status is GRANTED
    assert s.admit(lane).status is WAITING


def test_waiters_are_served_fifo_within_a_partition() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=1)
    holder, *waiters = admit_n(s, lane, 5)
    woken = []
    ticket = holder
    while (nxt := s.release(ticket)) is not None:
        woken.append(nxt)
        ticket = nxt
    assert woken == waiters


def test_release_returns_none_and_frees_the_slot_when_nobody_waits() -> None:
    s = Scheduler(2, {})
    lane = s.lane("a", "a", cap=2)
    ticket = s.admit(lane)
    assert s.release(ticket) is None
    assert ticket.status is Status.RELEASED
    assert_all_free(s, lane)


def test_release_of_a_ticket_that_holds_no_slot_raises() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=1)
    holder, waiter = admit_n(s, lane, 2)
    with pytest.raises(RuntimeError, match="waiting"):
        s.release(waiter)
    s.release(holder)  # the waiter is granted: releasing it is fine now
    s.release(waiter)
    with pytest.raises(RuntimeError, match="released"):
        s.release(waiter)
    assert_all_free(s, lane)


def test_release_by_a_partition_at_its_cap_lets_its_own_waiter_in() -> None:
    s = Scheduler(10, {})
    lane = s.lane("a", "a", cap=1)
    holder, waiter = admit_n(s, lane, 2)
    assert s.release(holder) is waiter
    assert lane.in_flight == 1


def test_slot_freed_by_a_partition_at_its_cap_goes_to_the_longer_waiting_partition() -> None:
    s = Scheduler(2, {})
    a = s.lane("a", "a", cap=1)
    b = s.lane("b", "b", cap=5)
    a_holder, a_waiter = admit_n(s, a, 2)  # a is at its cap, not budget-waiting
    _, b_waiter = admit_n(s, b, 2)  # the budget is full: b is budget-waiting
    assert s.budget_waiting() == [b]
    # a drops below its cap and joins the ring behind b, which gets the slot.
    assert s.release(a_holder) is b_waiter
    assert a_waiter.status is WAITING
    assert s.budget_waiting() == [a]


# -- round robin -------------------------------------------------------------------


def test_round_robin_across_partitions() -> None:
    s = Scheduler(1, {})
    holder_lane = s.lane("h", "h", cap=1)
    # Caps above the budget: turns must rotate, not fall out of the caps.
    a = s.lane("a", "a", cap=5)
    b = s.lane("b", "b", cap=5)
    c = s.lane("c", "c", cap=5)
    ticket = s.admit(holder_lane)
    a_waiters = admit_n(s, a, 3)
    b_waiters = admit_n(s, b, 1)
    c_waiters = admit_n(s, c, 2)
    order = []
    while (nxt := s.release(ticket)) is not None:
        order.append(nxt.lane.key)
        ticket = nxt
    assert order == ["a", "b", "c", "a", "c", "a"]
    assert all(t.status is Status.RELEASED for t in a_waiters + b_waiters + c_waiters)


def test_partition_with_one_waiter_is_not_served_after_another_partitions_thousand() -> None:
    s = Scheduler(1, {})
    flood = s.lane("flood", "flood", cap=10)
    quiet = s.lane("quiet", "quiet", cap=10)
    ticket = s.admit(flood)
    admit_n(s, flood, 1000)
    lone = s.admit(quiet)
    first = s.release(ticket)
    assert first is not None and first.lane is flood
    assert s.release(first) is lone


def test_partition_that_stops_waiting_rejoins_the_ring_at_the_tail() -> None:
    s = Scheduler(1, {})
    holder_lane = s.lane("h", "h", cap=1)
    a = s.lane("a", "a", cap=1)
    b = s.lane("b", "b", cap=1)
    holder = s.admit(holder_lane)
    a_first = s.admit(a)
    s.admit(b)
    assert s.budget_waiting() == [a, b]
    s.cancel(a_first)  # a stops waiting ...
    s.admit(a)  # ... and starts again, behind b
    assert s.budget_waiting() == [b, a]
    woken = s.release(holder)
    assert woken is not None and woken.lane is b


def test_budget_waiting_lists_partitions_in_round_robin_order() -> None:
    s = Scheduler(1, {})
    holder_lane = s.lane("h", "h", cap=1)
    a = s.lane("a", "a", cap=1)
    b = s.lane("b", "b", cap=1)
    holder = s.admit(holder_lane)
    admit_n(s, a, 2)
    admit_n(s, b, 1)
    assert s.budget_waiting() == [a, b]
    woken = s.release(holder)
    assert woken is not None and woken.lane is a
    # a got its turn but stays at its cap of 1: it leaves the ring until it frees.
    assert s.budget_waiting() == [b]


# -- reservations and groups -------------------------------------------------------


def test_reserved_slot_freed_by_group_goes_to_group_waiter() -> None:
    s = Scheduler(2, {"*.example.com": 1})
    one = s.lane("one.example.com", "*.example.com", cap=1)
    two = s.lane("two.example.com", "*.example.com", cap=1)
    other = s.lane("other.org", "<default>", cap=1)
    reserved_holder = s.admit(one)  # the group's reserved slot
    s.admit(other)  # the shared slot
    other_waiter = s.admit(other)  # at its cap: not budget-waiting yet
    two_waiter = s.admit(two)  # group reservation and shared slots in use
    assert s.budget_waiting() == [two]
    assert s.release(reserved_holder) is two_waiter
    assert other_waiter.status is WAITING


def test_reserved_slot_goes_to_group_waiter_ahead_of_an_older_ring_head() -> None:
    s = Scheduler(3, {"*.example.com": 1})
    one = s.lane("one.example.com", "*.example.com", cap=1)
    two = s.lane("two.example.com", "*.example.com", cap=1)
    other = s.lane("other.org", "<default>", cap=5)
    reserved_holder = s.admit(one)
    admit_n(s, other, 2)  # both shared slots
    other_waiter = s.admit(other)  # other is budget-waiting first ...
    two_waiter = s.admit(two)  # ... two second
    assert s.budget_waiting() == [other, two]
    # The freed slot is the group's reserved one: only two may take it.
    assert s.release(reserved_holder) is two_waiter
    assert other_waiter.status is WAITING


def test_reserved_request_finishing_under_borrowed_ones_frees_a_shared_slot() -> None:
    s = Scheduler(2, {"api": 1})
    api = s.lane("api", "api", cap=5)
    other = s.lane("other", "<default>", cap=5)
    first_api, _ = admit_n(s, api, 2)  # one reserved, one shared
    other_waiter = s.admit(other)
    # No slot carries a label: api still holds 1 >= reserved, so the counts
    # say a shared slot is free and the waiter elsewhere gets it.
    assert s.release(first_api) is other_waiter
    assert (api.group.used, s.shared_used) == (1, 1)


def test_freed_reserved_slot_stays_idle_when_only_other_groups_wait() -> None:
    s = Scheduler(2, {"api": 1})
    api = s.lane("api", "api", cap=5)
    other = s.lane("other", "<default>", cap=5)
    api_ticket = s.admit(api)
    s.admit(other)
    other_waiter = s.admit(other)
    assert s.release(api_ticket) is None
    assert other_waiter.status is WAITING
    assert s.admit(api).status is GRANTED


def test_unreserved_partition_waits_when_reservations_take_the_whole_budget() -> None:
    s = Scheduler(1, {"api": 1})
    other = s.lane("other", "<default>", cap=5)
    waiter = s.admit(other)
    assert waiter.status is WAITING
    assert s.budget_waiting() == [other]


# -- max_pending -------------------------------------------------------------------


def test_overflow_past_max_pending_is_rejected_not_queued() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=1, max_pending=2)
    tickets = admit_n(s, lane, 4)
    assert statuses(tickets) == [GRANTED, WAITING, WAITING, REJECTED]
    assert lane.waiting == 2
    assert tickets[3] not in lane.queue
    assert s.waiting == 2


def test_max_pending_zero_rejects_when_no_slot() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=1, max_pending=0)
    assert statuses(admit_n(s, lane, 2)) == [GRANTED, REJECTED]
    assert s.waiting == 0


def test_max_pending_zero_still_grants_a_free_slot() -> None:
    s = Scheduler(2, {})
    lane = s.lane("a", "a", cap=2, max_pending=0)
    assert statuses(admit_n(s, lane, 2)) == [GRANTED, GRANTED]


def test_max_pending_counts_waiters_not_requests_in_flight() -> None:
    s = Scheduler(5, {})
    lane = s.lane("a", "a", cap=3, max_pending=1)
    assert statuses(admit_n(s, lane, 5)) == [GRANTED] * 3 + [WAITING, REJECTED]


def test_rejected_request_can_queue_again_once_a_waiter_leaves() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=1, max_pending=1)
    _, waiter, rejected = admit_n(s, lane, 3)
    assert rejected.status is REJECTED
    s.cancel(waiter)
    assert s.admit(lane).status is WAITING


def test_rejected_ticket_holds_nothing() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=1, max_pending=0)
    holder, rejected = admit_n(s, lane, 2)
    assert s.cancel(rejected) is None
    with pytest.raises(RuntimeError, match="rejected"):
        s.release(rejected)
    assert (s.in_flight, s.waiting, lane.in_flight) == (1, 0, 1)
    s.release(holder)
    assert_all_free(s, lane)


# -- cancellation ------------------------------------------------------------------


def test_cancel_of_a_waiter_removes_it_and_wakes_nobody() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=1)
    holder, first, second = admit_n(s, lane, 3)
    assert s.cancel(first) is None
    assert first.status is Status.CANCELLED
    assert list(lane.queue) == [second]
    assert s.waiting == 1
    assert s.release(holder) is second


def test_cancel_of_the_last_waiter_takes_the_partition_out_of_the_ring() -> None:
    s = Scheduler(1, {})
    a = s.lane("a", "a", cap=2)
    s.admit(a)
    waiter = s.admit(a)
    assert s.budget_waiting() == [a]
    s.cancel(waiter)
    assert s.budget_waiting() == []
    assert not a.group.waiting


def test_cancel_after_grant_releases_the_slot() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=1)
    holder, waiter = admit_n(s, lane, 2)
    assert s.cancel(holder) is waiter
    assert holder.status is Status.RELEASED
    assert waiter.status is GRANTED
    assert s.cancel(waiter) is None
    assert_all_free(s, lane)


def test_woken_waiter_cancelled_before_it_runs_passes_the_slot_on() -> None:
    s = Scheduler(1, {})
    a = s.lane("a", "a", cap=1)
    b = s.lane("b", "b", cap=1)
    holder = s.admit(a)
    woken_first = s.admit(b)
    next_in_line = s.admit(a)
    assert s.release(holder) is woken_first
    # Its task was cancelled before it noticed the grant: cancel releases it.
    assert s.cancel(woken_first) is next_in_line
    assert next_in_line.status is GRANTED
    assert (s.in_flight, s.waiting) == (1, 0)


def test_cancel_twice_is_a_no_op() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=1)
    holder, waiter = admit_n(s, lane, 2)
    s.cancel(waiter)
    assert s.cancel(waiter) is None
    assert s.cancel(holder) is None
    assert s.cancel(holder) is None
    assert_all_free(s, lane)


def test_cancel_after_release_is_a_no_op() -> None:
    s = Scheduler(2, {})
    lane = s.lane("a", "a", cap=2)
    done, running = admit_n(s, lane, 2)
    s.release(done)
    assert s.cancel(done) is None
    assert done.status is Status.RELEASED
    assert (s.in_flight, lane.in_flight) == (1, 1)
    s.release(running)


# -- drain -------------------------------------------------------------------------


def test_drain_cancels_all_waiters() -> None:
    s = Scheduler(1, {})
    a = s.lane("a", "a", cap=1)
    b = s.lane("b", "b", cap=1)
    holder = s.admit(a)
    a_waiters = admit_n(s, a, 2)
    b_waiters = admit_n(s, b, 2)
    drained = s.drain([a, b])
    assert drained == a_waiters + b_waiters
    assert all(t.status is Status.CANCELLED for t in drained)
    assert (s.waiting, a.waiting, b.waiting) == (0, 0, 0)
    assert s.budget_waiting() == []
    # Requests in flight are not the drain's business.
    assert holder.status is GRANTED
    assert s.release(holder) is None
    assert_all_free(s, a, b)


def test_drain_leaves_other_lanes_alone() -> None:
    s = Scheduler(1, {})
    a = s.lane("a", "a", cap=1)
    b = s.lane("b", "b", cap=1)
    holder = s.admit(a)
    s.admit(a)
    b_waiter = s.admit(b)
    assert len(s.drain([a])) == 1
    assert b_waiter.status is WAITING
    assert s.budget_waiting() == [b]
    assert s.release(holder) is b_waiter


def test_drain_of_lanes_without_waiters_returns_nothing() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=1)
    s.admit(lane)
    assert s.drain([lane]) == []
    assert s.drain([]) == []


# -- bookkeeping -------------------------------------------------------------------


def test_everything_returns_to_zero_when_all_requests_finish() -> None:
    s = Scheduler(4, {"api": 1, "*.example.com": 1})
    api = s.lane("api", "api", cap=3)
    one = s.lane("one.example.com", "*.example.com", cap=2)
    other = s.lane("other", "<default>", cap=4)
    tickets = admit_n(s, api, 4) + admit_n(s, one, 3) + admit_n(s, other, 3)
    running = [t for t in tickets if t.status is GRANTED]
    while running:
        woken = s.release(running.pop(0))
        if woken is not None:
            running.append(woken)
    assert all(t.status is Status.RELEASED for t in tickets)
    assert_all_free(s, api, one, other)


def test_payload_is_left_to_the_caller() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=1)
    holder, waiter = admit_n(s, lane, 2)
    marker = object()
    waiter.payload = marker
    s.release(holder)
    assert waiter.payload is marker


def test_reprs_name_the_partition_and_the_numbers() -> None:
    s = Scheduler(2, {"a": 1})
    lane = s.lane("a", "a", cap=1)
    ticket = s.admit(lane)
    s.admit(lane)
    assert repr(ticket) == "<Ticket 'a' granted>"
    assert repr(lane) == "<Lane 'a' 1/1 waiting=1>"
    assert repr(lane.group) == "<Group 'a' used=1/1>"


# -- interleavings the state machine probes (kept as plain regressions) ------------


def test_reserved_slots_of_a_group_go_round_robin_across_its_partitions() -> None:
    s = Scheduler(1, {"*.example.com": 1})
    one = s.lane("one.example.com", "*.example.com", cap=3)
    two = s.lane("two.example.com", "*.example.com", cap=3)
    holder, one_first, one_second = admit_n(s, one, 3)
    two_first = s.admit(two)
    assert list(one.group.waiting) == [one, two]
    assert s.release(holder) is one_first
    # one stays budget-waiting, but its group turn is over: two goes next.
    assert list(one.group.waiting) == [two, one]
    assert s.release(one_first) is two_first
    assert s.release(two_first) is one_second


def test_reserved_admission_does_not_cost_a_partition_its_shared_turn() -> None:
    s = Scheduler(2, {"api": 1})
    api = s.lane("api", "api", cap=3)
    other = s.lane("other", "<default>", cap=3)
    api_reserved = s.admit(api)
    other_shared = s.admit(other)
    api_second, api_third = admit_n(s, api, 2)
    other_second = s.admit(other)
    assert s.budget_waiting() == [api, other]
    assert s.release(api_reserved) is api_second  # the group's reserved slot
    assert s.budget_waiting() == [api, other]  # api keeps its place in the ring
    assert s.release(other_shared) is api_third  # the shared slot: api's turn
    assert other_second.status is WAITING
    assert s.budget_waiting() == [other]


def test_drained_lane_below_its_cap_leaves_the_ring() -> None:
    s = Scheduler(1, {})
    lane = s.lane("a", "a", cap=2)
    holder = s.admit(lane)
    s.admit(lane)
    assert s.budget_waiting() == [lane]
    s.drain([lane])
    assert s.budget_waiting() == []
    assert not lane.group.waiting
    assert s.release(holder) is None
    assert_all_free(s, lane)


def test_drain_of_a_lane_at_its_cap_keeps_its_requests_in_flight() -> None:
    s = Scheduler(4, {})
    lane = s.lane("a", "a", cap=1)
    holder, waiter = admit_n(s, lane, 2)
    assert s.drain([lane]) == [waiter]
    assert lane.in_flight == 1
    assert s.release(holder) is None


def test_recreated_lane_of_an_idle_partition_starts_fresh() -> None:
    s = Scheduler(1, {"api": 1})
    old = s.lane("api", "api", cap=1)
    finished = s.admit(old)
    s.release(finished)
    new = s.lane("api", "api", cap=1)  # the idle partition was dropped
    assert new.group is old.group
    ticket = s.admit(new)
    assert ticket.status is GRANTED
    assert s.cancel(finished) is None  # an old ticket no longer matters
    s.release(ticket)
    assert_all_free(s, old, new)


def test_release_then_cancel_of_the_woken_ticket_in_a_chain_frees_everything() -> None:
    s = Scheduler(2, {"a": 1})
    a = s.lane("a", "a", cap=1)
    b = s.lane("b", "<default>", cap=2)
    a_holder, a_waiter = admit_n(s, a, 2)
    b_holder, b_waiter = admit_n(s, b, 2)
    # Every grant handed over by a release is cancelled before it runs.
    assert s.release(a_holder) is a_waiter
    assert s.cancel(a_waiter) is None
    assert s.release(b_holder) is b_waiter
    assert s.cancel(b_waiter) is None
    assert_all_free(s, a, b)


def test_negative_max_pending_is_rejected() -> None:
    s = Scheduler(budget=1, reservations={})
    with pytest.raises(ValueError, match="max_pending must be >= 0"):
        s.lane("a", "a", cap=1, max_pending=-1)


def test_drain_lists_each_waiter_once_even_if_a_lane_is_given_twice() -> None:
    s = Scheduler(budget=1, reservations={})
    lane = s.lane("a", "a", cap=1)
    s.admit(lane)
    waiter = s.admit(lane)
    assert s.drain([lane, lane]) == [waiter]

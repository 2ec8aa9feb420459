"""Scenario 4: the admission scheduler alone. Cost of admit + release.

Drives ``hostpool._scheduler.Scheduler`` directly (no event loop, no I/O) at
1, 100, 10,000 partitions and 0, 100, 10,000 waiters. One *cycle* is what one
request costs the scheduler in steady state: one ``admit`` and one
``release``. Three shapes:

- ``grant`` (0 waiters): the admit is granted at once; the release wakes
  nobody. Cycles go round the partitions.
- ``budget``: the router budget (100) is used up, the waiters sit in the
  round-robin ring across partitions. Each cycle admits a newcomer (it waits)
  and releases the oldest request (which hands its slot to the head of the
  ring): the waiter count stays put.
- ``cap``: every partition is at its own cap (1); the waiters queue per
  partition. Each cycle admits to one partition and releases its request,
  which hands the slot to that partition's oldest waiter.

Timed in batches with ``time.perf_counter_ns``, the batches of all cells
interleaved; each cell reports the median and the best batch, in ns per
cycle, loop overhead included (reported separately).
"""

from __future__ import annotations

import collections
import time
from typing import Any

from hostpool._scheduler import Lane, Scheduler, Status, Ticket

from ._common import Settings, median, write_result

__all__ = ["run"]

_GROUP = "<default>"
_BUDGET = 100
_HUGE = 1_000_000_000


def _grant_cycles(partitions: int, cycles: int) -> int:
    s = Scheduler(_HUGE, {})
    lanes = [s.lane(f"p{i}", _GROUP, cap=_HUGE) for i in range(partitions)]
    admit, release = s.admit, s.release
    order = [lanes[i % partitions] for i in range(cycles)]
    start = time.perf_counter_ns()
    for lane in order:
        release(admit(lane))
    return time.perf_counter_ns() - start


def _budget_setup(partitions: int, waiters: int) -> tuple[Scheduler, list[Lane], Any]:
    s = Scheduler(_BUDGET, {})
    lanes = [s.lane(f"p{i}", _GROUP, cap=_HUGE) for i in range(partitions)]
    granted: collections.deque[Ticket] = collections.deque()
    for i in range(_BUDGET):
        ticket = s.admit(lanes[i % partitions])
        assert ticket.status is Status.GRANTED
        granted.append(ticket)
    for i in range(waiters):
        assert s.admit(lanes[i % partitions]).status is Status.WAITING
    return s, lanes, granted


def _budget_cycles(partitions: int, waiters: int, cycles: int) -> int:
    s, lanes, granted = _budget_setup(partitions, waiters)
    admit, release = s.admit, s.release
    popleft, append = granted.popleft, granted.append
    order = [lanes[i % partitions] for i in range(cycles)]
    start = time.perf_counter_ns()
    for lane in order:
        admit(lane)
        append(release(popleft()))
    elapsed = time.perf_counter_ns() - start
    assert s.waiting == waiters
    assert s.in_flight == _BUDGET
    return elapsed


def _cap_cycles(partitions: int, waiters: int, cycles: int) -> int:
    s = Scheduler(_HUGE, {})
    lanes = [s.lane(f"p{i}", _GROUP, cap=1) for i in range(partitions)]
    held: list[Ticket] = [s.admit(lane) for lane in lanes]
    for i in range(waiters):
        assert s.admit(lanes[i % partitions]).status is Status.WAITING
    admit, release = s.admit, s.release
    order = [i % partitions for i in range(cycles)]
    start = time.perf_counter_ns()
    for i in order:
        admit(lanes[i])
        held[i] = release(held[i])  # type: ignore[assignment]
    elapsed = time.perf_counter_ns() - start
    assert s.waiting == waiters
    assert s.in_flight == partitions
    return elapsed


def _empty_loop(cycles: int) -> int:
    order = list(range(cycles))
    start = time.perf_counter_ns()
    for _ in order:
        pass
    return time.perf_counter_ns() - start


def _one_batch(shape: str, partitions: int, waiters: int, cycles: int) -> float:
    """Return ns per admit+release cycle over one batch of ``cycles``."""
    if shape == "grant":
        ns = _grant_cycles(partitions, cycles)
    elif shape == "budget":
        ns = _budget_cycles(partitions, waiters, cycles)
    else:
        ns = _cap_cycles(partitions, waiters, cycles)
    return ns / cycles


async def run(settings: Settings, upstream: object, log: Any) -> dict[str, Any]:
    shapes = [("grant", 0)] + [
        (shape, w) for shape in ("budget", "cap") for w in settings.sched_waiters if w > 0
    ]
    cells: list[dict[str, Any]] = [
        {"shape": shape, "partitions": p, "waiters": w, "ns_per_cycle": []}
        for shape, w in shapes
        for p in settings.sched_partitions
    ]
    # Batches go round the cells (A B C ... A B C ...), so drifts in the
    # machine's speed touch every cell alike.
    for _ in range(settings.sched_batches):
        for cell in cells:
            cell["ns_per_cycle"].append(
                _one_batch(
                    cell["shape"], cell["partitions"], cell["waiters"], settings.sched_cycles
                )
            )
    for cell in cells:
        cell["median_ns"] = median(cell["ns_per_cycle"])
        cell["min_ns"] = min(cell["ns_per_cycle"])
        log(
            f"scheduler {cell['shape']:<6} P={cell['partitions']:<6} W={cell['waiters']:<6} "
            f"{cell['median_ns']:8.0f} ns per admit+release (min {cell['min_ns']:.0f})"
        )
    loop_ns = median([_empty_loop(settings.sched_cycles) / settings.sched_cycles for _ in range(5)])
    data = {"cells": cells, "loop_overhead_ns": loop_ns, "targets": targets(cells)}
    write_result(settings, "scheduler", data)
    return data


def targets(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The cost target on medians; independence on best-of-batches.

    Noise from other processes only ever adds time, so the fastest batch of
    a cell is its most faithful figure (``timeit`` reasons the same way);
    comparing medians across cells would compare the neighbours' load.
    """
    worst = max(c["median_ns"] for c in cells)
    spreads = {}
    for shape in sorted({c["shape"] for c in cells}):
        values = [c["min_ns"] for c in cells if c["shape"] == shape]
        spreads[shape] = max(values) / min(values)
    worst_spread = max(spreads.values())
    return {
        "max_cost": {
            "value": worst / 1000,
            "target": "median <= 5 us in every cell",
            "met": worst <= 5000,
        },
        "independent_of_counts": {
            "value": spreads,
            "target": "best-of-batches max/min within each shape <= 1.5",
            "met": worst_spread <= 1.5,
        },
    }

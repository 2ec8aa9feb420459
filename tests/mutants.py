"""Mutants: small guarantee-breaking edits to hostpool, each of which the suite must catch.

A test earns its place by failing when the thing it names breaks. Each
mutant below breaks one guarantee of the README's table on purpose; this
script applies it to a temporary copy of the repository, runs the tests
that should catch it, and reports which test failed first and how long it
took. A mutant that survives (every test passes) is a hole in the suite.

    python tests/mutants.py              # every mutant (about 4 minutes on 2 cores)
    python tests/mutants.py --fast       # the scheduler's (seconds each): CI runs these
    python tests/mutants.py --only fifo,cap
    python tests/mutants.py --list

Exit status 1 if any mutant survives, or if a mutant no longer applies
(its ``old`` text is gone from the source: update the mutant with the code).
Run all of them before resolving any issue that touches admission, the
pools or the ledger; add one for each new guarantee.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCHEDULER_TESTS = ["tests/test_scheduler.py", "tests/properties/test_scheduler_machine.py"]
LIMITS_TESTS = ["tests/test_limits.py", "tests/integration/test_upstream_limits.py"]
FLEET_TESTS = ["tests/integration/test_fleet.py"]
HTTP11_TESTS = [
    "tests/differential/test_request_heads.py",
    "tests/differential/test_http11_differential.py",
]
LOOPBACK_TESTS = [
    "tests/test_ledger.py",
    "tests/test_pool.py",
    "tests/test_admission.py",
    "tests/integration/test_router_loopback.py",
    "tests/integration/test_faults.py",
    "tests/integration/test_peer_regressions.py",
    "tests/properties/test_router_sockets.py",
]


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One deliberate bug: ``edits`` are (file, old, new) replacements, each applied once."""

    name: str
    guarantee: str
    what: str
    edits: tuple[tuple[str, str, str], ...]
    tests: tuple[str, ...]
    fast: bool = False


def _scheduler(name: str, guarantee: str, what: str, old: str, new: str) -> Mutant:
    edit = ("hostpool/_scheduler.py", old, new)
    return Mutant(name, guarantee, what, (edit,), tuple(SCHEDULER_TESTS), fast=True)


def _loopback(name: str, guarantee: str, what: str, *edits: tuple[str, str, str]) -> Mutant:
    return Mutant(name, guarantee, what, edits, tuple(LOOPBACK_TESTS))


def _limits(name: str, guarantee: str, what: str, *edits: tuple[str, str, str]) -> Mutant:
    return Mutant(name, guarantee, what, edits, tuple(LIMITS_TESTS))


def _http11(name: str, guarantee: str, what: str, *edits: tuple[str, str, str]) -> Mutant:
    return Mutant(name, guarantee, what, edits, tuple(HTTP11_TESTS))


def _fleet(name: str, guarantee: str, what: str, *edits: tuple[str, str, str]) -> Mutant:
    return Mutant(name, guarantee, what, edits, tuple(FLEET_TESTS))


MUTANTS: list[Mutant] = [
    _scheduler(
        "cap",
        "G1",
        "a partition may go one over its cap",
        "if not lane.queue and lane.in_flight < lane.cap:",
        "if not lane.queue and lane.in_flight <= lane.cap:",
    ),
    _scheduler(
        "budget",
        "G1",
        "one shared slot more than the budget",
        "if group.used < group.reserved or self.shared_used < self.shared_total:",
        "if group.used < group.reserved or self.shared_used <= self.shared_total:",
    ),
    _scheduler(
        "reservation",
        "G3",
        "reservations ignored at admission",
        "if group.used < group.reserved or self.shared_used < self.shared_total:",
        "if self.shared_used < self.shared_total:",
    ),
    _scheduler(
        "round-robin",
        "G5",
        "the ring's head is never rotated",
        "            nxt = next(iter(self._ring))\n            self._ring.move_to_end(nxt)\n",
        "            nxt = next(iter(self._ring))\n",
    ),
    _scheduler(
        "fifo",
        "G5",
        "the newest waiter of a partition is served first",
        "        ticket = next(iter(lane.queue))\n        del lane.queue[ticket]",
        "        ticket = next(reversed(lane.queue))\n        del lane.queue[ticket]",
    ),
    _scheduler(
        "work-conservation",
        "G4",
        "the last free shared slot is not handed to a waiter",
        "if self.shared_used < self.shared_total and self._ring:",
        "if self.shared_used < self.shared_total - 1 and self._ring:",
    ),
    _scheduler(
        "last-shared-slot",
        "G4",
        "a newcomer never gets the last free shared slot",
        "if group.used < group.reserved or self.shared_used < self.shared_total:",
        "if group.used < group.reserved or self.shared_used + 1 < self.shared_total:",
    ),
    _scheduler(
        "max-pending",
        "G6",
        "one waiter more than max_pending",
        "len(lane.queue) >= lane.max_pending",
        "len(lane.queue) > lane.max_pending",
    ),
    _scheduler(
        "shared-release",
        "G4",
        "a release frees a shared slot it never held",
        "        if group.used >= group.reserved:\n            self.shared_used -= 1",
        "        if group.used >= group.reserved - 1:\n            self.shared_used -= 1",
    ),
    _scheduler(
        "cancel-waiter",
        "G6",
        "a cancelled waiter stays in its partition's queue",
        "            del lane.queue[ticket]\n            if not lane.queue:\n"
        "                lane.queue = _NO_QUEUE\n            self.waiting -= 1\n"
        "            ticket.status = Status.CANCELLED",
        "            self.waiting -= 1\n            ticket.status = Status.CANCELLED",
    ),
    _loopback(
        "granted-cancelled",
        "G7",
        "a waiter granted a slot, then cancelled, keeps the slot",
        (
            "hostpool/_admission.py",
            "        woken = self.scheduler.cancel(ticket)\n        if woken is not None:",
            "        woken = None\n"
            "        if ticket.status is Status.WAITING:\n"
            "            woken = self.scheduler.cancel(ticket)\n"
            "        if woken is not None:",
        ),
    ),
    _loopback(
        "release-on-error",
        "G7",
        "a request that fails while sending keeps its slot",
        (
            "hostpool/_transport.py",
            "            admission.release(ticket, failed=True)\n            raise\n",
            "            raise\n",
        ),
    ),
    _loopback(
        "slot-before-connection",
        "G2",
        "a body releases its slot before its connection is back in the pool",
        (
            "hostpool/_pool.py",
            "        if slots is not None:\n            slots.open_bodies.discard(self)\n",
            "        if slots is not None:\n            slots.open_bodies.discard(self)\n"
            "            if self._ticket is not None:\n"
            "                slots.release(self._ticket, failed=failed)\n"
            "                self._ticket = None\n",
        ),
    ),
    _loopback(
        "ledger-decrement",
        "G2",
        "closing a socket never uncounts it",
        ("hostpool/_ledger.py", "        self.open -= count", "        self.open -= 0"),
    ),
    _loopback(
        "lru",
        "G2",
        "at the ceiling the most recently used idle socket is closed",
        (
            "hostpool/_ledger.py",
            "while self.open >= self.max_connections and self.idle:\n"
            "            conn, parked = self.idle.popitem(last=False)",
            "while self.open >= self.max_connections and self.idle:\n"
            "            conn, parked = self.idle.popitem(last=True)",
        ),
    ),
    _loopback(
        "socket-ceiling",
        "G2",
        "one socket over the budget before evicting",
        (
            "hostpool/_ledger.py",
            "while self.open >= self.max_connections and self.idle:",
            "while self.open > self.max_connections and self.idle:",
        ),
    ),
    _loopback(
        "keepalive-total",
        "G2",
        "one idle socket over max_keepalive_connections",
        (
            "hostpool/_ledger.py",
            "while len(self.idle) > self.max_keepalive:",
            "while len(self.idle) > self.max_keepalive + 1:",
        ),
    ),
    _loopback(
        "keepalive-partition",
        "G2",
        "one idle socket over a quota's keepalive",
        (
            "hostpool/_pool.py",
            "while self._idle_count > self._keepalive:",
            "while self._idle_count > self._keepalive + 1:",
        ),
    ),
    _loopback(
        "busy-idle-clock",
        "G9",
        "a partition's idle clock starts while a request is still in flight",
        (
            "hostpool/_admission.py",
            "            partition.lane.idle\n            and partition.quiet_since is None",
            "            not partition.lane.queue\n            and partition.quiet_since is None",
        ),
        ("hostpool/_admission.py", "        assert partition.lane.idle\n", ""),
    ),
    _loopback(
        "quota-pool-timeout",
        "G6",
        "a quota's pool_timeout is ignored",
        (
            "hostpool/_admission.py",
            "patience = quota.pool_timeout",
            "patience = None",
        ),
    ),
    _loopback(
        "deadline-late",
        "G6",
        "waiters time out four times too late",
        (
            "hostpool/_admission.py",
            "deadline = math.inf if patience is None else start + patience",
            "deadline = math.inf if patience is None else start + patience * 4",
        ),
        (
            "hostpool/_admission.py",
            "loop.call_at(start + patience, self.wake, future)",
            "loop.call_at(start + patience * 4, self.wake, future)",
        ),
    ),
    _loopback(
        "deadline-trio",
        "G6",
        "waiters never time out under trio (anyio's path)",
        (
            "hostpool/_admission.py",
            "deadline = math.inf if patience is None else start + patience",
            "deadline = math.inf",
        ),
    ),
    _loopback(
        "deadline-asyncio",
        "G6",
        "waiters never time out under asyncio (the future's path)",
        (
            "hostpool/_admission.py",
            "timer = None if patience is None else loop.call_at("
            "start + patience, self.wake, future)",
            "timer = None",
        ),
    ),
    _limits(
        "rate-burst",
        "G10",
        "the rate lets one more request than the burst through back to back",
        (
            "hostpool/_limits.py",
            "self.tolerance = (rate.burst_size - 1) * self.interval",
            "self.tolerance = rate.burst_size * self.interval",
        ),
    ),
    _limits(
        "rate-skipped",
        "G10",
        "the local rate is never applied",
        (
            "hostpool/_admission.py",
            "await self._take_start(partition, bucket, deadline, patience)",
            "pass",
        ),
    ),
    _limits(
        "pause-ignored",
        "G11",
        "a 429/503 with Retry-After pauses nothing",
        (
            "hostpool/_transport.py",
            "if (status == 429 or status == 503) and",
            "if status == -1 and",
        ),
    ),
    _limits(
        "pause-shortened",
        "G11",
        "a later, shorter Retry-After cuts a pause short",
        (
            "hostpool/_admission.py",
            "if until <= partition.paused_until:",
            "if until == partition.paused_until:",
        ),
    ),
    _limits(
        "sweep-forgets",
        "G10",
        "an idle partition is dropped with its rate's debt and its pause (under its waiters)",
        ("hostpool/_admission.py", "if remembered > now:", "if False:"),
    ),
    _limits(
        "close-sleepers",
        "G11",
        "closing the router leaves requests asleep in a pause or a rate wait",
        (
            "hostpool/_admission.py",
            "        for scope in list(self._sleepers):\n            scope.cancel()\n",
            "",
        ),
    ),
    _http11(
        "http11-keep-alive",
        "H1",
        "the fast HTTP/1.1 path reuses connections the response said to close",
        ("hostpool/_http11.py", "self.keep_alive = self._persistent()", "self.keep_alive = True"),
    ),
    _http11(
        "http11-head-body",
        "H1",
        "a response to HEAD is read as if it had a body",
        (
            "hostpool/_http11.py",
            'exchange = _Exchange(method == b"HEAD")',
            "exchange = _Exchange(False)",
        ),
    ),
    _http11(
        "http11-short-body",
        "H1",
        "a body cut short by the server's close counts as complete",
        (
            "hostpool/_http11.py",
            "        if exchange.headers_done and exchange.framing_ends_with_close():",
            "        if exchange.headers_done:",
        ),
    ),
    _http11(
        "http11-cl-conflict",
        "H1",
        "a request with two different Content-Lengths is sent (request smuggling)",
        ("hostpool/_http11.py", "elif value != seen_length:", "elif False:"),
    ),
    _http11(
        "http11-injection",
        "H1",
        "a header value holding CRLF + a header of its own is sent as two headers",
        ("hostpool/_http11.py", 'head.count(b"\\n") != lines + 2 or ', ""),
    ),
    Mutant(
        "http11-parser-cycle",
        "H1",
        "each response's parser and its callbacks stay a reference cycle (left to the GC)",
        (("hostpool/_http11.py", "        self.parser = None\n", "        pass\n"),),
        ("tests/integration/test_router_loopback.py",),
    ),
    _fleet(
        "fleet-cap",
        "G12",
        "the fleet admits one request over its cap",
        (
            "hostpool/redis/_store.py",
            "local free = cap - redis.call('ZCARD', KEYS[1])",
            "local free = cap + 1 - redis.call('ZCARD', KEYS[1])",
        ),
    ),
    _fleet(
        "fleet-renew",
        "G12",
        "held leases are never renewed, so they expire under running requests",
        (
            "hostpool/redis/_store.py",
            "redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])",
            "redis.call('ZSCORE', KEYS[1], ARGV[i])",
        ),
    ),
    _fleet(
        "fleet-revive",
        "G12",
        "a renewal revives an expired lease (someone else may hold its slot)",
        (
            "hostpool/redis/_store.py",
            "if score and tonumber(score) > now then",
            "if score then",
        ),
    ),
    _fleet(
        "fleet-release",
        "G12",
        "a finished request keeps its lease until it expires",
        ("hostpool/_fleet.py", "self._give_back(*held)", "pass"),
    ),
    _fleet(
        "fleet-cancel",
        "G12",
        "an acquire cancelled mid round trip never gives its lease back",
        (
            "hostpool/_fleet.py",
            "                self._give_back(key, lease)\n"
            "                self._recheck.append((key, lease))",
            "                pass",
        ),
    ),
    _fleet(
        "fleet-pause",
        "G12",
        "a Retry-After pause is not shared with the fleet",
        ("hostpool/_admission.py", "fleet.share_pause(partition.key, seconds)", "pass"),
    ),
    _fleet(
        "fleet-many-heads",
        "G12",
        "requests that asked together each become the head of a line of their own",
        (
            "hostpool/_fleet.py",
            "            line = self._lines.get(partition.key)\n"
            "            if line is None:\n"
            "                line = self._lines[partition.key] = _Line()\n"
            "        else:",
            "            line = self._lines[partition.key] = _Line()\n        else:",
        ),
    ),
    _fleet(
        "fleet-queue-off",
        "G12",
        "a free lease goes to whichever router asks first, not to the longest waiting",
        (
            "hostpool/redis/_store.py",
            "if rank >= free then",
            "if free <= 0 then",
        ),
    ),
    _fleet(
        "fleet-no-fallback",
        "G12",
        "with Redis unavailable, on_unavailable='local' fails requests",
        (
            "hostpool/_fleet.py",
            'if store.on_unavailable == "fail":',
            "if True:",
        ),
    ),
]


@dataclasses.dataclass
class Outcome:
    mutant: Mutant
    killed: bool
    by: str
    seconds: float


def _copy_tree(destination: Path) -> None:
    for name in ("hostpool", "tests"):
        shutil.copytree(
            ROOT / name,
            destination / name,
            ignore=shutil.ignore_patterns("__pycache__", ".hypothesis", "conformance"),
        )
    shutil.copy2(ROOT / "pyproject.toml", destination / "pyproject.toml")


def _apply(mutant: Mutant, tree: Path) -> None:
    for relative, old, new in mutant.edits:
        path = tree / relative
        source = path.read_text()
        count = source.count(old)
        if count != 1:
            raise SystemExit(
                f"mutant {mutant.name!r} no longer applies: {count} matches of its text "
                f"in {relative} (expected 1); update it with the code"
            )
        path.write_text(source.replace(old, new))


_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def _run(mutant: Mutant, timeout: float) -> Outcome:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        _apply(mutant, tree)
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
        check = subprocess.run(
            [sys.executable, "-c", "import hostpool; print(hostpool.__file__)"],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        if not check.stdout.strip().startswith(str(tree)):
            raise SystemExit(f"the mutated copy is not the one imported: {check.stdout}")
        started = time.monotonic()
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        try:
            result = subprocess.run(
                [*command, "--timeout", "30", *mutant.tests],
                cwd=tree,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return Outcome(
                mutant, True, "(the run hung past its bound)", time.monotonic() - started
            )
        seconds = time.monotonic() - started
    if result.returncode == 0:
        return Outcome(mutant, False, "-", seconds)
    found = _FAILED.search(result.stdout)
    if found:
        by = found.group(2).split(" - ")[0]
    else:
        tail = (result.stdout + result.stderr).strip().splitlines()[-1:]
        by = tail[0] if tail else f"exit {result.returncode}"
    return Outcome(mutant, True, by, seconds)


def _markdown(outcomes: list[Outcome]) -> str:
    lines = [
        "# Mutants: the latest run of `python tests/mutants.py`",
        "",
        "Each row is a deliberate bug applied to a copy of the repository, and the",
        "first test that failed because of it (`-x`; the test files run in the",
        "order of `tests/mutants.py`).",
        "",
        "| mutant | guarantee | the bug | result | seconds | killed by |",
        "|---|---|---|---|---:|---|",
    ]
    for o in outcomes:
        verdict = "killed" if o.killed else "**survived**"
        m = o.mutant
        lines.append(
            f"| `{m.name}` | {m.guarantee} | {m.what} | {verdict} | {o.seconds:.1f} | `{o.by}` |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="only the scheduler's mutants")
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--check", action="store_true", help="only check that every mutant still applies"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="bound per mutant (s)")
    parser.add_argument("--out", type=Path, help="also write the table here, as Markdown")
    args = parser.parse_args(argv)
    chosen = MUTANTS
    if args.fast:
        chosen = [m for m in chosen if m.fast]
    if args.only:
        names = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = names - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"unknown mutants: {sorted(unknown)}")
        chosen = [m for m in chosen if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:22} {m.guarantee:4} {m.what}")
        return 0
    if args.check:
        with tempfile.TemporaryDirectory(prefix="mutants-check-") as tmp:
            for m in chosen:
                tree = Path(tmp) / m.name
                for relative, _, _ in m.edits:
                    (tree / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / relative, tree / relative)
                _apply(m, tree)
        print(f"all {len(chosen)} mutants apply")
        return 0
    outcomes: list[Outcome] = []
    print(f"{'mutant':22} {'G':4} {'result':9} {'seconds':>7}  killed by")
    for mutant in chosen:
        outcome = _run(mutant, args.timeout)
        outcomes.append(outcome)
        verdict = "killed" if outcome.killed else "SURVIVED"
        row = f"{mutant.name:22} {mutant.guarantee:4} {verdict:9} {outcome.seconds:7.1f}"
        print(f"{row}  {outcome.by}", flush=True)
    survivors = [o.mutant.name for o in outcomes if not o.killed]
    print(f"{len(outcomes) - len(survivors)} killed, {len(survivors)} survived")
    if args.out is not None:
        args.out.write_text(_markdown(outcomes))
    if survivors:
        print("survivors: " + ", ".join(survivors))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The socket ledger: socket accounting across every partition pool of a router.

Pure bookkeeping (no I/O, no awaits): the pools report sockets opened,
parked idle, taken back and closed; the ledger says which idle sockets must
be closed to keep G2, the socket ceiling::

    open sockets (active + idle + connecting + queued for closing) <= max_connections
    idle sockets <= max_keepalive overall

A socket is counted from the moment a pool decides to open it until a pool
has closed it (or is about to close it, in the same task, before it opens the
socket it made room for).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Protocol

from httpcore import AsyncConnectionInterface

__all__ = ["Parked", "SocketLedger"]

logger = logging.getLogger("hostpool")


class _Owner(Protocol):
    """The pool an idle connection belongs to."""

    key: str

    def evicted(self, conn: AsyncConnectionInterface, origin: object) -> None:
        """Forget an idle connection (of ``origin``) that the ledger is closing."""


class Parked:
    """What the ledger knows of one idle connection: whose, its origin, since and until when."""

    __slots__ = ("expires", "origin", "owner", "since")

    def __init__(self, owner: _Owner, origin: object, since: float, expires: float) -> None:
        self.owner = owner
        self.origin = origin
        self.since = since
        self.expires = expires

    def __repr__(self) -> str:
        return f"<Parked {self.owner.key!r} {self.origin!r} until {self.expires:.3f}>"


class SocketLedger:
    """Socket accounting across every partition pool of one router (G2)."""

    def __init__(self, max_connections: int, max_keepalive: int) -> None:
        self.max_connections = max_connections
        self.max_keepalive = max_keepalive
        self.open = 0
        self.opened = 0
        self.evictions = 0
        # Every idle connection of every partition, least recently used
        # first: the one table of idle connections (a pool keeps only its
        # per-origin stacks for checkout, changed with this table, never apart).
        self.idle: OrderedDict[AsyncConnectionInterface, Parked] = OrderedDict()
        # Idle connections of dropped partitions, still counted, to be closed.
        self.retired: list[AsyncConnectionInterface] = []

    def reserve(self) -> list[AsyncConnectionInterface]:
        """Count a socket about to be opened; return idle ones to close to make room."""
        evicted: list[AsyncConnectionInterface] = []
        while self.open >= self.max_connections and self.idle:
            conn, parked = self.idle.popitem(last=False)
            parked.owner.evicted(conn, parked.origin)
            self.open -= 1
            evicted.append(conn)
            logger.debug(
                "%s: idle socket closed to stay within max_connections=%d",
                parked.owner.key,
                self.max_connections,
            )
        self.open += 1
        self.opened += 1
        return evicted

    def park(
        self,
        conn: AsyncConnectionInterface,
        pool: _Owner,
        now: float,
        expires: float,
        origin: object = None,
    ) -> list[AsyncConnectionInterface]:
        """Record ``conn`` (of ``pool``, for ``origin``) as idle until ``expires``.

        Return the connections to close.

        Those are idle connections over the keepalive budget (least recently
        used first) and, at most one per call, the oldest idle connection
        once its keepalive has expired at ``now``: idle connections expire
        roughly in the order they went idle, so checking the head clears them
        over time in O(1) per call, with no system call.
        """
        self.idle[conn] = Parked(pool, origin, now, expires)
        closing: list[AsyncConnectionInterface] = []
        while len(self.idle) > self.max_keepalive:
            old, parked = self.idle.popitem(last=False)
            parked.owner.evicted(old, parked.origin)
            self.open -= 1
            closing.append(old)
            logger.debug(
                "%s: idle socket closed to stay within max_keepalive_connections=%d",
                parked.owner.key,
                self.max_keepalive,
            )
        if self.idle:
            old, parked = next(iter(self.idle.items()))
            if old is not conn and parked.expires <= now:
                del self.idle[old]
                parked.owner.evicted(old, parked.origin)
                self.open -= 1
                closing.append(old)
        return closing

    def unpark(self, conn: AsyncConnectionInterface) -> None:
        """Record that an idle connection was taken back into use (or is being closed)."""
        del self.idle[conn]

    def retire(self, conns: list[AsyncConnectionInterface]) -> None:
        """Queue idle connections of a dropped partition for closing.

        They stay counted in :attr:`open` until :meth:`take_retired` hands
        them to a task that closes them, and that task reports :meth:`closed`:
        a socket is never uncounted while it may still be open.
        """
        self.retired.extend(conns)

    def take_retired(self) -> list[AsyncConnectionInterface]:
        """Return the queued connections for the caller to close (then call :meth:`closed`)."""
        retired, self.retired = self.retired, []
        return retired

    def compact(self) -> None:
        """Rebuild the idle tables at their present size (dicts never shrink on their own)."""
        self.idle = OrderedDict(self.idle)

    def closed(self, count: int = 1) -> None:
        """Record that ``count`` counted sockets were closed."""
        self.open -= count

"""Exceptions raised by hostpool.

Each one subclasses the httpx exception a caller already catches, so code
written for ``httpx.AsyncClient`` keeps working unchanged.
"""

from __future__ import annotations

import httpx

__all__ = ["FleetUnavailable", "PendingLimitExceeded", "PoolTimeout", "RouterClosed"]


class PoolTimeout(httpx.PoolTimeout):
    """No connection slot became free for a partition within its pool timeout.

    ``partition`` names the partition, ``waited`` is the time spent waiting in
    seconds.
    """

    def __init__(
        self,
        message: str,
        *,
        partition: str,
        waited: float,
        request: httpx.Request | None = None,
    ) -> None:
        super().__init__(message, request=request)
        self.partition = partition
        self.waited = waited


class PendingLimitExceeded(PoolTimeout):
    """A partition's queue already held ``max_pending`` waiters.

    Raised at once, without waiting: shedding load early is the point of
    ``max_pending``.
    """


class RouterClosed(httpx.TransportError):
    """The router was closed while the request waited for a slot, or before it was sent."""


class FleetUnavailable(httpx.TransportError):
    """The fleet's store (Redis) did not answer, and its policy is ``on_unavailable="fail"``.

    ``partition`` names the partition whose request was refused. The store's
    own error, if any, is the ``__cause__``.
    """

    def __init__(
        self, message: str, *, partition: str, request: httpx.Request | None = None
    ) -> None:
        super().__init__(message, request=request)
        self.partition = partition

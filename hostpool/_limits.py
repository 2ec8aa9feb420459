"""The upstream's own limits, as plain data: a GCRA bucket and ``Retry-After``.

No I/O and no clock of its own: callers pass ``now`` (the event loop's
clock), so the rules can be tested and property-checked without sleeping.
The fleet-wide versions of the same rules run inside Redis
(:mod:`hostpool.redis`), on Redis's clock, with the same arithmetic.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import re
import time

from ._quota import Rate

__all__ = ["Bucket", "parse_retry_after"]


class Bucket:
    """GCRA: a token bucket kept as one "theoretical arrival time" (``tat``).

    A request may start at ``max(now, tat - tolerance)``; each start pushes
    ``tat`` one ``interval`` further. ``tolerance = (burst - 1) * interval``
    lets ``burst`` requests start back to back after a quiet spell.

    Invariant: over any window ``[a, a + w]`` at most
    ``burst + w / interval`` start times fall (property-tested in
    tests/test_limits.py). Starts are *reserved*: :meth:`reserve` returns
    the delay and the caller sleeps it, so requests waiting for the rate hold
    their place in line without a timer of the bucket's own.
    """

    __slots__ = ("interval", "tat", "tolerance")

    def __init__(self, rate: Rate) -> None:
        self.interval = rate.interval
        self.tolerance = (rate.burst_size - 1) * self.interval
        self.tat = -math.inf

    def reserve(self, now: float, patience: float | None = None) -> float | None:
        """Reserve the next start; return the delay before it (0.0: start now).

        Return None, reserving nothing, when the delay would exceed
        ``patience`` seconds (None: no limit).
        """
        tat = self.tat if self.tat > now else now
        delay = tat - self.tolerance - now
        if delay <= 0.0:
            delay = 0.0
        elif patience is not None and delay > patience:
            return None
        self.tat = tat + self.interval
        return delay

    def refund(self, delay_reserved_at: float, now: float) -> None:
        """Give back a reserved start that will not be used (its request was cancelled).

        Only the latest reservation can be given back exactly: ``tat`` moves
        back one interval if no later request reserved after it (identified
        by the ``tat`` it left, ``delay_reserved_at``), and never behind
        ``now``. Otherwise the start is simply lost, which only slows the rate.
        """
        if self.tat == delay_reserved_at:
            self.tat = max(now, self.tat - self.interval)

    def ready_in(self, now: float) -> float:
        """Seconds until a request could start without waiting (0.0: now)."""
        return max(0.0, self.tat - self.tolerance - now)


# ASCII digits only (``\d`` would take any Unicode digit); any length (a
# huge value is capped by the caller, not refused).
_DELAY_SECONDS = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*")


def parse_retry_after(value: str, *, now: float | None = None) -> float | None:
    """Return the pause a ``Retry-After`` header asks for, in seconds (>= 0).

    Accepts both forms of RFC 9110 section 10.2.3: delay-seconds (``"30"``;
    a fraction, not in the RFC, is kept: ``"1.5"`` waits 1.5 s, not less)
    and an HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``,
    measured against ``now``, wall-clock seconds since the epoch, default
    ``time.time()``). A date in the past gives 0.0. Return None for anything
    else, so the caller can log and ignore it.

    >>> parse_retry_after("120")
    120.0
    >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0)
    10.0
    >>> parse_retry_after("soon") is None
    True
    """
    match = _DELAY_SECONDS.fullmatch(value)
    if match is not None:
        return float(match.group(1))  # inf for an absurd number of digits
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110: an HTTP-date is always GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)

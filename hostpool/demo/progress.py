"""The demo's progress on stderr: a live one-line counter on a terminal, plain lines otherwise."""

from __future__ import annotations

import math
import os
import shutil
from typing import TextIO

from .._format import fmt_seconds
from .server import Kind

__all__ = ["Progress"]


class Progress:
    """A one-line live counter on stderr when it is a terminal; plain lines otherwise."""

    def __init__(self, stream: TextIO, label: str, total: int) -> None:
        self.stream = stream
        self.label = label
        self.total = total
        self.done = 0
        self.errors = 0
        self.healthy_last = math.nan
        self.healthy_worst = math.nan
        self.live = _isatty(stream)
        self._width = 0

    def record(self, kind: Kind, latency: float | None) -> None:
        """Count one finished request (``latency`` is None when it failed)."""
        self.done += 1
        if latency is None:
            self.errors += 1
        elif kind == "healthy":
            self.healthy_last = latency
            self.healthy_worst = max(latency, self.healthy_worst, key=_not_nan)

    def start(self) -> None:
        """Announce the run (plain mode only)."""
        if not self.live:
            self._print(f"{self.label}: {self.total} requests ...")

    def tick(self, elapsed: float) -> None:
        """Redraw the live line (terminal only)."""
        if not self.live:
            return
        line = (
            f"{self.label}  {elapsed:4.1f} s  {self.done}/{self.total} done  healthy host: "
            f"last {fmt_seconds(self.healthy_last)}, worst {fmt_seconds(self.healthy_worst)}"
            f"  errors {self.errors}"
        )
        # Never wrap: "\r" only returns to the start of the last screen line.
        line = line[: max(20, shutil.get_terminal_size().columns - 1)]
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def finish(self, elapsed: float, cut_off: bool) -> None:
        """End the line, or print the run's summary line; say so if it was cut off."""
        if self.live:
            self.tick(elapsed)
            self.stream.write("\n")
            self.stream.flush()
        else:
            self._print(
                f"{self.label}: {self.done}/{self.total} done in {elapsed:.1f} s, healthy host "
                f"worst {fmt_seconds(self.healthy_worst)}, errors {self.errors}"
            )
        if cut_off:
            self._print(f"{self.label}: stopped at --max-duration; unfinished requests are errors")

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def _not_nan(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False

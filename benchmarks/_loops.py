"""Event loops a scenario can run its trials on: asyncio's own, and uvloop.

Every trial of a multi-loop scenario runs in its own loop
(``asyncio.Runner(loop_factory=...)`` on Python 3.11+, a loop made by hand
before), so the loops can be interleaved trial by trial like the clients;
the upstream is a separate process shared by them all. uvloop (in the
``test`` extra) is optional: without it only the ``asyncio`` column runs.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["DEFAULT_LOOP", "loop_names", "run_on"]

T = TypeVar("T")

DEFAULT_LOOP = "asyncio"


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_names() -> list[str]:
    """The loops available here: ``asyncio``, then ``uvloop`` when it is installed."""
    names = [DEFAULT_LOOP]
    if _uvloop_factory() is not None:
        names.append("uvloop")
    return names


def run_on(loop: str, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion in a new event loop of kind ``loop``; close the loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None
    if loop == DEFAULT_LOOP:
        factory = None
    elif loop == "uvloop":
        factory = _uvloop_factory()
        if factory is None:
            main.close()
            raise RuntimeError("uvloop is not installed")
    else:
        main.close()
        raise ValueError(f"unknown event loop {loop!r}")
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main)
    if factory is None:  # pragma: no cover - Python 3.10
        return asyncio.run(main)
    new_loop = factory()  # pragma: no cover - Python 3.10
    try:  # pragma: no cover
        asyncio.set_event_loop(new_loop)
        return new_loop.run_until_complete(main)
    finally:  # pragma: no cover
        new_loop.run_until_complete(new_loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        new_loop.close()

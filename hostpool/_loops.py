"""Which event loop is running: one identity for asyncio (uvloop too) and trio."""

from __future__ import annotations

import asyncio

import sniffio

__all__ = ["current_loop"]


def current_loop() -> object:
    """Return an object that identifies the running event loop.

    The asyncio loop itself, or trio's token for the run; any other anyio
    backend is identified by its name.
    """
    library = sniffio.current_async_library()
    if library == "asyncio":
        return asyncio.get_running_loop()
    if library == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    return library  # pragma: no cover - other anyio backends

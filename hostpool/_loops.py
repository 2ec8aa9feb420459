"""Which event loop is running: one identity for asyncio (uvloop too) and trio."""

from __future__ import annotations

import asyncio

import sniffio

__all__ = ["current_loop"]


def current_loop() -> object:
    """Return an object that identifies the running event loop.

    The asyncio loop itself, or trio's token for the run; any other anyio
    backend is identified by its name.

    Asked on every admission, so it decides as ``sniffio.current_async_library``
    does, in the same order (a library that declared itself through sniffio's
    thread-local or context variable -- trio, trio-asyncio's modes -- then
    asyncio if a task of it is running), without what that function pays on
    each call for asyncio (an ``import asyncio`` statement: ~3 us per
    request on the benchmarks' machine). Anything undecided goes to sniffio,
    which raises its own error outside any async library.
    """
    library = sniffio.thread_local.name or sniffio.current_async_library_cvar.get()
    if library is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            library = sniffio.current_async_library()
        else:
            if asyncio.current_task(loop) is not None:
                return loop
            library = sniffio.current_async_library()
    if library == "asyncio":
        return asyncio.get_running_loop()
    if library == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    return library  # pragma: no cover - other anyio backends

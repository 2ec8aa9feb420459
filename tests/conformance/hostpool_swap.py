"""pytest plugin (``-p hostpool_swap``): run httpx's own tests with ``hostpool.HostRouter``.

At ``pytest_configure`` time, before any test module is imported, the public
name ``httpx.AsyncClient`` is rebound to ``hostpool.HostRouter``, so every
``httpx.AsyncClient(...)`` in httpx's tests builds a ``HostRouter``. httpx's
own modules keep their original class (``httpx._client.AsyncClient``, which
``HostRouter`` subclasses), and the sync ``httpx.Client`` is left alone.

Loaded only by ``tests/conformance/httpx_suite.py``; never by the repository's
own test run.
"""

from __future__ import annotations

import httpx
import pytest

import hostpool

_ORIGINAL_ASYNC_CLIENT = httpx.AsyncClient
_ORIGINAL_CLIENT = httpx.Client


def _check() -> None:
    if httpx.AsyncClient is not hostpool.HostRouter:
        raise pytest.UsageError("hostpool_swap: httpx.AsyncClient is not hostpool.HostRouter")
    if httpx.Client is not _ORIGINAL_CLIENT or httpx._client.Client is not _ORIGINAL_CLIENT:
        raise pytest.UsageError("hostpool_swap: the sync httpx.Client was changed")
    if httpx._client.AsyncClient is not _ORIGINAL_ASYNC_CLIENT:
        raise pytest.UsageError("hostpool_swap: httpx._client.AsyncClient was changed")


def pytest_configure(config: pytest.Config) -> None:
    if not issubclass(hostpool.HostRouter, _ORIGINAL_ASYNC_CLIENT):
        raise pytest.UsageError("hostpool.HostRouter does not subclass httpx.AsyncClient")
    httpx.AsyncClient = hostpool.HostRouter  # type: ignore[misc]
    _check()


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"hostpool_swap: httpx.AsyncClient -> hostpool.HostRouter "
        f"(hostpool {hostpool.__version__} from {hostpool.__file__})"
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    _check()


def pytest_collection_finish(session: pytest.Session) -> None:
    # Test modules are imported by now: none of them may have rebound the names.
    _check()


def pytest_unconfigure(config: pytest.Config) -> None:
    httpx.AsyncClient = _ORIGINAL_ASYNC_CLIENT  # type: ignore[misc]

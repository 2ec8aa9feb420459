"""Shared fixtures: async backends, loopback upstream servers, hypothesis profiles.

Fixtures here never depend on ``hostpool`` itself.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from upstream import (
    DEFAULT_HOSTS,
    Upstream,
    format_url,
    ipv6_available,
    refused_address,
    stalled_listener,
)

# --------------------------------------------------------------------------
# Hypothesis: "ci" (default) is quick; HYPOTHESIS_PROFILE=deep digs further.
# --------------------------------------------------------------------------

_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]

settings.register_profile("ci", max_examples=30, deadline=None, suppress_health_check=_SUPPRESSED)
settings.register_profile(
    "deep", max_examples=2000, deadline=None, suppress_health_check=_SUPPRESSED
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# --------------------------------------------------------------------------
# Async backends (anyio's pytest plugin)
# --------------------------------------------------------------------------


_UVLOOP_MISSING = importlib.util.find_spec("uvloop") is None

#: The three event loops every async test runs on: asyncio's default loop,
#: asyncio on uvloop (what ``uvicorn[standard]`` runs in production) and trio.
ASYNC_BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(
        ("asyncio", {"use_uvloop": True}),
        id="uvloop",
        marks=pytest.mark.skipif(_UVLOOP_MISSING, reason="uvloop has no wheel here"),
    ),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=ASYNC_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Run every ``@pytest.mark.anyio`` test on asyncio, asyncio on uvloop, and trio.

    Tests that need the library's name ask for anyio's ``anyio_backend_name``.
    """
    name, options = request.param
    return name, dict(options)


# --------------------------------------------------------------------------
# Loopback servers
# --------------------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """A fresh upstream listening on 127.0.0.1 .. 127.0.0.5 (same port if possible).

    Function-scoped: start-up takes about a millisecond, and every test gets
    zeroed counters and no leftover connections.
    """
    server = Upstream.start(hosts=DEFAULT_HOSTS)
    try:
        yield server
    finally:
        server.release_all()
        server.stop()


@pytest.fixture
def ipv6_upstream() -> Iterator[Upstream]:
    """An upstream listening on ``::1`` only; skips if IPv6 loopback is unusable."""
    if not ipv6_available():
        pytest.skip("IPv6 loopback (::1) is not available")
    server = Upstream.start(hosts=("::1",))
    try:
        yield server
    finally:
        server.release_all()
        server.stop()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A ``http://127.0.0.1:<port>/`` URL whose connections are refused."""
    with refused_address("127.0.0.1") as (host, port):
        yield format_url(host, port)


@pytest.fixture
def stalled_connect_url() -> Iterator[str]:
    """A URL whose TCP handshake never completes (full accept queue).

    Use it to exercise connect timeouts; always pass a short timeout.
    """
    with stalled_listener("127.0.0.1", fill=True) as (host, port):
        yield format_url(host, port)

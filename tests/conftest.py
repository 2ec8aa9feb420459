"""Shared fixtures: async backends, loopback upstream servers, hypothesis profiles.

Fixtures here never depend on ``hostpool`` itself.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from redis_server import RedisServer, redis_server_binary
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


# --------------------------------------------------------------------------
# redis-server (tests/redis_server.py)
# --------------------------------------------------------------------------


def _require_redis_server() -> str:
    """Return the redis-server binary; skip without one, or fail if CI requires it.

    CI sets ``HOSTPOOL_REQUIRE_REDIS=1``, so a missing install never turns the
    Redis tests into silent skips.
    """
    binary = redis_server_binary()
    if binary is not None:
        return binary
    configured = os.environ.get("HOSTPOOL_REDIS_SERVER")
    if configured:
        pytest.fail(f"HOSTPOOL_REDIS_SERVER={configured!r} is not an executable")
    message = "redis-server is not installed (apt-get install redis-server)"
    if os.environ.get("HOSTPOOL_REQUIRE_REDIS", "") not in ("", "0"):
        pytest.fail(f"{message}, and HOSTPOOL_REQUIRE_REDIS is set")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole run; tests use it through ``redis_server``."""
    binary = _require_redis_server()
    server = RedisServer.start(directory=tmp_path_factory.mktemp("redis"), binary=binary)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server(redis_server_session: RedisServer) -> RedisServer:
    """The session's redis-server, emptied: no keys, no scripts, no other client.

    Tests that stop, restart or kill a server use ``fresh_redis_server``.
    """
    server = redis_server_session
    if not server.running:  # a test broke the rule above: bring it back
        server.restart()
    server.command("CLIENT", "UNPAUSE")
    # Connections a previous test left open would skew connection counts.
    server.command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    server.command("FLUSHALL")
    server.command("SCRIPT", "FLUSH")
    return server


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers of the test's own: ``start(extra_args=[...], port=None)``.

    For servers with options (``--requirepass``, a Unix socket, TLS); every
    one is stopped at teardown.
    """
    binary = _require_redis_server()
    servers: list[RedisServer] = []

    def start(*, extra_args: Sequence[str] = (), port: int | None = None) -> RedisServer:
        server = RedisServer.start(
            port=port,
            directory=tmp_path / f"redis-{len(servers)}",
            extra_args=extra_args,
            binary=binary,
        )
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def fresh_redis_server(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A redis-server of the test's own, to stop, restart or kill at will."""
    return redis_server_factory()

"""Fixtures of the differential tests; like tests/conftest.py, they never import hostpool."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scripted_server import ScriptedServer


@pytest.fixture
def scripted_server() -> Iterator[ScriptedServer]:
    """A fresh :class:`ScriptedServer` on 127.0.0.1 (1 ms between chunks).

    Function-scoped; a hypothesis test reuses it across examples, each of
    which starts with ``scripted_server.load(...)``.
    """
    server = ScriptedServer.start("127.0.0.1", pause=0.001)
    try:
        yield server
    finally:
        server.stop()

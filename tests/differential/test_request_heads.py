"""Request heads: what HostRouter's HTTP/1.1 connection sends, or refuses to, is h11's.

httpx.AsyncClient (httpcore + h11) refuses to send a header name that is not
an RFC 9110 token, or a value with NUL, CR, LF or surrounding whitespace;
that refusal is also what stops header injection through user-supplied
values. HostRouter's own connection serialises requests itself, so it must
refuse exactly the same heads, with the same exception and message, and
send everything else as the server then reads it.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scripted_server import Reply, ScriptedServer

import hostpool

pytestmark = pytest.mark.anyio

TIMEOUT = httpx.Timeout(5.0)
OK = Reply((b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",))
TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Bytes that decide legality: separators, whitespace, controls, DEL, obs-text.
AWKWARD = b' \t\r\n\x00\x01\x0b\x0c\x7f\x80\xff:;,"()/[]{}=?@\\'


async def _send(client: httpx.AsyncClient, server: ScriptedServer, headers: Any) -> Any:
    """What happened: the exception (class and message), or the headers the server read."""
    server.load([OK])
    try:
        response = await client.get(server.url("/"), headers=headers)
    except Exception as exc:
        return (type(exc), str(exc))
    seen = server.requests()
    assert response.status_code == 200 and len(seen) == 1
    return seen[0].headers


async def _both(server: ScriptedServer, headers: Any) -> tuple[Any, Any]:
    async with httpx.AsyncClient(timeout=TIMEOUT, trust_env=False) as client:
        reference = await _send(client, server, headers)
    async with hostpool.HostRouter(timeout=TIMEOUT, trust_env=False) as router:
        ours = await _send(router, server, headers)
    return reference, ours


CASES = {
    "space in a name": [(b"X Y", b"1")],
    "colon in a name": [(b"X:Y", b"1")],
    "empty name": [(b"", b"1")],
    "LF in a name": [(b"X\nY", b"1")],
    "CR in a value": [(b"X", b"a\rb")],
    "LF in a value (injection)": [(b"X", b"a\r\nInjected: yes")],
    "NUL in a value": [(b"X", b"a\x00b")],
    "leading space in a value": [(b"X", b" a")],
    "trailing tab in a value": [(b"X", b"a\t")],
    "tab inside a value": [(b"X", b"a\tb")],
    "DEL and controls in a value": [(b"X", b"a\x7f\x01b")],
    "obs-text in a value": [(b"X", b"caf\xe9")],
    "empty value": [(b"X", b"")],
    "vertical tab in a value": [(b"X", b"a\x0bb")],
    "a good header after a bad one": [(b"Bad Name", b"1"), (b"Good", b"2")],
}


@pytest.mark.parametrize("headers", CASES.values(), ids=CASES.keys())
async def test_awkward_headers_are_sent_or_refused_as_httpx_does(
    scripted_server: ScriptedServer, headers: list[tuple[bytes, bytes]]
) -> None:
    reference, ours = await _both(scripted_server, headers)
    assert ours == reference


def _fields(alphabet: bytes) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(list(alphabet)), max_size=8).map(bytes)


@settings(deadline=None, max_examples=60)
@given(
    headers=st.lists(
        st.tuples(_fields(TOKEN[:20] + AWKWARD), _fields(TOKEN[-20:] + AWKWARD)),
        min_size=1,
        max_size=3,
    )
)
async def test_random_heads_are_sent_or_refused_as_httpx_does(
    scripted_server: ScriptedServer, headers: list[tuple[bytes, bytes]]
) -> None:
    reference, ours = await _both(scripted_server, headers)
    assert ours == reference

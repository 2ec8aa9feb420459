"""Request heads: what HostRouter's HTTP/1.1 connection sends, or refuses to, is h11's.

httpx.AsyncClient (httpcore + h11) refuses to send a header name that is not
an RFC 9110 token, or a value with NUL, CR, LF or surrounding whitespace;
that refusal is also what stops header injection through user-supplied
values. HostRouter's own connection serialises requests itself, so it must
refuse exactly the same heads, with the same exception and message, and
send everything else as the server then reads it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import h11
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


Edit = Callable[[httpx.Request], None]

#: Where the two differ on purpose. httpcore lets h11's own exception out
#: when a request body does not match its Content-Length (raised while the
#: body is sent, outside httpcore's mapping); hostpool raises
#: httpx.LocalProtocolError there, with h11's message, so that
#: ``except httpx.HTTPError`` catches it.
_ERRORS: dict[type[Exception], type[Exception]] = {h11.LocalProtocolError: httpx.LocalProtocolError}


async def _send(
    client: httpx.AsyncClient,
    server: ScriptedServer,
    headers: Any,
    content: Any = None,
    edit: Edit | None = None,
) -> Any:
    """What happened: the exception (class and message), or what the server read."""
    server.load([OK])
    method = "GET" if content is None else "POST"
    try:
        request = client.build_request(method, server.url("/"), headers=headers, content=content)
        if edit is not None:
            edit(request)
        response = await client.send(request)
    except Exception as exc:
        return (_ERRORS.get(type(exc), type(exc)), str(exc))
    seen = server.requests()
    assert response.status_code == 200 and len(seen) == 1
    return seen[0].headers, seen[0].body


async def _both(
    server: ScriptedServer, headers: Any, content: Any = None, edit: Edit | None = None
) -> tuple[Any, Any]:
    outcomes = []
    for make in (httpx.AsyncClient, hostpool.HostRouter):
        async with make(timeout=TIMEOUT, trust_env=False) as client:
            body = content() if callable(content) else content
            outcomes.append(await _send(client, server, headers, body, edit))
    return outcomes[0], outcomes[1]


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


async def _pieces(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


def _drop_host(request: httpx.Request) -> None:
    del request.headers["Host"]


def _second_host(request: httpx.Request) -> None:
    request.headers = httpx.Headers([*request.headers.raw, (b"Host", b"other.test")])


def _host_last(request: httpx.Request) -> None:
    raw = request.headers.raw
    request.headers = httpx.Headers(
        [h for h in raw if h[0].lower() != b"host"] + [h for h in raw if h[0].lower() == b"host"]
    )


def _method(method: bytes) -> Edit:
    def edit(request: httpx.Request) -> None:
        request.method = method.decode("latin-1")

    return edit


# (headers, content, edit): framing headers, Host, the request line, bodies.
FRAMING: dict[str, tuple[Any, Any, Edit | None]] = {
    "Content-Length with a sign": ([(b"Content-Length", b"+3")], b"abc", None),
    "Content-Length with an underscore": ([(b"Content-Length", b"1_0")], b"a" * 10, None),
    "Content-Length of 21 digits": ([(b"Content-Length", b"0" * 18 + b"003")], b"abc", None),
    "Content-Length listing one value twice": ([(b"Content-Length", b"3, 3")], b"abc", None),
    "Content-Length listing two values": ([(b"Content-Length", b"3, 4")], b"abc", None),
    "two different Content-Lengths": (
        [(b"Content-Length", b"3"), (b"content-length", b"4")],
        b"abc",
        None,
    ),
    "the same Content-Length twice": (
        [(b"Content-Length", b"3"), (b"content-length", b"3")],
        b"abc",
        None,
    ),
    "a Content-Length value with a LF": ([(b"Content-Length", b"3\n")], b"abc", None),
    "a body longer than its Content-Length": ([(b"Content-Length", b"2")], b"abc", None),
    "a body shorter than its Content-Length": ([(b"Content-Length", b"5")], b"abc", None),
    "a streamed body longer than its Content-Length": (
        [(b"Content-Length", b"4")],
        lambda: _pieces(b"ab", b"cd", b"e"),
        None,
    ),
    "a streamed body shorter than its Content-Length": (
        [(b"Content-Length", b"9")],
        lambda: _pieces(b"ab", b"cd"),
        None,
    ),
    "a streamed body, chunked": ([], lambda: _pieces(b"ab", b"", b"cd"), None),
    "Transfer-Encoding: gzip, chunked": (
        [(b"Transfer-Encoding", b"gzip, chunked")],
        lambda: _pieces(b"ab"),
        None,
    ),
    "Transfer-Encoding: Chunked": (
        [(b"Transfer-Encoding", b"Chunked")],
        lambda: _pieces(b"ab"),
        None,
    ),
    "Transfer-Encoding twice": (
        [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
        lambda: _pieces(b"ab"),
        None,
    ),
    "a bad name before a bad Content-Length": (
        [(b"X Y", b"1"), (b"Content-Length", b"x")],
        b"abc",
        None,
    ),
    "a bad Content-Length before a bad name": (
        [(b"Content-Length", b"x"), (b"X Y", b"1")],
        b"abc",
        None,
    ),
    "no Host": ([], None, _drop_host),
    "two Hosts": ([], None, _second_host),
    "two Hosts and a bad name": ([(b"X Y", b"1")], None, _second_host),
    "Host given last": ([(b"X-First", b"1")], None, _host_last),
    "a method that is not a token": ([], None, _method(b"GE T")),
}


@pytest.mark.parametrize("case", FRAMING.values(), ids=FRAMING.keys())
async def test_framing_host_and_request_line_are_h11s(
    scripted_server: ScriptedServer, case: tuple[Any, Any, Edit | None]
) -> None:
    headers, content, edit = case
    reference, ours = await _both(scripted_server, headers, content, edit)
    assert ours == reference


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

"""Differential tests of HTTP/1.1 response handling: ``HostRouter`` vs ``httpx.AsyncClient``.

The same scripted bytes (tests/differential/scripted_server.py), cut into the
same pieces, go to a fresh ``httpx.AsyncClient`` (httpcore + h11: the
reference) and to a fresh ``hostpool.HostRouter``; each sends request 1, then
request 2, and the two *outcomes* must be equal:

- per request, on success: status, reason phrase, ``http_version``, the raw
  headers (order and case), the body (``aread()``, or ``aiter_raw()`` in the
  streamed variant); on failure: the exception class and whether it came
  with the head or while reading the body (plus, when streamed, the body
  bytes delivered before it);
- the connections the server saw the requests on: ``(0, 0)`` if request 2
  reused request 1's connection, ``(0, 1)`` if it opened a new one.

While both clients parsed with h11 (before hostpool had an HTTP/1.1
connection of its own) every test passed, on asyncio, uvloop and trio: a
difference is not the harness. With hostpool's own connection
(httptools/llhttp), these tests are the evidence that it behaves like h11.

Inputs: hypothesis-generated valid responses (informational 1xx first,
Content-Length, chunked with extensions and trailers, close-delimited, no
body for HEAD/204/304, keep-alive or not, HTTP/1.0), cut at random points
(inside CRLFs and chunk-size lines, runs of 1-byte pieces); a corpus of
malformed responses; h11's edge cases (what it normalises, accepts or
rejects); random byte mutations of a response head; read timeouts; 1 MiB
bodies.

``HOSTPOOL_DIFFERENTIAL_STRICT=1`` turns the mutation test's tolerated
differences (both clients fail, with different httpx exception classes) into
failures; by default they are reported as one warning per test.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import ssl
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scripted_server import Reply, ScriptedServer

import hostpool

pytestmark = pytest.mark.anyio

CRLF = b"\r\n"
#: The clients' timeout: generous, for exchanges that must not time out.
TIMEOUT = httpx.Timeout(5.0)
#: The timeout of a request the server stalls (seconds).
SHORT_TIMEOUT = 0.3
#: The timeout of a corpus case's request: none should need it, but a client
#: that waits for bytes that never come fails sooner.
CORPUS_TIMEOUT = 2.0
#: Extra wait after the server is done with a reply, before the next request:
#: lets a FIN the server just sent reach the client's socket.
SETTLE = 0.002
STRICT = os.environ.get("HOSTPOOL_DIFFERENTIAL_STRICT", "") not in ("", "0")

OK_BYTES = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OK_REPLY = Reply.of(OK_BYTES)


# ----------------------------------------------------------------------------
# Outcomes
# ----------------------------------------------------------------------------


def _short(data: bytes, limit: int = 60) -> str:
    if len(data) <= limit:
        return repr(data)
    digest = hashlib.sha256(data).hexdigest()[:12]
    return f"{data[:limit]!r}... ({len(data)} bytes, sha256 {digest})"


@dataclass(frozen=True)
class Result:
    """What one request ended with, as a caller of the client sees it."""

    status: int | None = None
    reason: bytes | None = None
    http_version: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    error: type[BaseException] | None = None
    #: Where the error surfaced: "head" (sending / receiving the head) or "body".
    phase: str | None = None

    def __repr__(self) -> str:
        parts = []
        if self.status is not None:
            parts.append(
                f"{self.http_version} {self.status} {self.reason!r} headers={list(self.headers)}"
            )
        if self.body or self.error is None:
            parts.append(f"body={_short(self.body)}")
        if self.error is not None:
            parts.append(f"error={self.error.__module__}.{self.error.__qualname__}@{self.phase}")
        return f"Result({', '.join(parts)})"


@dataclass(frozen=True)
class Outcome:
    """A whole exchange: every request's result, and the connections used."""

    results: tuple[Result, ...]
    #: Per request the server read, its connection numbered by first use:
    #: (0, 0) = request 2 reused request 1's connection.
    connections: tuple[int, ...]
    #: Requests the server read beyond the script (must be 0).
    unscripted: int = 0


@dataclass(frozen=True)
class Step:
    """One request of an exchange and the reply the server scripts for it."""

    method: str
    target: str
    reply: Reply
    content: bytes | None = None
    #: Seconds (connect, read, write, pool); None: the client's (``TIMEOUT``).
    timeout: float | None = None

    def __repr__(self) -> str:
        cuts = [len(c) for c in self.reply.chunks]
        return (
            f"Step({self.method} {self.target}, after={self.reply.after}, "
            f"pieces={cuts}, bytes={_short(self.reply.data, 400)})"
        )


ClientFactory = Callable[[], httpx.AsyncClient]


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Unused (plain http), but building one per client costs ~20 ms.
    return ssl.create_default_context()


def reference_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=TIMEOUT, trust_env=False, verify=_ssl_context())


def router_client() -> httpx.AsyncClient:
    return hostpool.HostRouter(timeout=TIMEOUT, trust_env=False, verify=_ssl_context())


async def _request(client: httpx.AsyncClient, url: str, step: Step, *, stream: bool) -> Result:
    timeout = TIMEOUT if step.timeout is None else httpx.Timeout(step.timeout)
    request = client.build_request(step.method, url, content=step.content, timeout=timeout)
    try:
        response = await client.send(request, stream=True)
    except Exception as exc:
        return Result(error=type(exc), phase="head")
    head: dict[str, Any] = {
        "status": response.status_code,
        "reason": response.extensions.get("reason_phrase"),
        "http_version": response.http_version,
        "headers": tuple(response.headers.raw),
    }
    received: list[bytes] = []
    try:
        if stream:
            async for chunk in response.aiter_raw():
                received.append(chunk)
        else:
            received.append(await response.aread())
    except Exception as exc:
        return Result(**head, body=b"".join(received), error=type(exc), phase="body")
    finally:
        await response.aclose()
    return Result(**head, body=b"".join(received))


async def run_exchange(
    make_client: ClientFactory,
    server: ScriptedServer,
    steps: Sequence[Step],
    *,
    stream: bool,
) -> Outcome:
    """Send every step's request, in order, on one fresh client; return the outcome."""
    server.load(step.reply for step in steps)
    results: list[Result] = []
    async with make_client() as client:
        for step in steps:
            results.append(await _request(client, server.url(step.target), step, stream=stream))
            await server.wait_settled()
            await anyio.sleep(SETTLE)
    numbers: dict[int, int] = {}
    connections = tuple(numbers.setdefault(r.conn_id, len(numbers)) for r in server.requests())
    assert not server.errors, f"the server could not parse a request: {server.errors}"
    return Outcome(tuple(results), connections, server.unscripted)


async def differential(
    server: ScriptedServer,
    steps: Sequence[Step],
    *,
    stream: bool,
) -> tuple[Outcome, Outcome]:
    """The outcome with httpx.AsyncClient (the reference), then with HostRouter."""
    reference = await run_exchange(reference_client, server, steps, stream=stream)
    router = await run_exchange(router_client, server, steps, stream=stream)
    return reference, router


def explain(steps: Sequence[Step], reference: Outcome, router: Outcome, *, stream: bool) -> str:
    lines = [f"HostRouter differs from httpx.AsyncClient ({'aiter_raw' if stream else 'aread'}):"]
    lines += [f"  script {i + 1}: {step!r}" for i, step in enumerate(steps)]
    lines.append(f"  httpx.AsyncClient: {reference}")
    lines.append(f"  HostRouter:        {router}")
    return "\n".join(lines)


async def assert_same(
    server: ScriptedServer,
    steps: Sequence[Step],
    *,
    stream: bool,
) -> Outcome:
    """Run ``steps`` through both clients, assert equal outcomes, return the reference's."""
    reference, router = await differential(server, steps, stream=stream)
    assert router == reference, explain(steps, reference, router, stream=stream)
    assert reference.unscripted == 0, explain(steps, reference, router, stream=stream)
    return reference


# ----------------------------------------------------------------------------
# Valid responses: a model and its strategy
# ----------------------------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))
#: Header names the random headers never use: they frame the body, decide
#: keep-alive, or make httpx decode the body.
RESERVED = frozenset(
    {"content-length", "transfer-encoding", "connection", "content-encoding", "upgrade"}
)
COMMON_STATUSES = (200, 200, 201, 204, 206, 301, 302, 304, 400, 404, 418, 500, 503, 599)


@dataclass(frozen=True)
class Message:
    """A valid response as serialised bytes, and what h11 makes of it."""

    data: bytes
    #: Offsets worth cutting at (inside chunk-size lines).
    marks: tuple[int, ...]
    #: Where the final response's head ends (after its blank line).
    head_end: int
    #: The result a client gets (the reference's, by the model).
    result: Result
    #: Whether h11 keeps the connection after this response (server permitting).
    keep_alive: bool
    #: The body is delimited by the server closing the connection.
    close_delimited: bool


def _status_line(version: bytes, status: int, reason: bytes | None) -> bytes:
    line = b"HTTP/" + version + b" " + b"%03d" % status
    return line if reason is None else line + b" " + reason


def _case_variants(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper(), name.title(), name.swapcase()])


@st.composite
def header_values(draw: st.DrawFn) -> bytes:
    """Printable ASCII with spaces inside (never at either end: h11 strips those)."""
    words = draw(st.lists(st.text(PRINTABLE, min_size=1, max_size=12), max_size=3))
    gaps = [draw(st.sampled_from([" ", "  "])) for _ in words[1:]]
    text = words[0] if words else ""
    for gap, word in zip(gaps, words[1:]):
        text += gap + word
    return text.encode("ascii")


@st.composite
def header_sets(draw: st.DrawFn, max_size: int = 8) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """(name, whitespace, value, whitespace): duplicated names, mixed case."""
    names = draw(
        st.lists(
            st.text(TCHAR, min_size=1, max_size=16).filter(lambda n: n.lower() not in RESERVED),
            min_size=1,
            max_size=4,
        )
    )
    count = draw(st.integers(0, max_size))
    headers = []
    for _ in range(count):
        name = draw(st.sampled_from(names).flatmap(_case_variants))
        before = draw(st.sampled_from([b" ", b" ", b"", b"  ", b"\t"]))
        after = draw(st.sampled_from([b"", b"", b" ", b"\t"]))
        headers.append((name.encode("ascii"), before, draw(header_values()), after))
    return headers


reasons = st.one_of(
    st.sampled_from([b"OK", b"Not Found", b"", None]),
    st.text(PRINTABLE + " ", max_size=20).map(lambda s: s.encode("ascii")),
)


def _chunk_size_line(size: int, upper: bool, zeros: int, ext: bytes) -> bytes:
    digits = b"%X" % size if upper else b"%x" % size
    return b"0" * zeros + digits + ext + CRLF


chunk_extensions = st.sampled_from(
    [b"", b"", b"", b";x", b";name=value", b';q="quoted string"', b";a=1;b=2"]
)


@st.composite
def messages(draw: st.DrawFn, method: str) -> Message:
    """A valid HTTP/1.x response to ``method``, with the result h11 gives for it."""
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0"]))
    status = draw(st.one_of(st.sampled_from(COMMON_STATUSES), st.integers(200, 599)))
    reason = draw(reasons)
    bodiless = method == "HEAD" or status in (204, 304)
    if status == 204:
        framing = "none"
    elif bodiless:
        options = ["none", "length", "chunked"] if method == "HEAD" else ["none", "length"]
        framing = draw(st.sampled_from(options if version == b"1.1" else options[:2]))
    else:
        options = ["length", "chunked", "close"] if version == b"1.1" else ["length", "close"]
        framing = draw(st.sampled_from(options))
    connection = draw(
        st.sampled_from(
            [None, None, b"close", b"Close", b"keep-alive", b"Keep-Alive", b"keep-alive, close"]
        )
    )
    headers = draw(header_sets())

    body = b"" if bodiless else draw(st.binary(max_size=2048))
    segments: list[tuple[bytes, bool]] = []  # (bytes, worth cutting inside)
    if framing == "length":
        length = draw(st.integers(0, 100_000)) if bodiless else len(body)
        framing_header: tuple[bytes, bytes] | None = (
            draw(_case_variants("Content-Length")).encode(),
            b"%d" % length,
        )
        if not bodiless:
            segments.append((body, False))
    elif framing == "chunked":
        framing_header = (draw(_case_variants("Transfer-Encoding")).encode(), b"chunked")
        if not bodiless:
            cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=5))))
            bounds = [0, *[c for c in cuts if c < len(body)], len(body)]
            for a, b in itertools.pairwise(bounds):
                if b > a:
                    line = _chunk_size_line(
                        b - a,
                        draw(st.booleans()),
                        draw(st.integers(0, 2)),
                        draw(chunk_extensions),
                    )
                    segments += [(line, True), (body[a:b] + CRLF, False)]
            last = _chunk_size_line(0, False, draw(st.integers(0, 2)), draw(chunk_extensions))
            segments.append((last, True))
            for name, before, value, after in draw(header_sets(max_size=2)):
                segments.append((name + b":" + before + value + after + CRLF, False))
            segments.append((CRLF, False))
    else:  # "none" (no body, no length), or "close": the body runs to EOF
        framing_header = None
        if framing == "close":
            segments.append((body, False))

    # Framing and Connection headers go anywhere among the others.
    fields = [(name, b" ", value, b"") for name, value in filter(None, [framing_header])]
    if connection is not None:
        fields.append((draw(_case_variants("Connection")).encode(), b" ", connection, b""))
    for item in fields:
        headers.insert(draw(st.integers(0, len(headers))), item)

    # Informational responses first (HTTP/1.1 only).
    informational: list[bytes] = []
    if version == b"1.1":
        for _ in range(draw(st.integers(0, 2))):
            code = draw(
                st.one_of(
                    st.sampled_from([100, 102, 103]),
                    st.integers(100, 199).filter(lambda c: c != 101),
                )
            )
            lines = [_status_line(b"1.1", code, draw(reasons))]
            lines += [n + b":" + b + v + a for n, b, v, a in draw(header_sets(max_size=2))]
            informational.append(CRLF.join(lines) + CRLF + CRLF)

    lines = [_status_line(version, status, reason)]
    lines += [name + b":" + before + value + after for name, before, value, after in headers]
    head = CRLF.join(lines) + CRLF + CRLF
    prefix = b"".join(informational) + head
    data = prefix
    marks: list[int] = []
    for segment, worth in segments:
        if worth:
            marks += range(len(data) + 1, len(data) + len(segment))
        data += segment

    tokens = {t.strip().lower() for t in (connection or b"").split(b",")}
    close_delimited = framing == "close" and not bodiless
    keep_alive = version == b"1.1" and b"close" not in tokens and not close_delimited
    result = Result(
        status=status,
        reason=b"" if reason is None else reason,
        http_version="HTTP/" + version.decode(),
        headers=tuple((name, value) for name, _, value, _ in headers),
        body=body,
    )
    return Message(
        data=data,
        marks=tuple(marks),
        head_end=len(prefix),
        result=result,
        keep_alive=keep_alive,
        close_delimited=close_delimited,
    )


@st.composite
def cut_points(draw: st.DrawFn, data: bytes, marks: Sequence[int] = ()) -> list[int]:
    """Where to split ``data``: anywhere, inside CRLFs and marks, runs of 1-byte pieces."""
    n = len(data)
    if n < 2:
        return []
    cuts = draw(st.lists(st.integers(1, n - 1), max_size=5))
    inside_crlf = [i for i in range(1, n) if data[i - 1 : i + 1] == CRLF]
    for candidates in (inside_crlf, marks):
        if candidates:
            cuts += draw(st.lists(st.sampled_from(candidates), max_size=3))
    if draw(st.booleans()):
        start = draw(st.integers(1, n - 1))
        cuts += range(start, min(n, start + draw(st.integers(1, 6))))
    return cuts


@dataclass(frozen=True)
class Exchange:
    """Scripted steps, and the outcome h11 gives for them (the model)."""

    steps: tuple[Step, ...]
    expected: Outcome

    def __repr__(self) -> str:
        return "Exchange(\n" + "".join(f"  {step!r},\n" for step in self.steps) + ")"


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    """Two requests with valid responses; the second shows if the first's connection is reused."""
    steps: list[Step] = []
    results: list[Result] = []
    connections = [0]
    for index in (1, 2):
        method = draw(st.sampled_from(["GET", "GET", "HEAD", "POST"]))
        content = draw(st.binary(max_size=64)) if method == "POST" else None
        message = draw(messages(method))
        options = ["close", "shutdown"] if message.close_delimited else ["keep", "keep", "close"]
        if not message.close_delimited:
            options.append("shutdown")
        after = draw(st.sampled_from(options))
        cuts = draw(cut_points(message.data, message.marks))
        reply = Reply.of(message.data, cuts, after=after)
        steps.append(Step(method, f"/{index}", reply, content))
        results.append(message.result)
        if index == 1:
            reused = message.keep_alive and after == "keep"
            connections.append(0 if reused else 1)
    return Exchange(tuple(steps), Outcome(tuple(results), tuple(connections)))


# ----------------------------------------------------------------------------
# Valid responses
# ----------------------------------------------------------------------------


@settings(deadline=None)
@given(exchange=exchanges(), stream=st.booleans())
async def test_valid_responses_match(
    scripted_server: ScriptedServer, exchange: Exchange, stream: bool
) -> None:
    """Valid responses, cut anywhere: same results and the same reuse decision."""
    reference = await assert_same(scripted_server, exchange.steps, stream=stream)
    # The model must agree with h11, or the strategy does not test what it says.
    assert reference == exchange.expected, (
        f"the reference (h11) disagrees with the test's model:\n  {exchange!r}\n"
        f"  model:     {exchange.expected}\n  reference: {reference}"
    )


def _pattern(n: int) -> bytes:
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


LARGE = 1024 * 1024


def _large_reply(framing: str) -> Reply:
    body = _pattern(LARGE)
    if framing == "content-length":
        data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % LARGE + body
    else:
        pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
        for start in range(0, LARGE, 50_000):
            chunk = body[start : start + 50_000]
            pieces.append(b"%x\r\n" % len(chunk) + chunk + CRLF)
        data = b"".join([*pieces, b"0\r\n\r\n"])
    # Pieces that straddle the head, chunk-size lines and CRLFs.
    return Reply.of(data, range(37, len(data), 65_521), pause=0.0)


@pytest.mark.parametrize("stream", [True, False], ids=["aiter_raw", "aread"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_body_matches(
    scripted_server: ScriptedServer, framing: str, stream: bool
) -> None:
    """1 MiB, streamed by the server in ~64 KiB pieces, then a reused connection."""
    steps = [Step("GET", "/large", _large_reply(framing)), Step("GET", "/2", OK_REPLY)]
    reference = await assert_same(scripted_server, steps, stream=stream)
    assert reference.results[0].error is None
    assert reference.results[0].body == _pattern(LARGE)
    assert reference.results[1].body == b"ok"
    assert reference.connections == (0, 0)


# ----------------------------------------------------------------------------
# The corpus: malformed responses, and h11's edge cases
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A scripted first reply, and what the reference does with it."""

    id: str
    reply: Reply
    #: The exception class the reference raises, or None for a response.
    error: type[Exception] | None
    #: Where the reference raises it ("head" or "body").
    phase: str | None = None
    #: For a response: its body (checked against the reference too).
    body: bytes | None = None
    #: Whether request 2 reuses request 1's connection (None: not checked).
    reused: bool | None = None
    method: str = "GET"

    def __repr__(self) -> str:
        return self.id


RPE = httpx.RemoteProtocolError
HEAD_OK = b"HTTP/1.1 200 OK\r\n"


def _cut_everywhere(data: bytes) -> list[int]:
    """Cut inside every CRLF, and inside the version and the status code."""
    return sorted({i + 1 for i, b in enumerate(data) if b == 13} | {3, 10})


def with_modes(cases: Sequence[Case]) -> list[Any]:
    """(case, stream) parameters: a head that fails is read the same way in both modes."""
    params = []
    for c in cases:
        for stream in (True, False) if c.phase != "head" else (True,):
            mode = "aiter_raw" if stream else "aread"
            params.append(pytest.param(c, stream, id=f"{c.id}-{mode}"))
    return params


def case(
    id: str,
    data: bytes,
    error: type[Exception] | None = RPE,
    phase: str | None = "head",
    *,
    after: str = "keep",
    cuts: Sequence[int] | None = None,
    **kwargs: Any,
) -> Case:
    reply = Reply.of(data, _cut_everywhere(data) if cuts is None else cuts, after=after)
    if error is None:
        phase = None
    return Case(id, reply, error, phase, **kwargs)


def _huge_head(size: int) -> bytes:
    filler = b"X-Filler-%04d: " + b"v" * 1000 + CRLF
    lines = [filler % i for i in range(size // len(filler % 0) + 1)]
    return HEAD_OK + b"".join(lines) + b"Content-Length: 0\r\n\r\n"


MALFORMED = [
    case("status-not-a-number", b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n"),
    case("status-two-digits", b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n"),
    case("status-below-100", b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n"),
    case("protocol-name", b"HTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    case("version-missing", b"HTTP/ 200 OK\r\nContent-Length: 0\r\n\r\n"),
    case("header-without-colon", HEAD_OK + b"X-Broken\r\nContent-Length: 0\r\n\r\n"),
    case("space-before-colon", HEAD_OK + b"X-Broken : value\r\nContent-Length: 0\r\n\r\n"),
    case("empty-header-name", HEAD_OK + b": value\r\nContent-Length: 0\r\n\r\n"),
    case("nul-in-header-value", HEAD_OK + b"X-Nul: a\x00b\r\nContent-Length: 0\r\n\r\n"),
    case("cr-in-header-value", HEAD_OK + b"X-Cr: a\rb\r\nContent-Length: 0\r\n\r\n"),
    case("fold-before-first-header", HEAD_OK + b" folded\r\nContent-Length: 0\r\n\r\n"),
    case("content-length-not-a-number", HEAD_OK + b"Content-Length: abc\r\n\r\n"),
    case("content-length-negative", HEAD_OK + b"Content-Length: -1\r\n\r\n"),
    case("content-lengths-conflict", HEAD_OK + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nok"),
    case("content-length-list-conflict", HEAD_OK + b"Content-Length: 2, 3\r\n\r\nok"),
    case("blank-line-first", b"\r\n" + OK_BYTES),
    case("garbage", b"NOT HTTP AT ALL\r\n\r\n"),
    case("garbage-then-close", b"<html>hello</html>", after="close"),
    case("closed-before-any-byte", b"", after="close"),
    case("half-closed-before-any-byte", b"", after="shutdown"),
    case("closed-in-status-line", b"HTTP/1.1 20", after="close"),
    case("closed-in-head", HEAD_OK + b"Content-Length: 5\r\n", after="close"),
    case(
        "body-shorter-than-content-length",
        HEAD_OK + b"Content-Length: 10\r\n\r\nabc",
        phase="body",
        after="close",
        body=b"abc",
    ),
    case(
        "body-shorter-then-half-close",
        HEAD_OK + b"Content-Length: 10\r\n\r\nabc",
        phase="body",
        after="shutdown",
        body=b"abc",
    ),
    case(
        "closed-in-chunk",
        HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\na\r\n01234",
        phase="body",
        after="close",
        body=b"01234",
    ),
    case(
        "closed-in-chunk-size-line",
        HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1",
        phase="body",
        after="close",
        body=b"hello",
    ),
    case(
        "closed-before-last-chunk",
        HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        phase="body",
        after="close",
        body=b"hello",
    ),
    case(
        "closed-in-trailers",
        HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: 1\r\n",
        phase="body",
        after="close",
        body=b"hello",
    ),
    case(
        "bad-chunk-size",
        HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nabc\r\n0\r\n\r\n",
        phase="body",
        body=b"hello",
    ),
    case(
        "chunk-size-too-long",
        HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n" + b"0" * 21 + b"5\r\nhello\r\n0\r\n\r\n",
        phase="body",
    ),
    case(
        "chunk-data-longer-than-size",
        HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
        phase="body",
        body=b"hel",
    ),
    case(
        "bad-trailer-line",
        HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nno colon\r\n\r\n",
        phase="body",
        body=b"hello",
    ),
    # httpcore's h11 gives up once an incomplete head passes 100 KiB
    # (max_incomplete_event_size): 300 KiB can never arrive complete in time.
    case("oversized-head", _huge_head(300 * 1024), cuts=range(16_384, 310_000, 16_384)),
]


async def _case_then_ok(server: ScriptedServer, case: Case, stream: bool) -> Outcome:
    """``case``'s reply to request 1, then a plain 200 to request 2, through both clients.

    Returns the reference's outcome (the router's is the same, or the case
    documents how it differs).
    """
    steps = [
        Step(case.method, "/1", case.reply, timeout=CORPUS_TIMEOUT),
        Step("GET", "/2", OK_REPLY),
    ]
    return await assert_same_or_documented(server, steps, case, stream=stream)


@pytest.mark.parametrize(("case", "stream"), with_modes(MALFORMED))
async def test_malformed_response_corpus(
    scripted_server: ScriptedServer, case: Case, stream: bool
) -> None:
    """Each malformed response: the same exception class (at the same point) from both.

    The server keeps the connection open after the bad bytes unless the case
    is about a close, so the errored connection not being reused for request
    2 is the client's decision.
    """
    reference = await _case_then_ok(scripted_server, case, stream)
    first, second = reference.results
    assert (first.error, first.phase) == (case.error, case.phase), first
    if stream and case.body is not None:
        assert first.body == case.body
    assert second.body == b"ok"
    assert reference.connections == (0, 1), "a connection that saw an error was reused"


_OBS_TEXT = bytes(range(0x80, 0x100, 17))

#: Inputs on which h11 normalises, tolerates or rejects what a stricter (or
#: laxer) parser may treat otherwise: a parser that replaces h11 must match.
H11_EDGES = [
    case(
        "transfer-encoding-mixed-case-is-lowercased",
        HEAD_OK + b"Transfer-Encoding: ChUnKeD\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        None,
        body=b"ok",
        reused=True,
    ),
    case(
        "duplicate-content-length-kept-once",
        HEAD_OK + b"Content-Length: 2\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
        reused=True,
    ),
    case(
        "content-length-list-of-equal-values",
        HEAD_OK + b"Content-Length: 2, 2\r\n\r\nok",
        None,
        body=b"ok",
        reused=True,
    ),
    case(
        "content-length-leading-zeros",
        HEAD_OK + b"Content-Length: 0002\r\n\r\nok",
        None,
        body=b"ok",
        reused=True,
    ),
    case(
        "transfer-encoding-beats-content-length",
        HEAD_OK + b"Content-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        None,
        body=b"ok",
    ),
    case(
        "obs-fold-joined-with-a-space",
        HEAD_OK + b"X-Folded: a\r\n  b\r\n\tc\r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
        reused=True,
    ),
    case(
        "bare-lf-line-endings",
        b"HTTP/1.1 200 OK\nX-A: 1\nContent-Length: 2\n\nok",
        None,
        body=b"ok",
        reused=True,
    ),
    case(
        "no-reason-no-space",
        b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
        reused=True,
    ),
    case(
        "reason-with-tab-and-obs-text",
        b"HTTP/1.1 200 O\tK " + _OBS_TEXT + b"\r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
    ),
    case(
        "header-value-obs-text",
        HEAD_OK + b"X-Latin: caf\xe9 " + _OBS_TEXT + b"\r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
    ),
    case(
        "header-value-empty-and-whitespace",
        HEAD_OK + b"X-Empty:\r\nX-Blank: \t \r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
    ),
    case("status-600", b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nok", None, body=b"ok"),
    case(
        "http-1.2-keeps-alive",
        b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
        reused=True,
    ),
    case(
        "http-1.0-keep-alive-not-reused",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
        reused=False,
    ),
    case(
        "connection-close-among-tokens",
        HEAD_OK + b"Connection: Keep-Alive, CLOSE\r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
        reused=False,
    ),
    case(
        "keep-alive-then-server-closes",
        OK_BYTES,
        None,
        body=b"ok",
        after="close",
        reused=False,
    ),
    case(
        "keep-alive-then-server-half-closes",
        OK_BYTES,
        None,
        body=b"ok",
        after="shutdown",
        reused=False,
    ),
    case(
        "connection-close-server-keeps-open",
        HEAD_OK + b"Connection: close\r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
        reused=False,
    ),
    case(
        "close-delimited-http-1.1",
        HEAD_OK + b"X-A: 1\r\n\r\nuntil the end",
        None,
        body=b"until the end",
        after="close",
        reused=False,
    ),
    case(
        "close-delimited-http-1.0-half-close",
        b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
        None,
        body=b"until the end",
        after="shutdown",
        reused=False,
    ),
    case(
        "head-with-content-length-has-no-body",
        HEAD_OK + b"Content-Length: 1000\r\n\r\n",
        None,
        body=b"",
        method="HEAD",
        reused=True,
    ),
    case(
        "head-with-chunked-has-no-body",
        HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n",
        None,
        body=b"",
        method="HEAD",
        reused=True,
    ),
    case("no-content-204", b"HTTP/1.1 204 No Content\r\n\r\n", None, body=b"", reused=True),
    case(
        "not-modified-304-with-content-length",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\n\r\n",
        None,
        body=b"",
        reused=True,
    ),
    case(
        "informational-responses-first",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n" + OK_BYTES,
        None,
        body=b"ok",
        reused=True,
    ),
    case(
        "chunk-size-leading-zeros-uppercase-whitespace",
        HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n000A  \r\n0123456789\r\n00\r\n\r\n",
        None,
        body=b"0123456789",
        reused=True,
    ),
    case(
        "chunk-extensions-and-trailers",
        HEAD_OK + b'Transfer-Encoding: chunked\r\n\r\n2;a=b;c="d e"\r\nok\r\n'
        b"0;last\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n",
        None,
        body=b"ok",
        reused=True,
    ),
    case(
        "head-just-under-limit",
        _huge_head(60 * 1024),
        None,
        body=b"",
        cuts=range(4096, 70_000, 4096),
        reused=True,
    ),
    case(
        "extra-bytes-after-response-then-close",
        OK_BYTES + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra",
        None,
        body=b"ok",
        after="close",
        cuts=(),
        reused=False,
    ),
    case("transfer-encoding-gzip", HEAD_OK + b"Transfer-Encoding: gzip\r\n\r\n"),
    case(
        "transfer-encoding-twice",
        HEAD_OK + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    case(
        "space-before-chunk-extension",
        HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n5 ;ext\r\nhello\r\n0\r\n\r\n",
        phase="body",
    ),
    case(
        "header-value-trailing-whitespace-stripped",
        HEAD_OK + b"X-A: v \t\r\nX-B:\t w  x \r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
        reused=True,
    ),
    case(
        "mixed-line-endings",
        HEAD_OK + b"X-A: 1\nContent-Length: 2\r\n\nok",
        None,
        body=b"ok",
        reused=True,
    ),
    case(
        "http-2.0-status-line-keeps-alive",
        b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
        reused=True,
    ),
    case(
        "http-0.9-status-line-not-reused",
        b"HTTP/0.9 200 OK\r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
        reused=False,
    ),
    case(
        "http-1.0-keep-alive-and-close-not-reused",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok",
        None,
        body=b"ok",
        reused=False,
    ),
    case(
        "head-after-informational-reused",
        b"HTTP/1.1 100 Continue\r\n\r\n" + HEAD_OK + b"Content-Length: 10\r\n\r\n",
        None,
        body=b"",
        method="HEAD",
        reused=True,
    ),
    case(
        "head-after-informational-in-one-piece-reused",
        b"HTTP/1.1 100 Continue\r\n\r\n" + HEAD_OK + b"Content-Length: 10\r\n\r\n",
        None,
        body=b"",
        method="HEAD",
        cuts=(),
        reused=True,
    ),
    case(
        "chunk-extension-value-with-space",
        HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n2;a=b c\r\nok\r\n0\r\n\r\n",
        None,
        body=b"ok",
        reused=True,
    ),
    case("leading-cr-before-status-line", b"\r" + OK_BYTES),
    case(
        "leading-space-in-status-line",
        b" HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ),
]


#: Where hostpool's HTTP/1.1 connection (llhttp) knowingly differs from h11,
#: on inputs RFC 9112 lets a recipient reject or accept: case id -> (the
#: router's outcome for the first request: the error class, or None for
#: success; why). The reference keeps its own pinned outcome; the router must
#: give exactly this one, and never reuse a connection that saw an error.
DIVERGES: dict[str, tuple[type[Exception] | None, str]] = {
    "chunk-size-too-long": (None, "llhttp reads a chunk size of any length; h11: 20 digits"),
    "duplicate-content-length-kept-once": (RPE, "llhttp refuses a repeated Content-Length"),
    "content-length-list-of-equal-values": (RPE, "llhttp refuses a Content-Length list"),
    "obs-fold-joined-with-a-space": (RPE, "llhttp refuses obsolete line folding"),
    "space-before-chunk-extension": (None, "spaces after a chunk size are allowed (as h11 does)"),
    "chunk-extension-value-with-space": (RPE, "llhttp refuses a space in a chunk extension"),
}


async def assert_same_or_documented(
    server: ScriptedServer, steps: Sequence[Step], case: Case, *, stream: bool
) -> Outcome:
    """``assert_same``, except for a case in :data:`DIVERGES`: the router's pinned outcome."""
    if case.id not in DIVERGES:
        return await assert_same(server, steps, stream=stream)
    expected, why = DIVERGES[case.id]
    reference, router = await differential(server, steps, stream=stream)
    first = router.results[0]
    assert first.error == expected, (why, router)
    assert router.results[1].body == b"ok", router
    if first.error is not None:
        assert router.connections == (0, 1), "a connection that saw an error was reused"
    return reference


@pytest.mark.parametrize(("case", "stream"), with_modes(H11_EDGES))
async def test_h11_edge_cases(scripted_server: ScriptedServer, case: Case, stream: bool) -> None:
    """What h11 normalises (headers.raw), tolerates or rejects: the router must do the same."""
    reference = await _case_then_ok(scripted_server, case, stream)
    first, second = reference.results
    assert (first.error, first.phase) == (case.error, case.phase), first
    if case.body is not None and first.error is None:
        assert first.body == case.body
    assert second.body == b"ok"
    if case.reused is not None:
        assert reference.connections == ((0, 0) if case.reused else (0, 1))
    if first.error is not None:
        assert reference.connections == (0, 1), "a connection that saw an error was reused"


# ----------------------------------------------------------------------------
# Read timeouts
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "stream", "phase", "partial"),
    [
        pytest.param(
            HEAD_OK + b"Content-Length: 100\r\n\r\n0123456789", False, "body", b"", id="body-aread"
        ),
        pytest.param(
            HEAD_OK + b"Content-Length: 100\r\n\r\n0123456789",
            True,
            "body",
            b"0123456789",
            id="body-aiter_raw",
        ),
        pytest.param(
            HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1",
            True,
            "body",
            b"hello",
            id="chunk-size-line",
        ),
        pytest.param(HEAD_OK + b"Content-Le", True, "head", b"", id="head"),
    ],
)
async def test_read_timeout_when_the_server_stalls(
    scripted_server: ScriptedServer, data: bytes, stream: bool, phase: str, partial: bytes
) -> None:
    """The server stops sending: ReadTimeout from both, and the connection is not reused."""
    stalled = Reply.of(data, [5, 20], after="stall")
    steps = [Step("GET", "/1", stalled, timeout=SHORT_TIMEOUT), Step("GET", "/2", OK_REPLY)]
    reference = await assert_same(scripted_server, steps, stream=stream)
    first, second = reference.results
    assert (first.error, first.phase, first.body) == (httpx.ReadTimeout, phase, partial)
    assert second.body == b"ok"
    assert reference.connections == (0, 1)


# ----------------------------------------------------------------------------
# Mutations of a valid head
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    step: Step
    reference: Result
    router: Result


@pytest.fixture
def divergences() -> Iterator[list[Divergence]]:
    """Tolerated differences of a test (both failed, different classes), reported at the end."""
    found: list[Divergence] = []
    yield found
    if found:
        lines = [f"{len(found)} input(s) where both clients failed, with different errors:"]
        for d in found:
            lines.append(
                f"  {d.step!r}\n    httpx.AsyncClient: {d.reference}\n    HostRouter: {d.router}"
            )
        warnings.warn("\n".join(lines), stacklevel=1)


MUTATION_BYTES = st.one_of(st.sampled_from(list(b" :\r\n\t\x00;,/.0-")), st.integers(0, 255))


@st.composite
def mutated_steps(draw: st.DrawFn) -> Step:
    """A valid response whose head got 1-3 bytes flipped, inserted or deleted."""
    message = draw(messages("GET"))
    data = bytearray(message.data)
    head_end = message.head_end
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        at = draw(st.integers(0, max(0, head_end - 1)))
        if op == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data.insert(at, draw(MUTATION_BYTES))
            head_end += 1
        elif head_end > 1:
            del data[at]
            head_end -= 1
    cuts = draw(cut_points(bytes(data)))
    # The server closes after writing: whatever the mutation did to the
    # framing, the client is never left waiting for more.
    return Step("GET", "/1", Reply.of(bytes(data), cuts, after="close"))


@settings(deadline=None)
@given(step=mutated_steps(), stream=st.booleans())
async def test_mutated_heads(
    scripted_server: ScriptedServer, divergences: list[Divergence], step: Step, stream: bool
) -> None:
    """Random damage to a head: both fail with an httpx error, or both give the same result.

    Both failing with different httpx exception classes is tolerated (a
    different correct parser may classify a broken head otherwise) and
    reported as a warning, or fails with HOSTPOOL_DIFFERENTIAL_STRICT=1.
    """
    steps = [step, Step("GET", "/2", OK_REPLY)]
    reference, router = await differential(scripted_server, steps, stream=stream)
    message = explain(steps, reference, router, stream=stream)
    for result in (*reference.results, *router.results):
        if result.error is not None:
            assert issubclass(result.error, httpx.HTTPError), message
    assert reference.results[1:] == router.results[1:], message
    mine, theirs = router.results[0], reference.results[0]
    if mine == theirs:
        assert reference.connections == router.connections, message
        return
    for result, outcome in ((mine, router), (theirs, reference)):
        if result.error is not None:
            assert outcome.connections == (0, 1), "a connection that saw an error was reused"
    # Damaged heads where one parser accepts what the other refuses (llhttp
    # and h11 draw RFC 9112's leniency lines differently): recorded as a
    # warning, a failure with HOSTPOOL_DIFFERENTIAL_STRICT=1. A success on
    # both sides must match.
    if (mine.error is not None or theirs.error is not None) and not STRICT:
        divergences.append(Divergence(step, theirs, mine))
        return
    raise AssertionError(message)

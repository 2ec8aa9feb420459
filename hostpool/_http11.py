"""A fast HTTP/1.1 connection: httptools (llhttp) instead of httpcore's h11 connection.

httpcore's ``AsyncHTTP11Connection`` turns every response into h11 events
and every body chunk into several layers of async generators; together they
were most of a request's CPU below httpx's own client layer (benchmarks:
profile). :class:`FastHTTP11Connection` speaks HTTP/1.1 itself on the same
network stream: it serialises a request head with one ``bytes`` join and
parses the response with llhttp (``httptools``, the parser uvicorn uses),
feeding it what one ``read`` returns.

The partition pool calls :meth:`FastHTTP11Connection.exchange` with the
parts of the ``httpx.Request`` and builds the ``httpx.Response`` itself,
mapping httpcore's exceptions to httpx's (``PartitionPool.send``); the
connection also sits behind httpcore's connection interface
(``handle_async_request``), for the pool's httpcore face. Connecting stays
httpcore's (``AsyncHTTPConnection._connect``: TLS, retries, socket options,
Unix sockets, hostpool's asyncio stream), so only the exchange is new. Used
for direct connections that speak HTTP/1.1 only (HTTP/2 disabled), for
requests that carry no ``Upgrade`` header and no httpcore ``trace``
extension; everything else keeps httpcore's connection (``_fast_path_for``
in ``_pool.py``). Request heads are written, or refused, as h11 writes or
refuses them (:func:`_request_head`).

The contract, as httpcore's HTTP/1.1 connection keeps it (and the
differential tests in ``tests/differential/`` check against h11):

- one request at a time; keep-alive unless the request or the response says
  ``Connection: close`` or the response is HTTP/1.0 without keep-alive;
- bodies by Content-Length, chunked (trailers read and ignored) or until
  the server closes; none for HEAD, 1xx, 204 and 304; 1xx interim
  responses before the final one are skipped;
- a malformed response, a header block over 100 KiB, a body cut short, or
  bytes after a complete response → ``RemoteProtocolError``; a read or
  write that times out → ``ReadTimeout`` / ``WriteTimeout``;
- a connection that saw an error, or whose body was not read to its end,
  is closed, never reused.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpcore
import httptools
import httpx

from ._compat import connect_stream

__all__ = ["FastHTTP11Connection"]

#: httpcore's h11 limit on an incomplete event (a response head), in bytes.
MAX_HEAD_SIZE = 100 * 1024
_READ_SIZE = 64 * 1024

_NEW, _IDLE, _ACTIVE, _CLOSED = "NEW", "IDLE", "ACTIVE", "CLOSED"


class _Stop(Exception):
    """Raised inside a parser callback to stop llhttp (see :class:`_Exchange`)."""


class _Exchange:
    """One response, as llhttp reports it: the parser's callbacks write here.

    llhttp gives no way to say "this response has no body" from outside (a
    response to HEAD): ``on_headers_complete`` then raises :class:`_Stop`,
    and the bytes after the head must be nothing, which the caller checks.
    Bytes after a complete response (a new message beginning) stop it too.
    """

    __slots__ = (
        "body",
        "complete",
        "connection",
        "encodings",
        "error",
        "extra",
        "head_bytes",
        "headers",
        "headers_done",
        "interim",
        "keep_alive",
        "length",
        "no_body",
        "parser",
        "reason",
        "status",
        "tail",
    )

    def __init__(self, head_request: bool) -> None:
        parser = httptools.HttpResponseParser(self)
        self.parser: httptools.HttpResponseParser | None = parser
        # Where h11 accepts what llhttp would refuse: any HTTP/x.y version,
        # bare LF line ends, spaces after a chunk size, Content-Length next
        # to chunked (chunked wins, as in h11).
        parser.set_dangerous_leniencies(
            lenient_version=True,
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
            lenient_chunked_length=True,
        )
        self.no_body = head_request
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        # What the framing and keep-alive rules read, noted as headers come
        # (one pass over the header block): Connection values (lower-cased),
        # Transfer-Encoding values, the Content-Length value.
        self.connection = b""
        self.encodings: list[bytes] = []
        self.length: bytes | None = None
        self.headers_done = False
        self.status = 0
        self.interim = False
        self.complete = False
        self.extra = False
        self.error: httpcore.RemoteProtocolError | None = None
        self.keep_alive = False
        self.body: list[bytes] = []
        self.head_bytes = 0
        self.tail = b""

    def detach(self) -> None:
        """Drop the parser once the response is done with.

        The parser holds this object's bound methods (its callbacks) and
        this object holds the parser: a reference cycle, which only the
        cycle collector would free. One per request made CPython run a
        collection every ~70 requests (~11 us per request at concurrency
        50, benchmarks: profile); dropping the parser lets reference
        counting free both at once.
        """
        self.parser = None

    # -- llhttp's callbacks -----------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True  # a second response nobody asked for
            raise _Stop

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:  # trailers (after a chunked body) are ignored
            return
        # As h11 gives them: no trailing whitespace (llhttp keeps it),
        # Transfer-Encoding lower-cased, a repeated equal Content-Length once.
        value = value.rstrip(b" \t")
        lowered = name.lower()
        if lowered == b"connection":
            self.connection += b"," + value.lower()
        elif lowered == b"transfer-encoding":
            value = value.lower()
            self.encodings.append(value)
        elif lowered == b"content-length":
            if self.length == value:
                return
            self.length = value
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # called back by it
        status = parser.get_status_code()
        if status < 100:
            raise httpcore.RemoteProtocolError(f"malformed response: status {status}")
        if 100 <= status < 200 and status != 101:
            # An interim response: skipped, the final one follows.
            self.interim = True
            self.headers = []
            self.reason = b""
            self.connection = b""
            self.encodings = []
            self.length = None
            return
        self.status = status
        encodings = self.encodings
        if encodings and encodings != [b"chunked"]:
            # h11 knows one transfer coding, once; llhttp would read until close.
            raise httpcore.RemoteProtocolError(f"unsupported Transfer-Encoding {encodings!r}")
        self.headers_done = True
        self.keep_alive = self._persistent()
        if self.no_body:
            # llhttp does not know this response has no body (HEAD): with
            # neither length nor chunking it would wait for a close.
            self.complete = True
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True

    def _persistent(self) -> bool:
        """h11's rule: reusable unless ``Connection: close`` or a version below 1.1.

        (A body that runs until the server closes ends the connection too:
        the caller sees the close.)
        """
        if b"close" in self.connection:
            return False
        assert self.parser is not None  # called back by it
        return self.parser.get_http_version().encode() >= b"1.1"

    # -- feeding ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raise ``RemoteProtocolError`` on anything malformed.

        Stricter than llhttp where h11 is (the differential tests hold the
        two together): no empty line before the status line, a status of
        three digits from 100.
        """
        if not self.headers_done:
            if not self.head_bytes and data[:1] in (b"\r", b"\n"):
                raise httpcore.RemoteProtocolError("malformed response: empty line first")
            self.head_bytes += len(data)
        seen = b""
        if self.no_body:
            # The last bytes read, to tell where a HEAD response's head ends.
            seen = self.tail + data
            self.tail = seen[-4:]
        parser = self.parser
        if parser is None:  # pragma: no cover - a body is not read after it is closed
            raise httpcore.ReadError("the response was closed")
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if self.extra:
                return
            if self.no_body and self.complete:
                # Stopped at the end of a HEAD response's head: anything
                # after it in this read would be a body nobody may send.
                if not seen.endswith((b"\r\n\r\n", b"\n\n", b"\n\r\n")):
                    self.extra = True
                return
            cause = exc.__context__
            if isinstance(cause, httpcore.RemoteProtocolError):
                self._fail(cause)
            else:
                self._fail(httpcore.RemoteProtocolError(f"malformed response: {exc}"))
        except httptools.HttpParserUpgrade:
            # 101 Switching Protocols (only asked for with an Upgrade header,
            # which never takes this path): not a response we can go on from.
            self._fail(httpcore.RemoteProtocolError("unexpected protocol switch"))
        except httptools.HttpParserError as exc:
            self._fail(httpcore.RemoteProtocolError(f"malformed response: {exc}"))
        if not self.headers_done and self.head_bytes > MAX_HEAD_SIZE:
            raise httpcore.RemoteProtocolError("the response head is larger than 100 KiB")

    def _fail(self, error: httpcore.RemoteProtocolError) -> None:
        """Raise ``error`` now if the head is not complete; else after the body parsed so far.

        As with h11: a response whose head was good is returned, and its
        body fails where it goes wrong, after the bytes before that point.
        """
        if not self.headers_done:
            raise error
        self.error = error

    def framing_ends_with_close(self) -> bool:
        """True when the body runs until the server closes (no length, not chunked)."""
        if self.no_body or self.status in (204, 304) or self.length is not None:
            return False
        return not any(b"chunked" in value for value in self.encodings)


class _Body:
    """The response body: chunks as llhttp parsed them, read from the stream on demand.

    Memory is bounded by one read (64 KiB) plus the stream's own buffer. An
    iterator, not an async generator: asyncio registers every async
    generator with the loop on its first step (a weak set), a cost paid per
    response by every layer that wraps a body.
    """

    __slots__ = ("_conn", "_exchange", "_read_timeout")

    def __init__(
        self, conn: FastHTTP11Connection, exchange: _Exchange, read_timeout: float | None
    ) -> None:
        self._conn = conn
        self._exchange = exchange
        self._read_timeout = read_timeout

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        exchange = self._exchange
        while True:
            body = exchange.body
            if body:
                exchange.body = []
                return body[0] if len(body) == 1 else b"".join(body)
            if exchange.error is not None:
                raise exchange.error
            if exchange.complete:
                raise StopAsyncIteration
            await self._conn._read_into(exchange, self._read_timeout)

    async def aclose(self) -> None:
        await self._conn._response_closed(self._exchange)


class FastHTTP11Connection(httpcore.AsyncConnectionInterface):
    """HTTP/1.1 on httpcore's network stream, parsed by llhttp; see the module docstring."""

    def __init__(
        self,
        inner: httpcore.AsyncConnectionInterface,
        origin: httpcore.Origin,
        keepalive_expiry: float | None,
    ) -> None:
        # ``inner`` connects (httpcore's TLS, retries, socket options) and
        # hands over its stream; it never sends a request itself.
        self._inner = inner
        self._origin = origin
        self._keepalive_expiry = keepalive_expiry
        self._stream: httpcore.AsyncNetworkStream | None = None
        self._state = _NEW
        self._expire_at: float | None = None
        self._requests = 0
        self._keep_alive = False
        self._exchange: _Exchange | None = None

    # -- httpcore's connection interface ------------------------------------------

    def can_handle_request(self, origin: httpcore.Origin) -> bool:
        return origin == self._origin

    def is_available(self) -> bool:
        return self._state is _IDLE

    def has_expired(self) -> bool:
        if self._expire_at is not None and time.monotonic() > self._expire_at:
            return True
        stream = self._stream
        # Idle and readable: the server closed it or sent what nobody asked for.
        return (
            self._state is _IDLE
            and stream is not None
            and bool(stream.get_extra_info("is_readable"))
        )

    def is_idle(self) -> bool:
        return self._state is _IDLE

    def is_closed(self) -> bool:
        return self._state is _CLOSED

    def info(self) -> str:
        return (
            f"{self._origin!s}, HTTP/1.1 (hostpool), {self._state}, Request Count: {self._requests}"
        )

    def __repr__(self) -> str:
        return f"<FastHTTP11Connection [{self.info()}]>"

    async def aclose(self) -> None:
        """Close for good: the exchange in progress, if any, and the stream."""
        self._state = _CLOSED
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.detach()
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if not self.can_handle_request(request.url.origin):
            raise RuntimeError(
                f"Attempted to send request to {request.url.origin} on connection to {self._origin}"
            )
        status, headers, body, extensions = await self.exchange(
            request.method,
            request.url.target,
            request.headers,
            request.stream,
            request.extensions.get("timeout", {}),
            request,
        )
        return httpcore.Response(
            status=status, headers=headers, content=body, extensions=extensions
        )

    async def exchange(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        content: Any,
        timeouts: dict[str, float | None],
        connect_request: httpcore.Request | None,
    ) -> tuple[int, list[tuple[bytes, bytes]], _Body, dict[str, Any]]:
        """Send a request and read the response head: status, headers, body, extensions.

        The pool calls this directly with what ``httpx.Request`` holds (no
        ``httpcore.Request`` in between); :meth:`handle_async_request` is the
        same behind httpcore's interface. ``connect_request`` is what a new
        connection connects with (httpcore reads its timeouts and SNI); a
        connected one needs none. Raises httpcore's exceptions.
        """
        if self._state is not _IDLE and self._state is not _NEW:
            raise httpcore.ConnectionNotAvailable()
        if self._stream is None:
            if connect_request is None:  # pragma: no cover - the pool passes one when new
                raise httpcore.ConnectionNotAvailable()
            self._state = _ACTIVE
            try:
                self._stream = await connect_stream(self._inner, connect_request)
            except BaseException:
                self._state = _CLOSED
                raise
        self._state = _ACTIVE
        self._expire_at = None
        self._requests += 1
        exchange = _Exchange(method == b"HEAD")
        self._exchange = exchange
        try:
            keep_alive = await self._send(method, target, headers, content, timeouts.get("write"))
            read_timeout = timeouts.get("read")
            while not exchange.headers_done:
                await self._read_into(exchange, read_timeout)
        except BaseException:
            await self.aclose()
            raise
        self._keep_alive = keep_alive
        assert exchange.parser is not None  # detached when the body is closed
        extensions = {
            "http_version": b"HTTP/" + exchange.parser.get_http_version().encode(),
            "reason_phrase": exchange.reason,
            "network_stream": self._stream,
        }
        return exchange.status, exchange.headers, _Body(self, exchange, read_timeout), extensions

    # -- the exchange ---------------------------------------------------------------

    async def _send(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: Any,
        timeout: float | None,
    ) -> bool:
        """Write the request; return whether it allows keep-alive."""
        stream = self._stream
        assert stream is not None
        pending, keep_alive, chunked, length = _request_head(method, target, headers)
        # A body httpx holds in memory goes in the same write as the head;
        # any other is streamed as it comes, the head first (the server
        # may answer before the body ends, as with h11).
        # As h11 frames a request body: chunked, or exactly Content-Length
        # bytes (none without one).
        left = 0 if length is None else length
        if isinstance(body, httpx.ByteStream):
            data = b"".join(body)
            if data:
                if chunked:
                    pending += b"%x\r\n%b\r\n" % (len(data), data)
                elif len(data) > left:
                    raise httpcore.LocalProtocolError(_TOO_MUCH)
                else:
                    pending += data
                    left -= len(data)
            if chunked:
                pending += b"0\r\n\r\n"
            elif left:
                raise httpcore.LocalProtocolError(_TOO_LITTLE)
            await stream.write(pending, timeout)
            return keep_alive
        await stream.write(pending, timeout)
        chunks = body if hasattr(body, "__aiter__") else _AsIterator(body)
        async for chunk in chunks:
            if not chunk:
                continue
            if chunked:
                chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
            elif len(chunk) > left:
                raise httpcore.LocalProtocolError(_TOO_MUCH)
            else:
                left -= len(chunk)
            await stream.write(chunk, timeout)
        if chunked:
            await stream.write(b"0\r\n\r\n", timeout)
        elif left:
            raise httpcore.LocalProtocolError(_TOO_LITTLE)
        return keep_alive

    async def _read_into(self, exchange: _Exchange, timeout: float | None) -> None:
        """Read once from the stream and parse it; the server closing ends a close-framed body."""
        stream = self._stream
        if stream is None:
            raise httpcore.ReadError("the connection was closed")
        data = await stream.read(_READ_SIZE, timeout)
        if data:
            exchange.feed(data)
            return
        # The server closed the connection.
        self._keep_alive = False
        if exchange.headers_done and exchange.framing_ends_with_close():
            exchange.complete = True
            return
        if not exchange.headers_done and exchange.head_bytes == 0:
            raise httpcore.RemoteProtocolError("Server disconnected without sending a response.")
        raise httpcore.RemoteProtocolError(
            "peer closed connection without sending complete message body"
        )

    async def _response_closed(self, exchange: _Exchange) -> None:
        """The body was closed: keep the connection for the next request, or close it."""
        exchange.detach()
        if exchange is not self._exchange or self._state is not _ACTIVE:
            return
        self._exchange = None
        reusable = (
            exchange.complete and not exchange.extra and self._keep_alive and exchange.keep_alive
        )
        if not reusable:
            await self.aclose()
            return
        self._state = _IDLE
        if self._keepalive_expiry is not None:
            self._expire_at = time.monotonic() + self._keepalive_expiry


# RFC 9110's grammar as h11 writes it (h11/_abnf.py): a header name is a
# token; a value is visible characters or obs-text (anything but NUL and
# whitespace), with spaces and tabs only between them; a request target is
# visible ASCII.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_VALUE = rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?"
_HEAD = re.compile(
    _TOKEN + rb" [\x21-\x7e]+ HTTP/1\.1\r\n(?:" + _TOKEN + rb": " + _FIELD_VALUE + rb"\r\n)*\r\n"
)
_TOKEN_RE = re.compile(_TOKEN)
_VALUE_RE = re.compile(_FIELD_VALUE)


_DIGITS = re.compile(rb"[0-9]+")
_TOO_MUCH = "Too much data for declared Content-Length"
_TOO_LITTLE = "Too little data for declared Content-Length"


def _request_head(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[bytes, bool, bool, int | None]:
    """The request head as h11 writes it; whether it allows keep-alive, is chunked, its length.

    What httpx.AsyncClient sends through h11, or refuses to, with h11's
    words (``h11._headers.normalize_and_validate``, ``h11._events.Request``,
    ``h11._writers.write_headers``): every name a token and every value
    free of NUL, CR, LF and surrounding whitespace; one Content-Length
    (digits, at most 20; a list or a repetition of one value is written
    once), one Transfer-Encoding, and it ``chunked``; exactly one Host,
    written first; a method that is a token and a target of visible ASCII.
    The common case costs one pass over the headers, lower-casing only
    names as long as the four it looks for, and one pattern over the
    whole head; an error is then explained header by header, in h11's order.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    host: list[bytes] = []
    keep_alive = True
    chunked = False
    length: int | None = None
    seen_length: bytes | None = None
    lines = 0
    for index, (name, value) in enumerate(headers):
        size = len(name)
        if size == 4 or size == 10 or size == 14 or size == 17:
            lowered = name.lower()
            if lowered == b"host":
                host += (name, b": ", value, b"\r\n")
                lines += 1
                continue
            if lowered == b"connection":
                if b"close" in value.lower():
                    keep_alive = False
            elif lowered == b"content-length":
                _check_field(headers, index)
                lengths = {part.strip() for part in value.split(b",")}
                if len(lengths) != 1:
                    raise httpcore.LocalProtocolError("conflicting Content-Length headers")
                value = lengths.pop()
                if len(value) > 20 or _DIGITS.fullmatch(value) is None:
                    raise httpcore.LocalProtocolError("bad Content-Length")
                if seen_length is None:
                    seen_length = value
                    length = int(value)
                elif value != seen_length:
                    raise httpcore.LocalProtocolError("conflicting Content-Length headers")
                else:
                    continue  # the same length again: written once
            elif lowered == b"transfer-encoding":
                _check_field(headers, index)
                if chunked:
                    raise httpcore.LocalProtocolError("multiple Transfer-Encoding headers")
                value = value.lower()
                if value != b"chunked":
                    raise httpcore.LocalProtocolError(
                        "Only Transfer-Encoding: chunked is supported"
                    )
                chunked = True
        parts += (name, b": ", value, b"\r\n")
        lines += 1
    if host:
        parts[4:4] = host
    parts.append(b"\r\n")
    head = b"".join(parts)
    # The count of line ends is what tells a value holding CRLF + "Name:
    # value" (an injected header, which the pattern alone would take for
    # two good lines).
    if head.count(b"\n") != lines + 2 or _HEAD.fullmatch(head) is None or len(host) != 4:
        _check_field(headers, len(headers) - 1)
        if not host:
            raise httpcore.LocalProtocolError("Missing mandatory Host: header")
        if len(host) > 4:
            raise httpcore.LocalProtocolError("Found multiple Host: headers")
        if _TOKEN_RE.fullmatch(method) is None:
            raise httpcore.LocalProtocolError("Illegal method characters")
        raise httpcore.LocalProtocolError("Illegal target characters")
    return head, keep_alive, chunked, length


def _check_field(headers: list[tuple[bytes, bytes]], upto: int) -> None:
    """Raise h11's error for the first bad name or value among ``headers[: upto + 1]``."""
    for name, value in headers[: upto + 1]:
        if _TOKEN_RE.fullmatch(name) is None:
            raise httpcore.LocalProtocolError(f"Illegal header name {name!r}")
        if _VALUE_RE.fullmatch(value) is None:
            raise httpcore.LocalProtocolError(f"Illegal header value {value!r}")


class _AsIterator:
    """A sync iterable of body pieces, iterated with ``async for``."""

    __slots__ = ("_it",)

    def __init__(self, body: Any) -> None:
        self._it = iter(body)

    def __aiter__(self) -> _AsIterator:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk: bytes = next(self._it)
        except StopIteration:
            raise StopAsyncIteration from None
        return chunk

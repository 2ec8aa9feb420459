"""A small Redis client (RESP2) on anyio sockets: asyncio, uvloop and trio alike.

Fleet-wide quotas keep their counters in Redis, and the router runs under
asyncio, asyncio on uvloop and trio. redis-py's asyncio client does not run
on trio, and coredis wants ``async with client:`` (a task group) that a
router used lazily, from whatever task comes first, cannot provide. The
quota layer needs little: one command or one pipeline per round trip, a
bounded pool of connections, and exact behaviour under cancellation. That is
this module: no background tasks, no pub/sub, no RESP3.

Two invariants, kept by :meth:`RespClient._round_trip`:

- *In step*: a connection in the idle list has no request outstanding and no
  unread byte. It is parked only after every reply of its round trip has been
  read; anything that interrupts a round trip once it has started writing
  (an error, a timeout, a cancellation) closes the connection instead, since
  its replies would answer the next caller's commands.
- *Bounded*: connections open (idle + in use + connecting) <=
  ``max_connections``. Each round trip holds a slot of a semaphore of that
  size for its whole duration and uses one connection; a connection is opened
  only by a slot holder that found no idle one, and a connection goes back to
  the idle list (or is closed) *before* its slot is released.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import ssl
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import anyio
import anyio.abc

from .._loops import current_loop

__all__ = [
    "RedisAddress",
    "RedisConnectionError",
    "RedisError",
    "RedisReplyError",
    "Reply",
    "RespClient",
    "parse_redis_url",
]

logger = logging.getLogger("hostpool.redis")

#: What a command returns: simple strings and bulk strings are ``bytes``, a
#: null bulk string or null array is ``None``, arrays nest.
Reply: TypeAlias = int | bytes | list["Reply"] | None

#: What a command is made of: bytes as they are, str as UTF-8, numbers in decimal.
Arg: TypeAlias = bytes | str | int | float

_DEFAULT_PORT: Final = 6379
#: How much one read asks the socket for.
_READ_SIZE: Final = 65536


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class RedisError(Exception):
    """Base class of everything this client raises about Redis."""


class RedisReplyError(RedisError):
    """The server answered a command with an error reply (``-ERR ...``).

    ``kind`` is its first word (``"ERR"``, ``"NOSCRIPT"``, ``"WRONGTYPE"``),
    ``message`` its whole text. The connection stays usable: the reply was
    read to its end.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = message.split(" ", 1)[0]


class RedisConnectionError(RedisError):
    """No connection could be made, or it broke (or spoke garbage) mid-round-trip.

    The underlying error, if any, is the ``__cause__``. Whether a command
    whose connection broke was executed is unknown: the client never retries.
    """


class _ProtocolError(ValueError):
    """The server sent something that is not RESP2."""


# --------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisAddress:
    """Where a Redis server is and how to log in: what :func:`parse_redis_url` returns.

    A TCP address has ``host`` and ``port`` and no ``unix_path``; a Unix
    socket address has ``unix_path`` and neither of the others. The password
    is left out of the ``repr``.
    """

    host: str | None
    port: int | None
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    def describe(self) -> str:
        """Say where the server is, without credentials: for messages and logs."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


_DIGITS = re.compile(r"[0-9]+")
_BAD_HOST_CHARS = re.compile(r"[\s\x00-\x1f\x7f\\\[\]@/?#]")


def _mask(url: str) -> str:
    """Return ``url`` with its password (everything after ``user:``) as ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = len(rest)
    for stop in "/?#":
        found = rest.find(stop)
        if found >= 0:
            end = min(end, found)
    userinfo, at, hostport = rest[:end].rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    # Without a colon the part before '@' may well be a password: hide it all.
    masked = f"{user}:***" if colon else "***"
    return f"{scheme}{sep}{masked}@{hostport}{rest[end:]}"


def _bad(url: str, problem: str) -> ValueError:
    return ValueError(f"invalid Redis URL {_mask(url)!r}: {problem}")


def _parse_db(url: str, text: str, where: str) -> int:
    if _DIGITS.fullmatch(text):
        return int(text)
    if text.startswith("-") and _DIGITS.fullmatch(text[1:]):
        raise _bad(url, f"negative db {text} in the {where}")
    raise _bad(url, f"db must be a non-negative integer, not {text!r} (in the {where})")


def _parse_query(url: str, query: str) -> int | None:
    db: int | None = None
    for item in query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        if name != "db":
            raise _bad(url, f"unknown query parameter {name!r} (only db= is understood)")
        if db is not None:
            raise _bad(url, "db= given more than once in the query")
        db = _parse_db(url, urllib.parse.unquote(value), "query")
    return db


def _parse_host_port(url: str, hostport: str) -> tuple[str, int]:
    port_text: str | None
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise _bad(url, "'[' of an IPv6 host is never closed with ']'")
        host, after = hostport[1:close], hostport[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(url, f"{host!r} in brackets is not an IPv6 address") from None
        if after and not after.startswith(":"):
            raise _bad(url, f"unexpected {after!r} after the IPv6 host")
        port_text = after[1:] if after else None
    else:
        if hostport.count(":") > 1:
            raise _bad(url, "an IPv6 host goes in brackets, as in redis://[::1]:6379/0")
        host, colon, port_text = hostport.partition(":")
        if not colon:
            port_text = None
        if not host:
            raise _bad(url, "empty host")
        if _BAD_HOST_CHARS.search(host):
            raise _bad(url, f"bad host {host!r}")
    if port_text is None:
        return host, _DEFAULT_PORT
    if not _DIGITS.fullmatch(port_text):
        raise _bad(url, f"bad port {port_text!r}" if port_text else "empty port after ':'")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise _bad(url, f"port {port} out of range 1-65535")
    return host, port


def parse_redis_url(url: str) -> RedisAddress:
    """Parse a Redis URL; raise ``ValueError`` naming the URL and the problem.

    Accepted forms (the password masked as ``***`` in every message)::

        redis://[[user]:password@]host[:port][/db][?db=N]
        rediss://...                 (the same, over TLS)
        unix://[[user]:password@]/path/to.sock[?db=N]

    IPv6 hosts go in brackets (``redis://[::1]:6379/0``). The port defaults
    to 6379 and the db to 0. User and password are percent-decoded, so a
    ``/``, ``?``, ``#`` or ``@`` in them must be written ``%2F``, ``%3F``,
    ``%23``, ``%40``.
    """
    if not isinstance(url, str):
        raise TypeError(f"a Redis URL is a str, not {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise _bad(url, "no scheme (expected redis://, rediss:// or unix://)")
    scheme = scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise _bad(url, f"unknown scheme {scheme!r} (expected redis, rediss or unix)")
    if "#" in rest:
        raise _bad(url, "unexpected fragment ('#...')")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    path = slash + path
    userinfo, at, hostport = netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not colon:
            raise _bad(url, "credentials are user:password@ or :password@ (no ':' before '@')")
        if not secret:
            raise _bad(url, "empty password")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret)
    query_db = _parse_query(url, query)

    if scheme == "unix":
        if hostport:
            raise _bad(url, f"a unix:// URL has no host ({hostport!r}): write unix:///path")
        if path in ("", "/"):
            raise _bad(url, "empty socket path")
        return RedisAddress(
            host=None,
            port=None,
            unix_path=urllib.parse.unquote(path),
            db=query_db or 0,
            username=username,
            password=password,
        )

    host, port = _parse_host_port(url, hostport)
    path_db: int | None = None
    if path not in ("", "/"):
        segments = path[1:].split("/")
        if len(segments) > 1:
            raise _bad(url, f"extra path segments after the db in {path!r}")
        path_db = _parse_db(url, segments[0], "path")
    if path_db is not None and query_db is not None:
        raise _bad(url, "db given both in the path and in the query")
    return RedisAddress(
        host=host,
        port=port,
        db=query_db if query_db is not None else path_db or 0,
        username=username,
        password=password,
        tls=scheme == "rediss",
    )


# --------------------------------------------------------------------------
# The wire: request encoding and the reply parser
# --------------------------------------------------------------------------


def _arg_bytes(arg: object) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool):  # an int, but "True" is never what was meant
        raise TypeError("a Redis argument is bytes, str, int or float, not bool")
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    if isinstance(arg, (bytearray, memoryview)):
        return bytes(arg)
    raise TypeError(f"a Redis argument is bytes, str, int or float, not {type(arg).__name__}")


def _encode(commands: Iterable[Sequence[Arg]]) -> bytes:
    """Encode commands as RESP arrays of bulk strings, all in one ``bytes``."""
    parts: list[bytes] = []
    for command in commands:
        if isinstance(command, (str, bytes)):
            raise TypeError(f"a command is a sequence of arguments, not {command!r}")
        if not command:
            raise ValueError("empty command")
        parts.append(b"*%d\r\n" % len(command))
        for arg in command:
            data = _arg_bytes(arg)
            parts.append(b"$%d\r\n" % len(data))
            parts.append(data)
            parts.append(b"\r\n")
    return b"".join(parts)


class _Incomplete:
    """The buffer ends before the reply does: read more."""


_INCOMPLETE: Final = _Incomplete()


class _Reader:
    """An incremental RESP2 parser over the bytes one connection received.

    ``next_reply`` either returns one whole reply or :data:`_INCOMPLETE`,
    consuming nothing it cannot finish: a value is taken from the buffer
    whole or not at all, and arrays under construction stay on a stack, so a
    reply that arrives in many reads is parsed once, not again per read.
    """

    __slots__ = ("_buffer", "_error", "_pos", "_stack")

    def __init__(self) -> None:
        self._buffer = bytearray()
        # Start of the first byte not parsed yet.
        self._pos = 0
        # Arrays being filled, innermost last: (items so far, length announced).
        self._stack: list[tuple[list[Reply], int]] = []
        # The first error reply met inside the array being built: the whole
        # reply becomes that error (see RespClient.execute).
        self._error: RedisReplyError | None = None

    def feed(self, data: bytes) -> None:
        """Append received bytes, dropping the ones already parsed."""
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    def pending(self) -> bool:
        """Tell whether any byte or part of a reply is waiting."""
        return self._pos < len(self._buffer) or bool(self._stack)

    def _integer(self, start: int, end: int) -> int:
        try:
            return int(self._buffer[start:end])
        except ValueError:
            raise _ProtocolError(f"bad integer {bytes(self._buffer[start:end])!r}") from None

    def next_reply(self) -> Reply | RedisReplyError | _Incomplete:
        """Parse the next whole reply from the buffer, or say it is incomplete."""
        buf = self._buffer
        while True:
            pos = self._pos
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return _INCOMPLETE
            marker = buf[pos]
            value: Reply | RedisReplyError
            if marker == 0x24:  # '$' bulk string
                length = self._integer(pos + 1, end)
                if length >= 0:
                    start = end + 2
                    stop = start + length
                    if len(buf) < stop + 2:
                        return _INCOMPLETE
                    if buf[stop : stop + 2] != b"\r\n":
                        raise _ProtocolError(f"bulk string of {length} bytes not ended by CRLF")
                    value = bytes(buf[start:stop])
                    end = stop
                elif length == -1:
                    value = None
                else:
                    raise _ProtocolError(f"bulk string length {length}")
            elif marker == 0x2B:  # '+' simple string
                value = bytes(buf[pos + 1 : end])
            elif marker == 0x3A:  # ':' integer
                value = self._integer(pos + 1, end)
            elif marker == 0x2D:  # '-' error
                value = RedisReplyError(buf[pos + 1 : end].decode("utf-8", "replace"))
            elif marker == 0x2A:  # '*' array
                length = self._integer(pos + 1, end)
                self._pos = end + 2
                if length > 0:
                    self._stack.append(([], length))
                    continue
                if length < -1:
                    raise _ProtocolError(f"array length {length}")
                value = [] if length == 0 else None
            else:
                raise _ProtocolError(f"unexpected reply type byte {bytes([marker])!r}")
            self._pos = end + 2

            # Put the value in the innermost open array; each array it fills
            # is in turn a value of the array around it.
            while self._stack:
                items, length = self._stack[-1]
                if isinstance(value, RedisReplyError):
                    if self._error is None:
                        self._error = value
                    value = None
                items.append(value)
                if len(items) < length:
                    break  # this array wants more items: parse on
                self._stack.pop()
                value = items
            else:
                if self._pos == len(buf):
                    buf.clear()
                    self._pos = 0
                if self._error is not None:
                    value, self._error = self._error, None
                return value


# --------------------------------------------------------------------------
# Connections and the client
# --------------------------------------------------------------------------


#: What a broken socket raises, across backends (TLS errors are OSErrors).
_IO_ERRORS: Final = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


class _Connection:
    """One socket to the server, with the parser of what it received."""

    __slots__ = ("loop", "reader", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, loop: object) -> None:
        self.stream = stream
        self.loop = loop
        self.reader = _Reader()

    async def round_trip(self, payload: bytes, count: int) -> list[Reply | RedisReplyError]:
        """Send ``payload`` in one write, then read ``count`` replies."""
        await self.stream.send(payload)
        reader = self.reader
        replies: list[Reply | RedisReplyError] = []
        for _ in range(count):
            reply = reader.next_reply()
            while isinstance(reply, _Incomplete):
                reader.feed(await self.stream.receive(_READ_SIZE))
                reply = reader.next_reply()
            replies.append(reply)
        return replies

    async def close(self) -> None:
        """Close the socket at once, shielded: a cancelled caller must not leak it.

        A forced close does not wait for the peer (no TLS close_notify), so the
        shield cannot hold the caller up.
        """
        with anyio.CancelScope(shield=True):
            try:
                await anyio.aclose_forcefully(self.stream)
            except Exception:  # pragma: no cover - closing is best effort
                logger.debug("error closing a Redis connection", exc_info=True)


class RespClient:
    """A pool of RESP2 connections to one Redis server; see the module docstring.

    No I/O happens until the first command. ``connect_timeout`` bounds
    opening a connection, AUTH and SELECT included; a command itself is
    bounded by the caller's cancel scope (``anyio.fail_after``), and callers
    wait first come, first served while all ``max_connections`` are busy.

    The client may be used by any number of tasks of one event loop at a
    time; used from another loop (a new ``anyio.run``, a test on another
    backend) it forgets the idle connections of the old one, without closing
    them (their sockets belong to that loop).
    """

    def __init__(
        self, url: str, *, max_connections: int = 16, connect_timeout: float = 1.0
    ) -> None:
        self.address = parse_redis_url(url)
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise TypeError(f"max_connections must be an int, not {type(max_connections).__name__}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)):
            raise TypeError(
                f"connect_timeout must be a number of seconds, not {type(connect_timeout).__name__}"
            )
        if not 0 < connect_timeout < math.inf:
            raise ValueError(
                f"connect_timeout must be a positive, finite number of seconds, "
                f"not {connect_timeout!r}"
            )
        self.max_connections = max_connections
        self.connect_timeout = float(connect_timeout)
        self._where = self.address.describe()
        # Sent on every new connection, before its first command.
        setup: list[list[Arg]] = []
        if self.address.password is not None:
            auth: list[Arg] = ["AUTH", self.address.password]
            if self.address.username is not None:
                auth.insert(1, self.address.username)
            setup.append(auth)
        if self.address.db:
            setup.append(["SELECT", self.address.db])
        self._setup = _encode(setup)
        self._setup_count = len(setup)
        self._ssl_context: ssl.SSLContext | None = None
        # Idle connections, most recently used last (LIFO): all made on _loop.
        self._idle: list[_Connection] = []
        # The loop the idle connections and the semaphore belong to.
        self._loop: object = None
        self._slots: anyio.Semaphore | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"idle={len(self._idle)}"
        return f"<RespClient {self._where} db={self.address.db} {state}>"

    async def __aenter__(self) -> RespClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def execute(self, *args: Arg) -> Reply:
        """Run one command in one round trip and return its reply.

        Raises :class:`RedisReplyError` for an error reply (also one nested in
        an array, as a script or ``EXEC`` may return), and
        :class:`RedisConnectionError` when the server cannot be reached or
        the connection breaks.
        """
        payload = _encode((args,))
        (reply,) = await self._round_trip(payload, 1)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Reply | RedisReplyError]:
        """Send every command in one write and return their replies, in order.

        An error reply is returned in its command's place, not raised (an
        array holding an error reply is returned as that error); a broken
        connection raises :class:`RedisConnectionError` for the whole
        pipeline, and then which commands ran is unknown.
        """
        payload = _encode(commands)
        if not payload:
            if self._closed:
                raise RedisConnectionError("client closed")
            return []
        return await self._round_trip(payload, len(commands))

    async def aclose(self) -> None:
        """Close every idle connection; the ones in use close when their round trip ends.

        Idempotent. Every later command raises ``RedisConnectionError``.
        """
        self._closed = True
        idle, self._idle = self._idle, []
        if idle and self._loop is current_loop():
            for conn in idle:
                await conn.close()

    def _slots_for_this_loop(self) -> anyio.Semaphore:
        """Return the semaphore of the running loop, forgetting another loop's pool."""
        if self._closed:
            raise RedisConnectionError("client closed")
        loop = current_loop()
        if loop is not self._loop or self._slots is None:
            # Their sockets belong to the other loop: they cannot even be
            # closed from here. Forgotten, they close when collected.
            self._idle = []
            self._loop = loop
            self._slots = anyio.Semaphore(self.max_connections, fast_acquire=True)
        return self._slots

    async def _round_trip(self, payload: bytes, count: int) -> list[Reply | RedisReplyError]:
        """Send ``payload`` on a connection of the pool and read ``count`` replies.

        Keeps the two invariants of the module docstring: the connection
        goes back to the idle list only after a round trip read every reply,
        and before the slot is released.
        """
        async with self._slots_for_this_loop():
            if self._closed:  # closed while this call waited for a slot
                raise RedisConnectionError("client closed")
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                replies = await conn.round_trip(payload, count)
            except _IO_ERRORS as exc:
                await conn.close()
                # The server went away, most likely: the connections parked
                # before this one are as dead, and each would fail a caller.
                await self._close_idle()
                if isinstance(exc, anyio.EndOfStream):
                    raise RedisConnectionError(f"{self._where} closed the connection") from exc
                raise RedisConnectionError(
                    f"connection to {self._where} failed: {type(exc).__name__}: {exc}"
                ) from exc
            except _ProtocolError as exc:
                await conn.close()
                raise RedisConnectionError(f"protocol error from {self._where}: {exc}") from exc
            except BaseException:
                # Cancelled (or failed) after writing may have started: the
                # replies still on their way would answer the next caller.
                await conn.close()
                raise
            if self._closed or conn.loop is not self._loop or conn.reader.pending():
                await conn.close()
            else:
                self._idle.append(conn)
        return replies

    async def _close_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    async def _connect(self) -> _Connection:
        """Open a connection, log in and select the db, all within ``connect_timeout``."""
        address = self.address
        try:
            with anyio.fail_after(self.connect_timeout):
                stream: anyio.abc.ByteStream
                if address.unix_path is not None:
                    stream = await anyio.connect_unix(address.unix_path)
                else:
                    assert address.host is not None
                    assert address.port is not None
                    if not address.tls:
                        stream = await anyio.connect_tcp(address.host, address.port)
                    else:
                        if self._ssl_context is None:
                            self._ssl_context = ssl.create_default_context()
                        stream = await anyio.connect_tcp(
                            address.host,
                            address.port,
                            tls=True,
                            ssl_context=self._ssl_context,
                            # No close_notify: a close never waits for the peer.
                            tls_standard_compatible=False,
                        )
                conn = _Connection(stream, self._loop)
                try:
                    if self._setup_count:
                        replies = await conn.round_trip(self._setup, self._setup_count)
                        for reply in replies:
                            if isinstance(reply, RedisReplyError):
                                raise RedisConnectionError(
                                    f"{self._where} refused the login or the db: {reply}"
                                ) from reply
                except BaseException:
                    await conn.close()
                    raise
        except TimeoutError as exc:
            raise RedisConnectionError(
                f"timed out connecting to {self._where} "
                f"(connect_timeout={self.connect_timeout:g} s)"
            ) from exc
        except _IO_ERRORS as exc:
            raise RedisConnectionError(
                f"cannot connect to {self._where}: {type(exc).__name__}: {exc}"
            ) from exc
        except _ProtocolError as exc:
            raise RedisConnectionError(f"protocol error from {self._where}: {exc}") from exc
        return conn

"""A loopback TCP server that answers each request with the next *scripted* reply.

For differential tests of HTTP/1.1 response parsing: the test decides every
byte the client receives, and where the stream is cut. Like
``tests/upstream.py`` it runs outside the test's event loop (here: plain
threads and blocking sockets), so it works under asyncio, uvloop and trio.

Per accepted connection, a thread reads requests (the head up to CRLFCRLF,
then a body by ``Content-Length`` or chunked) and answers each with the next
:class:`Reply` of the script loaded with :meth:`ScriptedServer.load` (one
script for the whole server: the n-th request read, on whichever connection,
gets the n-th reply). A reply is a list of byte chunks, each written with one
``sendall`` on a ``TCP_NODELAY`` socket, with a short pause between chunks so
that the client really receives them split at those boundaries; then the
connection is kept for the next request, closed, half-closed
(``shutdown(SHUT_WR)``) or stalled.

Every request read is recorded (:class:`RequestSeen`) with the id of its
connection, so a test can tell whether the client sent its next request on
the same connection. All public methods are thread-safe.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import anyio

__all__ = ["UNSCRIPTED_REPLY", "Reply", "RequestSeen", "ScriptedServer"]

#: What the server does once a reply is written: ``keep`` reads the next
#: request on the connection; ``close`` closes the socket; ``shutdown`` sends
#: FIN (``shutdown(SHUT_WR)``) and waits for the client to close; ``stall``
#: writes nothing more and waits for the client to close.
After = Literal["keep", "close", "shutdown", "stall"]

#: Written (then the connection is closed) for a request beyond the script.
UNSCRIPTED_REPLY = b"HTTP/1.1 599 Unscripted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

_READ_SIZE = 65536
_MAX_REQUEST_HEAD = 64 * 1024
_STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class Reply:
    """One scripted answer: ``chunks`` written one ``sendall`` each, then ``after``."""

    chunks: tuple[bytes, ...]
    after: After = "keep"
    #: Seconds between two chunks; None: the server's default.
    pause: float | None = None

    @classmethod
    def of(cls, data: bytes, cuts: Iterable[int] = (), **kwargs: object) -> Reply:
        """Split ``data`` at the offsets ``cuts`` (out-of-range and duplicate cuts ignored)."""
        points = sorted({c for c in cuts if 0 < c < len(data)})
        bounds = [0, *points, len(data)]
        chunks = tuple(data[a:b] for a, b in itertools.pairwise(bounds) if b > a)
        return cls(chunks=chunks, **kwargs)  # type: ignore[arg-type]

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


@dataclass(frozen=True)
class RequestSeen:
    """A request as the server read it."""

    index: int
    """Its position among the requests read since the script was loaded."""
    conn_id: int
    """The server-wide id of the TCP connection it came on (1, 2, ...)."""
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = field(repr=False)


class _PeerGone(Exception):
    """The client closed the connection (or it broke) while we were reading."""


class _BadRequest(Exception):
    """The client sent something that is not an HTTP/1.x request."""


class _Conn:
    """One accepted connection with its own read buffer."""

    def __init__(self, sock: socket.socket, conn_id: int, generation: int) -> None:
        self.sock = sock
        self.conn_id = conn_id
        self.generation = generation
        self.buf = bytearray()

    def _fill(self) -> None:
        try:
            data = self.sock.recv(_READ_SIZE)
        except OSError as exc:
            raise _PeerGone(str(exc)) from None
        if not data:
            raise _PeerGone("EOF")
        self.buf += data

    def read_until(self, marker: bytes, limit: int) -> bytes:
        while (idx := self.buf.find(marker)) < 0:
            if len(self.buf) > limit:
                raise _BadRequest(f"no {marker!r} within {limit} bytes")
            self._fill()
        data = bytes(self.buf[:idx])
        del self.buf[: idx + len(marker)]
        return data

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_request(self) -> tuple[str, str, list[tuple[str, str]], bytes] | None:
        """The next request (method, target, headers, body); None if the client closed."""
        while self.buf[:2] == b"\r\n":
            del self.buf[:2]
        if not self.buf:
            try:
                self._fill()
            except _PeerGone:
                return None
        head = self.read_until(b"\r\n\r\n", _MAX_REQUEST_HEAD)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(f"bad request line {lines[0]!r}")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name:
                raise _BadRequest(f"bad header line {line!r}")
            headers.append((name, value.strip()))
        fields = {k.lower(): v for k, v in headers}
        if "chunked" in fields.get("transfer-encoding", "").lower():
            parts_read: list[bytes] = []
            while True:
                size = int(self.read_until(b"\r\n", 1024).split(b";")[0].strip(), 16)
                if size == 0:
                    while self.read_until(b"\r\n", _MAX_REQUEST_HEAD):  # trailers
                        pass
                    break
                parts_read.append(self.read_exact(size))
                self.read_exact(2)
            body = b"".join(parts_read)
        else:
            body = self.read_exact(int(fields.get("content-length", "0")))
        return parts[0], parts[1], headers, body

    def drain_until_eof(self) -> None:
        """Read and discard until the client closes (or the server stops)."""
        try:
            while True:
                self.buf.clear()
                self._fill()
        except _PeerGone:
            pass


class ScriptedServer:
    """Loopback server answering requests from a script; see the module docstring.

    Create with :meth:`start`, always :meth:`stop` (or use ``with``).
    """

    def __init__(self, listener: socket.socket, pause: float) -> None:
        """Internal: use :meth:`start`."""
        self._listener = listener
        self.host, self.port = listener.getsockname()[:2]
        self.pause = pause
        self._lock = threading.Lock()
        self._conn_ids = itertools.count(1)
        self._generation = 0
        self._script: list[Reply] = []
        self._next = 0
        self._log: list[RequestSeen] = []
        self._replied = 0
        self._unscripted = 0
        self._accepted = 0
        self._errors: list[str] = []
        self._socks: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"scripted-accept-{self.port}", daemon=True
        )

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def start(cls, host: str = "127.0.0.1", *, pause: float = 0.001) -> ScriptedServer:
        """Listen on ``host`` (an ephemeral port); ``pause``: default seconds between chunks."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, 0))
            listener.listen(128)
            # accept() wakes up now and then to notice stop().
            listener.settimeout(0.05)
        except BaseException:
            listener.close()
            raise
        server = cls(listener, pause)
        server._acceptor.start()
        return server

    def stop(self) -> None:
        """Close every socket and join every thread. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        # Wake accept() at once rather than at its next timeout.
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 1.0):
            pass
        self._acceptor.join(_STOP_TIMEOUT)
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
            threads = list(self._threads)
        for sock in socks:
            # Wakes a thread blocked in recv() on it.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + _STOP_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads) or self._acceptor.is_alive():
            raise RuntimeError("scripted server threads did not stop")

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    # ------------------------------------------------------------------ script

    def load(self, replies: Iterable[Reply]) -> None:
        """Start a new script: forget the request log and every count.

        Connections accepted before the call never take a reply of the new
        script (a request on one is not answered and the connection is closed).
        """
        with self._lock:
            self._generation += 1
            self._script = list(replies)
            self._next = 0
            self._log = []
            self._replied = 0
            self._unscripted = 0
            self._accepted = 0
            self._errors = []

    def requests(self) -> list[RequestSeen]:
        """The requests read since the script was loaded, in the order read."""
        with self._lock:
            return list(self._log)

    def by_connection(self) -> dict[int, list[RequestSeen]]:
        """The requests read since the script was loaded, per connection id."""
        conns: dict[int, list[RequestSeen]] = {}
        for request in self.requests():
            conns.setdefault(request.conn_id, []).append(request)
        return conns

    @property
    def replied(self) -> int:
        """Replies of the script done: written (or failed) and the ``after`` step taken."""
        with self._lock:
            return self._replied

    @property
    def unscripted(self) -> int:
        """Requests read beyond the end of the script (answered with a 599, then closed)."""
        with self._lock:
            return self._unscripted

    @property
    def accepted(self) -> int:
        """Connections accepted since the script was loaded."""
        with self._lock:
            return self._accepted

    @property
    def errors(self) -> list[str]:
        """Requests the server could not parse (a harness bug: the clients are httpx)."""
        with self._lock:
            return list(self._errors)

    @property
    def settled(self) -> bool:
        """Every scripted reply taken so far is done (see :attr:`replied`)."""
        with self._lock:
            return self._replied >= self._next

    async def wait_settled(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait (on any async backend) until :attr:`settled`; TimeoutError otherwise.

        Once a client holds the outcome of its request, this makes sure the
        server is done with the reply too (a ``close`` has happened), so the
        client's next request sees the connection in its final state.
        """
        deadline = time.monotonic() + timeout
        while not self.settled:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the server finished {self.replied} of {self._next} replies within "
                    f"{timeout}s; requests seen: {self.requests()}"
                )
            await anyio.sleep(0.0005)

    # ----------------------------------------------------------------- serving

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._stopping.is_set():
                sock.close()
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = _Conn(sock, next(self._conn_ids), self._generation)
                self._accepted += 1
                self._socks.add(sock)
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name=f"scripted-conn-{conn.conn_id}"
                )
                thread.daemon = True
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: _Conn) -> None:
        try:
            self._serve_requests(conn)
        except (_PeerGone, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.sock.close()
            with self._lock:
                self._socks.discard(conn.sock)
                self._threads.discard(threading.current_thread())

    def _serve_requests(self, conn: _Conn) -> None:
        while not self._stopping.is_set():
            try:
                request = conn.read_request()
            except (_BadRequest, ValueError) as exc:
                with self._lock:
                    self._errors.append(str(exc))
                return
            if request is None:
                return
            method, target, headers, body = request
            with self._lock:
                if conn.generation != self._generation:
                    return  # a connection of an earlier script
                self._log.append(
                    RequestSeen(
                        index=len(self._log),
                        conn_id=conn.conn_id,
                        method=method,
                        target=target,
                        headers=tuple(headers),
                        body=body,
                    )
                )
                if self._next < len(self._script):
                    reply: Reply | None = self._script[self._next]
                    self._next += 1
                else:
                    reply = None
                    self._unscripted += 1
            if reply is None:
                with contextlib.suppress(OSError):
                    conn.sock.sendall(UNSCRIPTED_REPLY)
                return
            if not self._write(conn, reply):
                return

    def _write(self, conn: _Conn, reply: Reply) -> bool:
        """Write ``reply``, take its ``after`` step, count it done; True to read on."""
        pause = self.pause if reply.pause is None else reply.pause
        sock = conn.sock
        done = False
        try:
            for i, chunk in enumerate(reply.chunks):
                if i and pause:
                    time.sleep(pause)
                sock.sendall(chunk)
            if reply.after == "keep":
                return True
            if reply.after == "close":
                sock.close()
                return False
            if reply.after == "shutdown":
                sock.shutdown(socket.SHUT_WR)
            # "shutdown" and "stall": the reply is done; the client closes its
            # end when it is done with the connection.
            self._count_done()
            done = True
            conn.drain_until_eof()
            return False
        except OSError:
            return False  # the client gave up on the connection
        finally:
            if not done:
                self._count_done()

    def _count_done(self) -> None:
        with self._lock:
            self._replied += 1

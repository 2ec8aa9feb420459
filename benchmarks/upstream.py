"""A minimal HTTP/1.1 keep-alive upstream, run in its own process.

Standard library only, so it starts fast and runs as a plain script::

    python benchmarks/upstream.py --listen 127.0.0.1 --listen 127.0.0.2 --many 1000

It prints one JSON line with the ports it bound, then serves until its stdin
is closed (the parent exited) or ``--max-seconds`` pass, whichever is first.
Every address must be a loopback address: the benchmarks never reach out.

Routes (the request target, the method is ignored):

- ``/delay?ms=500``: answer after ``ms`` milliseconds;
- ``/bytes?n=10485760``: answer at once with a body of ``n`` bytes (``x``),
  written in 256 KiB slices as the socket drains (the transport's flow
  control), so the upstream never copies the whole body;
- anything else: answer at once.

Every other answer is ``200`` with the two-byte body ``ok``. Keep-alive follows
HTTP/1.1 (``Connection: close`` closes after the answer). Request bodies with
``Content-Length`` are skipped; clients here only send ``GET``.

:class:`Upstream` starts and stops that process from the benchmark process and
reads its CPU time from ``/proc``, to show the upstream is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["Upstream", "raise_fd_limit"]

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
_OK_CLOSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\nok"
)
_MAX_HEAD = 64 * 1024
_MAX_BODY = 1 << 30  # /bytes?n= is capped at 1 GiB
_SLICE = 256 * 1024  # a large body is written this much at a time
_BODIES: dict[int, bytes] = {}  # n -> n bytes of b"x", built once per size
_BACKLOG = 4096
_START_TIMEOUT = 60.0


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; return the new limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux/macOS
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class _HTTPProtocol(asyncio.Protocol):
    """One keep-alive connection: parse request heads, answer in order."""

    __slots__ = ("_body", "_buf", "_busy", "_close_after", "_loop", "_paused", "_transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buf = b""
        self._busy = False  # a delayed answer is pending; later requests wait
        self._transport: asyncio.Transport | None = None
        self._body: memoryview | None = None  # what is left of a large body
        self._close_after = False
        self._paused = False  # the transport's write buffer is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._body = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._body is not None:
            self._write_body()

    def data_received(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data
        self._process()

    def _process(self) -> None:
        transport = self._transport
        while not self._busy and transport is not None:
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    transport.close()
                return
            head = buf[:end].lower()
            rest = buf[end + 4 :]
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else None])
                if len(rest) < length:
                    return
                rest = rest[length:]
            self._buf = rest
            close = b"\r\nconnection: close" in head
            first = head[: head.find(b"\r\n")] if b"\r\n" in head else head
            target = first.split(b" ", 2)[1] if first.count(b" ") >= 1 else b"/"
            if target.startswith(b"/delay"):
                self._busy = True
                self._loop.call_later(_delay_ms(target) / 1000.0, self._answer_late, close)
                return
            if target.startswith(b"/bytes"):
                self._busy = True
                self._start_body(_body_size(target), close)
                return
            self._answer(close)
            transport = self._transport

    def _answer(self, close: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if close:
            transport.write(_OK_CLOSE)
            transport.close()
            self._transport = None
        else:
            transport.write(_OK)

    def _answer_late(self, close: bool) -> None:
        self._busy = False
        self._answer(close)
        if self._buf:
            self._process()

    def _start_body(self, size: int, close: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        body = _BODIES.get(size)
        if body is None:
            body = _BODIES[size] = b"x" * size
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (size, b"Connection: close\r\n" if close else b"")
        )
        transport.write(head)
        self._body = memoryview(body)
        self._close_after = close
        self._write_body()

    def _write_body(self) -> None:
        """Write slices of the body while the transport takes them; the rest on resume."""
        transport = self._transport
        body = self._body
        while body is not None and transport is not None and not self._paused:
            if not body:
                self._body = None
                self._busy = False
                if self._close_after:
                    transport.close()
                    self._transport = None
                elif self._buf:
                    self._process()
                return
            transport.write(body[:_SLICE])
            body = self._body = body[_SLICE:]


def _query_number(target: bytes, key: bytes) -> float:
    query = target.partition(b"?")[2]
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if name == key:
            try:
                return max(0.0, float(value))
            except ValueError:
                return 0.0
    return 0.0


def _delay_ms(target: bytes) -> float:
    return _query_number(target, b"ms")


def _body_size(target: bytes) -> int:
    return min(int(_query_number(target, b"n")), _MAX_BODY)


def _check_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing to listen on {host}: benchmarks use loopback only")


async def _serve(hosts: list[str], many: int, many_host: str, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []

    def factory() -> asyncio.Protocol:
        return _HTTPProtocol(loop)

    ports: dict[str, int] = {}
    for host in hosts:
        server = await loop.create_server(factory, host, 0, backlog=_BACKLOG)
        servers.append(server)
        ports[host] = server.sockets[0].getsockname()[1]
    many_ports: list[int] = []
    for _ in range(many):
        server = await loop.create_server(factory, many_host, 0, backlog=128)
        servers.append(server)
        many_ports.append(server.sockets[0].getsockname()[1])
    ready = {"pid": os.getpid(), "ports": ports, "many_host": many_host, "many": many_ports}
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()

    # Serve until the parent closes our stdin (or dies), bounded by max_seconds.
    stop = loop.create_future()

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096) and not stop.done():
            stop.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop, timeout=max_seconds)
    for listener in servers:
        listener.close()


def main(argv: list[str] | None = None) -> None:
    """Run the upstream server (the entry point of the child process)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", action="append", default=[], help="loopback address")
    parser.add_argument("--many", type=int, default=0, help="extra listeners, one port each")
    parser.add_argument("--many-host", default="127.0.0.1")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)
    hosts = args.listen or ["127.0.0.1"]
    for host in [*hosts, args.many_host]:
        _check_loopback(host)
    raise_fd_limit()
    asyncio.run(_serve(hosts, args.many, args.many_host, args.max_seconds))


class Upstream:
    """The upstream server process, seen from the benchmark process.

    >>> with Upstream(["127.0.0.1"]) as up:  # doctest: +SKIP
    ...     url = up.url("127.0.0.1", "/")
    """

    def __init__(self, hosts: list[str], *, many: int = 0, max_seconds: float = 3600.0) -> None:
        self.hosts = hosts
        self.many = many
        self.max_seconds = max_seconds
        self.ports: dict[str, int] = {}
        self.many_host = "127.0.0.1"
        self.many_ports: list[int] = []
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Upstream:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the process and wait (bounded) until it has bound every port."""
        cmd = [sys.executable, str(Path(__file__).resolve())]
        for host in self.hosts:
            cmd += ["--listen", host]
        cmd += ["--many", str(self.many), "--max-seconds", str(self.max_seconds)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._proc = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + _START_TIMEOUT
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                self.stop()
                raise RuntimeError("the upstream process did not start")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    continue
                line += chunk
        info: dict[str, Any] = json.loads(line)
        self.ports = {str(k): int(v) for k, v in info["ports"].items()}
        self.many_host = str(info["many_host"])
        self.many_ports = [int(p) for p in info["many"]]

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def url(self, host: str, path: str = "/") -> str:
        """Return the URL of ``path`` on the listener of ``host``."""
        return f"http://{host}:{self.ports[host]}{path}"

    def many_urls(self, count: int, path: str = "/") -> list[str]:
        """Return one URL per distinct port, for the first ``count`` extra listeners."""
        if count > len(self.many_ports):
            raise ValueError(f"only {len(self.many_ports)} extra listeners, asked for {count}")
        return [f"http://{self.many_host}:{p}{path}" for p in self.many_ports[:count]]

    def cpu_seconds(self) -> float | None:
        """Return the CPU time (user + system) the upstream has used, or None off Linux."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        # Fields 14 and 15 of /proc/<pid>/stat (utime, stime); we split after "comm)".
        return (int(fields[11]) + int(fields[12])) / ticks

    def stop(self) -> None:
        """Close the process's stdin, so it exits; kill it if it does not within 5 s."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    main()

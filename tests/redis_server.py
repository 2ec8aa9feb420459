"""A real ``redis-server`` on loopback, started, stopped and killed by the tests.

:meth:`RedisServer.start` runs the binary (``$HOSTPOOL_REDIS_SERVER``, or
``redis-server`` on the ``PATH``) as a child process, in the foreground,
without persistence, on a free port of ``127.0.0.1``, and returns once it
answers ``PING``. Its log goes to ``<directory>/redis-<port>.log`` and is
quoted when it fails to start.

:meth:`RedisServer.command` is a tiny synchronous RESP client for test
assertions. It opens a new connection per call (so it keeps working across a
:meth:`~RedisServer.restart`, and counts in the server's
``total_connections_received``), logs in when the server was started with
``--requirepass`` and selects ``db`` first if asked. Error replies raise
:class:`RedisCommandError`.

Nothing here imports ``hostpool``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["RedisCommandError", "RedisServer", "free_port", "redis_server_binary"]

#: How long a server may take to answer its first PING (and a restart to rebind).
START_TIMEOUT = 5.0
#: How long a SIGTERM may take before the server is killed.
STOP_TIMEOUT = 10.0


def redis_server_binary() -> str | None:
    """Return the redis-server to run: ``$HOSTPOOL_REDIS_SERVER`` if set, else the PATH's.

    None when there is none (or ``$HOSTPOOL_REDIS_SERVER`` names nothing executable).
    """
    configured = os.environ.get("HOSTPOOL_REDIS_SERVER")
    if configured:
        return shutil.which(configured)
    return shutil.which("redis-server")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port of ``host`` that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisCommandError(Exception):
    """An error reply to :meth:`RedisServer.command`."""


class _PortInUse(Exception):
    """redis-server could not bind its port."""


def _encode(args: Sequence[object]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            data = repr(arg).encode()
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            raise TypeError(f"cannot send {arg!r} to redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(reader: IO[bytes]) -> Any:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"connection closed mid-reply (read {line!r})")
    marker, body = line[:1], line[1:-2]
    if marker == b"+":
        return body
    if marker == b"-":
        return RedisCommandError(body.decode())
    if marker == b":":
        return int(body)
    if marker == b"$":
        length = int(body)
        if length < 0:
            return None
        data = reader.read(length + 2)
        if len(data) != length + 2:
            raise ConnectionError("connection closed mid-reply")
        return data[:-2]
    if marker == b"*":
        length = int(body)
        if length < 0:
            return None
        return [_read_reply(reader) for _ in range(length)]
    raise ConnectionError(f"not RESP: {line!r}")


class RedisServer:
    """One redis-server child process; see the module docstring."""

    host = "127.0.0.1"

    def __init__(
        self, binary: str, port: int, directory: Path, extra_args: Sequence[str] = ()
    ) -> None:
        self.binary = binary
        self.port = port
        self.directory = directory
        self.extra_args = tuple(extra_args)
        # What command() logs in with: the server's --requirepass, if any.
        self.password: str | None = None
        for name, value in zip(self.extra_args, self.extra_args[1:]):
            if name == "--requirepass":
                self.password = value
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(
        cls,
        *,
        port: int | None = None,
        directory: Path,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
    ) -> RedisServer:
        """Start a server (on ``port``, or a free one) and wait until it answers PING."""
        binary = binary or redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        directory.mkdir(parents=True, exist_ok=True)
        # A free port may be taken between free_port() and the bind: try others.
        attempts = 1 if port is not None else 5
        for attempt in range(attempts):
            server = cls(binary, port if port is not None else free_port(), directory, extra_args)
            try:
                server._launch()
            except _PortInUse:
                if attempt == attempts - 1:
                    raise
                continue
            return server
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` (no password, even if the server wants one)."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        """Tell whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.directory / f"redis-{self.port}.log"

    def _launch(self) -> None:
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                log_text = self._log_tail()
                self.process = None
                if "Address already in use" in log_text:
                    raise _PortInUse(f"port {self.port} is in use:\n{log_text}")
                raise RuntimeError(f"redis-server exited at start:\n{log_text}")
            if self._answers_ping():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"redis-server did not answer PING within {START_TIMEOUT} s:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.01)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                # "+PONG", or "-NOAUTH ..." with --requirepass: it answers either way.
                return sock.recv(1)[:1] in (b"+", b"-")
        except OSError:
            return False

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server with SIGTERM (SIGKILL if it lingers) and wait for it."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        """Kill the server with SIGKILL: its sockets close without a goodbye."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop the server and start it again on the same port (data is lost)."""
        self.stop()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self._launch()
                return
            except _PortInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def command(self, *args: str | bytes | int | float, db: int = 0, timeout: float = 5.0) -> Any:
        """Run one command on a new connection and return its reply (see the module docstring)."""
        prelude: list[tuple[object, ...]] = []
        if self.password is not None:
            prelude.append(("AUTH", self.password))
        if db:
            prelude.append(("SELECT", db))
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(b"".join(_encode(c) for c in [*prelude, args]))
            with sock.makefile("rb") as reader:
                for _ in prelude:
                    reply = _read_reply(reader)
                    if isinstance(reply, RedisCommandError):
                        raise reply
                reply = _read_reply(reader)
        if isinstance(reply, RedisCommandError):
            raise reply
        return reply

    def info(self, section: str) -> dict[str, str]:
        """Return one section of ``INFO`` as a dict of strings."""
        text: bytes = self.command("INFO", section)
        fields: dict[str, str] = {}
        for line in text.decode().splitlines():
            name, sep, value = line.partition(":")
            if sep and not name.startswith("#"):
                fields[name] = value
        return fields

    def close(self) -> None:
        """Stop the server (idempotent)."""
        with contextlib.suppress(OSError):
            self.stop()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.host}:{self.port} {state}>"

"""The RESP2 client (``hostpool.redis._resp``) against a real redis-server.

URL parsing and the reply parser are tested on their own (no server); the
rest runs against ``redis-server`` processes (``tests/redis_server.py``):
every reply type, error replies, pipelines, AUTH and SELECT, Unix sockets,
TLS, the connection ceiling under load, first-come-first-served waiting,
cancellation at any point, a server restarted, killed or down, and closing.

Server-side facts are read with the fixture's own raw-socket client, which
opens one connection per call: ``opened_since`` subtracts those.
"""

from __future__ import annotations

import importlib.util
import math
import random
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from redis_server import RedisServer, free_port

from hostpool.redis._resp import (
    _INCOMPLETE,
    RedisAddress,
    RedisConnectionError,
    RedisReplyError,
    RespClient,
    _encode,
    _ProtocolError,
    _Reader,
    parse_redis_url,
)

pytestmark = pytest.mark.anyio

StartServer = Callable[..., RedisServer]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def connections_received(server: RedisServer) -> int:
    """The server's ``total_connections_received``, this call's connection included."""
    return int(server.info("stats")["total_connections_received"])


def opened_since(server: RedisServer, before: int, helper_calls: int = 0) -> int:
    """Connections the client opened since ``before`` (a :func:`connections_received`).

    ``helper_calls`` counts the fixture's own commands in between; this
    function's INFO call is one more.
    """
    return connections_received(server) - before - helper_calls - 1


def client_connections(server: RedisServer) -> int:
    """Client connections open now, not counting the one asking."""
    return int(server.info("clients")["connected_clients"]) - 1


def blocked_clients(server: RedisServer) -> int:
    return int(server.info("clients")["blocked_clients"])


async def eventually(check: Callable[[], bool], within: float = 3.0) -> None:
    """Wait until ``check()`` holds, polling; fail after ``within`` seconds."""
    with anyio.fail_after(within):
        while not check():
            await anyio.sleep(0.01)


def redis_url_of(http_url: str) -> str:
    """``http://127.0.0.1:<port>/`` (the conftest's fixtures) as a redis:// URL."""
    return "redis://" + http_url.removeprefix("http://").rstrip("/")


async def fill_pool(client: RespClient, count: int) -> None:
    """Leave ``count`` idle connections in the pool (``count`` overlapping commands)."""
    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(client.execute, "BLPOP", "fill-pool-never-pushed", 0.05)


# --------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", RedisAddress("localhost", 6379)),
        ("redis://localhost/", RedisAddress("localhost", 6379)),
        ("redis://127.0.0.1:6380/2", RedisAddress("127.0.0.1", 6380, db=2)),
        ("redis://[::1]:6379/0", RedisAddress("::1", 6379)),
        ("redis://[::1]", RedisAddress("::1", 6379)),
        ("redis://[2001:db8::7]:7000/3", RedisAddress("2001:db8::7", 7000, db=3)),
        (
            "rediss://cache.example.com:6390/1",
            RedisAddress("cache.example.com", 6390, db=1, tls=True),
        ),
        ("REDIS://Cache:1", RedisAddress("Cache", 1)),
        ("redis://:s3cret@h/0", RedisAddress("h", 6379, password="s3cret")),
        (
            "redis://alice:p%40ss%2Fw%3A@h:7000/5",
            RedisAddress("h", 7000, db=5, username="alice", password="p@ss/w:"),
        ),
        ("redis://:p@ss@h", RedisAddress("h", 6379, password="p@ss")),
        ("redis://h?db=4", RedisAddress("h", 6379, db=4)),
        ("redis://h/?db=4", RedisAddress("h", 6379, db=4)),
        ("redis://h:6379/15?", RedisAddress("h", 6379, db=15)),
        (
            "unix:///run/redis/redis.sock",
            RedisAddress(None, None, unix_path="/run/redis/redis.sock"),
        ),
        ("unix:///tmp/r.sock?db=2", RedisAddress(None, None, unix_path="/tmp/r.sock", db=2)),
        ("unix:///tmp/my%20redis.sock", RedisAddress(None, None, unix_path="/tmp/my redis.sock")),
        (
            "unix://bob:pw@/tmp/r.sock",
            RedisAddress(None, None, unix_path="/tmp/r.sock", username="bob", password="pw"),
        ),
    ],
)
def test_valid_urls_parse(url: str, expected: RedisAddress) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h:6379", "unknown scheme 'http'"),
        ("localhost:6379", "no scheme"),
        ("redis://", "empty host"),
        ("redis:///0", "empty host"),
        ("redis://:6379/0", "empty host"),
        ("redis://h:abc", "bad port 'abc'"),
        ("redis://h:-1", "bad port '-1'"),
        ("redis://h:", "empty port"),
        ("redis://h:0", "port 0 out of range"),
        ("redis://h:65536/0", "port 65536 out of range"),
        ("redis://[::1]:70000", "port 70000 out of range"),
        ("redis://h/x", "db must be a non-negative integer, not 'x'"),
        ("redis://h/1.5", "not '1.5'"),
        ("redis://h/+1", "not '+1'"),
        ("redis://h/-1", "negative db -1"),
        ("redis://h?db=-2", "negative db -2"),
        ("redis://h?db=", "not ''"),
        ("redis://h/1/2", "extra path segments"),
        ("redis://h/1/", "extra path segments"),
        ("redis://h/1?db=2", "db given both in the path and in the query"),
        ("redis://h?db=1&db=2", "more than once"),
        ("redis://h?timeout=3", "unknown query parameter 'timeout'"),
        ("redis://h#frag", "fragment"),
        ("redis://::1/0", "IPv6 host goes in brackets"),
        ("redis://[::1/0", "never closed"),
        ("redis://[example.com]/0", "'example.com' in brackets is not an IPv6 address"),
        ("redis://[::1]x/0", "unexpected 'x' after the IPv6 host"),
        ("redis://ho st/0", "bad host 'ho st'"),
        ("unix://", "empty socket path"),
        ("unix:///?db=1", "empty socket path"),
        ("unix://host/tmp/r.sock", "has no host ('host')"),
    ],
)
def test_malformed_urls_raise_value_error_naming_the_url_and_the_problem(
    url: str, problem: str
) -> None:
    with pytest.raises(ValueError) as info:
        parse_redis_url(url)
    message = str(info.value)
    assert problem in message
    assert repr(url) in message


@pytest.mark.parametrize(
    ("url", "shown", "problem"),
    [
        ("redis://alice:hunter2@h:6379/x", "redis://alice:***@h:6379/x", "not 'x'"),
        ("redis://:hunter2@:6379/0", "redis://:***@:6379/0", "empty host"),
        ("rediss://u:hunter2@h?db=z", "rediss://u:***@h?db=z", "not 'z'"),
        ("unix://:hunter2@/tmp/s?db=-1", "unix://:***@/tmp/s?db=-1", "negative db"),
        ("redis://:hun@ter2@h:99999", "redis://:***@h:99999", "out of range"),
        # No ':' before '@': what is there may be a password, so all of it is hidden.
        ("redis://hunter2@h/0", "redis://***@h/0", "no ':' before '@'"),
        ("ftp://:hunter2@h", "ftp://:***@h", "unknown scheme"),
        ("hunter2@localhost", "***@localhost", "no scheme"),
        ("redis://alice:@h", "redis://alice:***@h", "empty password"),
    ],
)
def test_a_password_never_appears_in_an_error(url: str, shown: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        RespClient(url)
    message = str(info.value)
    assert repr(shown) in message
    assert problem in message
    assert "hunter2" not in message
    assert "ter2" not in message


def test_a_password_never_appears_in_a_repr() -> None:
    address = parse_redis_url("redis://alice:hunter2@h:6379/1")
    assert address.password == "hunter2"
    assert "hunter2" not in repr(address)
    client = RespClient("redis://alice:hunter2@h:6379/1")
    assert "hunter2" not in repr(client)
    assert "h:6379" in repr(client)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_connections": 0}, ValueError, "max_connections must be at least 1, not 0"),
        ({"max_connections": -3}, ValueError, "at least 1"),
        ({"max_connections": "4"}, TypeError, "max_connections must be an int, not str"),
        ({"max_connections": 4.0}, TypeError, "not float"),
        ({"max_connections": True}, TypeError, "not bool"),
        ({"connect_timeout": 0}, ValueError, "positive, finite"),
        ({"connect_timeout": -1.0}, ValueError, "positive, finite"),
        ({"connect_timeout": math.nan}, ValueError, "positive, finite"),
        ({"connect_timeout": math.inf}, ValueError, "positive, finite"),
        ({"connect_timeout": "1"}, TypeError, "connect_timeout must be a number of seconds"),
        ({"connect_timeout": None}, TypeError, "not NoneType"),
    ],
)
def test_the_constructor_checks_its_numbers(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        RespClient("redis://localhost", **kwargs)


def test_the_constructor_does_no_io() -> None:
    # Nothing listens there, and nothing is tried: construction is pure.
    client = RespClient("redis://192.0.2.1:1/3", max_connections=2, connect_timeout=0.5)
    assert client.address == RedisAddress("192.0.2.1", 1, db=3)
    assert client.max_connections == 2
    assert client.connect_timeout == 0.5


# --------------------------------------------------------------------------
# The wire, without a server
# --------------------------------------------------------------------------


def test_requests_are_arrays_of_bulk_strings() -> None:
    assert _encode([("SET", b"k\r\n", 12, 1.5, "é")]) == (
        b"*5\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$3\r\n1.5\r\n$2\r\n\xc3\xa9\r\n"
    )
    assert _encode([("PING",), ("INCRBY", "n", -7)]) == (
        b"*1\r\n$4\r\nPING\r\n*3\r\n$6\r\nINCRBY\r\n$1\r\nn\r\n$2\r\n-7\r\n"
    )
    assert _encode([("SET", "f", 0.1)]).endswith(b"$3\r\n0.1\r\n")
    assert _encode([]) == b""


@pytest.mark.parametrize(
    ("commands", "error", "match"),
    [
        ([("SET", "k", True)], TypeError, "not bool"),
        ([("SET", "k", None)], TypeError, "not NoneType"),
        ([("SET", "k", object())], TypeError, "not object"),
        (["PING"], TypeError, "a command is a sequence of arguments"),
        ([()], ValueError, "empty command"),
    ],
)
def test_bad_commands_are_refused_before_encoding(
    commands: list[Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _encode(commands)


#: (bytes on the wire, the reply parsed), errors as ("error", message).
WIRE_REPLIES: list[tuple[bytes, Any]] = [
    (b"+OK\r\n", b"OK"),
    (b"+\r\n", b""),
    (b"-ERR bad thing\r\n", ("error", "ERR bad thing")),
    (b":42\r\n", 42),
    (b":-7\r\n", -7),
    (b"$-1\r\n", None),
    (b"$0\r\n\r\n", b""),
    (b"$8\r\nhe\r\nllo!\r\n", b"he\r\nllo!"),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*4\r\n:1\r\n*2\r\n$1\r\na\r\n*0\r\n$-1\r\n+x\r\n", [1, [b"a", []], None, b"x"]),
    (b"*2\r\n*1\r\n*1\r\n:5\r\n$2\r\nzz\r\n", [[[5]], b"zz"]),
    # An error inside an array (a script's, EXEC's) makes the reply that error.
    (b"*3\r\n:1\r\n-BOOM inner\r\n:2\r\n", ("error", "BOOM inner")),
    (b"*2\r\n*1\r\n-FIRST\r\n-SECOND x\r\n", ("error", "FIRST")),
    (b"+after the errors\r\n", b"after the errors"),
]


def _plain(reply: object) -> object:
    return ("error", reply.message) if isinstance(reply, RedisReplyError) else reply


def _parse_in_pieces(wire: bytes, cuts: list[int]) -> list[object]:
    reader = _Reader()
    replies: list[object] = []
    for start, stop in zip([0, *cuts], [*cuts, len(wire)]):
        reader.feed(wire[start:stop])
        while (reply := reader.next_reply()) is not _INCOMPLETE:
            replies.append(_plain(reply))
    assert reader.next_reply() is _INCOMPLETE
    assert not reader.pending()
    return replies


def test_the_parser_reads_every_reply_type_whole() -> None:
    wire = b"".join(w for w, _ in WIRE_REPLIES)
    assert _parse_in_pieces(wire, []) == [r for _, r in WIRE_REPLIES]


def test_the_parser_reads_replies_split_anywhere_even_byte_by_byte() -> None:
    wire = b"".join(w for w, _ in WIRE_REPLIES)
    expected = [r for _, r in WIRE_REPLIES]
    assert _parse_in_pieces(wire, list(range(1, len(wire)))) == expected
    rng = random.Random(1)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(wire)), rng.randint(1, 12)))
        assert _parse_in_pieces(wire, cuts) == expected


def test_the_parser_waits_for_a_whole_bulk_string() -> None:
    reader = _Reader()
    reader.feed(b"$10\r\n01234")
    assert reader.next_reply() is _INCOMPLETE
    reader.feed(b"56789\r")
    assert reader.next_reply() is _INCOMPLETE
    assert reader.pending()
    reader.feed(b"\n")
    assert reader.next_reply() == b"0123456789"
    assert not reader.pending()


@pytest.mark.parametrize(
    "wire",
    [b"?what\r\n", b"$3\r\nabcd\r\n", b":12a\r\n", b"$-2\r\n", b"*-5\r\n", b"$\r\n", b"*x\r\n"],
)
def test_the_parser_rejects_what_is_not_resp2(wire: bytes) -> None:
    reader = _Reader()
    reader.feed(wire)
    with pytest.raises(_ProtocolError):
        reader.next_reply()


# --------------------------------------------------------------------------
# Commands and replies against a server
# --------------------------------------------------------------------------


async def test_each_reply_type(redis_server: RedisServer) -> None:
    async with RespClient(redis_server.url) as client:
        assert await client.execute("SET", "k", "v") == b"OK"
        assert await client.execute("GET", "k") == b"v"
        assert await client.execute("GET", "missing") is None
        assert await client.execute("INCR", "n") == 1
        assert await client.execute("INCRBY", "n", -5) == -4
        assert await client.execute("SET", "f", 1.5) == b"OK"
        assert await client.execute("INCRBYFLOAT", "f", 0.25) == b"1.75"
        assert await client.execute("SET", "u", "héllo") == b"OK"
        assert await client.execute("GET", "u") == "héllo".encode()
        assert await client.execute("SET", "b", b"\x00\r\n\xff") == b"OK"
        assert await client.execute("GET", "b") == b"\x00\r\n\xff"
        assert await client.execute("RPUSH", "l", "a", "b", "c") == 3
        assert await client.execute("LRANGE", "l", 0, -1) == [b"a", b"b", b"c"]
        assert await client.execute("LRANGE", "missing", 0, -1) == []
        # BLPOP that times out: a null array (*-1).
        assert await client.execute("BLPOP", "missing", 0.01) is None
        assert await client.execute("MGET", "k", "missing", "n") == [b"v", None, b"-4"]
        script = "return {1, {'a', {2, 'b', {}}}, 'c', false}"
        assert await client.execute("EVAL", script, 0) == [1, [b"a", [2, b"b", []]], b"c", None]
        await client.execute("ZADD", "z", 1, "one", 2, "two")
        assert await client.execute("ZRANGE", "z", 0, -1, "WITHSCORES") == [
            b"one",
            b"1",
            b"two",
            b"2",
        ]


async def test_error_replies_raise_with_their_kind_and_the_connection_is_reused(
    redis_server: RedisServer,
) -> None:
    before = connections_received(redis_server)
    async with RespClient(redis_server.url, max_connections=1) as client:
        with pytest.raises(RedisReplyError) as info:
            await client.execute("NOSUCHCOMMAND", "x")
        assert info.value.kind == "ERR"
        assert "unknown command" in info.value.message
        with pytest.raises(RedisReplyError) as info:
            await client.execute("EVALSHA", "0" * 40, 0)
        assert info.value.kind == "NOSCRIPT"
        assert str(info.value) == info.value.message
        assert await client.execute("SET", "s", "x") == b"OK"
        with pytest.raises(RedisReplyError) as info:
            await client.execute("LPUSH", "s", "y")
        assert info.value.kind == "WRONGTYPE"
        # An error nested in a script's reply is raised too.
        with pytest.raises(RedisReplyError) as info:
            await client.execute("EVAL", "return {1, redis.error_reply('BOOM in a table')}", 0)
        assert (info.value.kind, info.value.message) == ("BOOM", "BOOM in a table")
        with pytest.raises(RedisReplyError) as info:
            await client.execute("EVAL", "return redis.error_reply('CUSTOM no')", 0)
        assert info.value.kind == "CUSTOM"
        assert await client.execute("PING") == b"PONG"
        assert await client.execute("GET", "s") == b"x"
    # Every error reply was read to its end: one connection served them all.
    assert opened_since(redis_server, before) == 1


async def test_a_pipeline_returns_error_replies_in_place(redis_server: RedisServer) -> None:
    async with RespClient(redis_server.url, max_connections=1) as client:
        replies = await client.pipeline(
            [
                ("SET", "a", "x"),
                ("INCR", "a"),
                ("GET", "a"),
                ("EVALSHA", "0" * 40, 0),
                ("LRANGE", "a", 0, -1),
                ["RPUSH", "l", 1, 2],
                ("LRANGE", "l", 0, -1),
                ("PING",),
            ]
        )
        assert replies[0] == b"OK"
        assert isinstance(replies[1], RedisReplyError)
        assert replies[1].kind == "ERR"
        assert replies[2] == b"x"
        assert isinstance(replies[3], RedisReplyError)
        assert replies[3].kind == "NOSCRIPT"
        assert isinstance(replies[4], RedisReplyError)
        assert replies[4].kind == "WRONGTYPE"
        assert replies[5:] == [2, [b"1", b"2"], b"PONG"]
        assert await client.pipeline([]) == []
        assert await client.pipeline([("INCR", "n")] * 1000) == list(range(1, 1001))
        assert await client.execute("GET", "a") == b"x"


async def test_bad_arguments_raise_before_any_io(refused_url: str) -> None:
    # Nothing listens there: a command that got as far as connecting would
    # raise RedisConnectionError instead.
    async with RespClient(redis_url_of(refused_url)) as client:
        with pytest.raises(TypeError, match="not bool"):
            await client.execute("SET", "k", True)
        with pytest.raises(TypeError, match="not NoneType"):
            await client.execute("SET", "k", None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="empty command"):
            await client.execute()
        with pytest.raises(TypeError, match="sequence of arguments"):
            await client.pipeline(["PING"])
        with pytest.raises(ValueError, match="empty command"):
            await client.pipeline([("PING",), ()])


# --------------------------------------------------------------------------
# Logging in, databases, Unix sockets, TLS
# --------------------------------------------------------------------------

ACL_ARGS = ["--requirepass", "s3cret", "--user", "alice", "on", ">wonderland", "~*", "&*", "+@all"]


async def test_auth_and_select_run_on_every_new_connection(
    redis_server_factory: StartServer,
) -> None:
    server = redis_server_factory(extra_args=ACL_ARGS)
    base = f"127.0.0.1:{server.port}"
    async with RespClient(f"redis://:s3cret@{base}/3", max_connections=2) as client:
        async with anyio.create_task_group() as tg:  # two connections, both logged in
            tg.start_soon(client.execute, "SET", "k", "v")
            tg.start_soon(client.execute, "SET", "k2", "v2")
        assert await client.execute("CLIENT", "INFO") is not None
    assert server.command("MGET", "k", "k2", db=3) == [b"v", b"v2"]
    assert server.command("GET", "k") is None

    async with RespClient(f"redis://alice:wonderland@{base}?db=5") as client:
        assert await client.execute("ACL", "WHOAMI") == b"alice"
        assert await client.execute("SET", "k", "alice's") == b"OK"
    assert server.command("GET", "k", db=5) == b"alice's"


async def test_a_refused_login_or_db_is_a_connection_error_caused_by_the_reply(
    redis_server_factory: StartServer,
) -> None:
    server = redis_server_factory(extra_args=ACL_ARGS)
    base = f"127.0.0.1:{server.port}"
    cases = [
        (f"redis://alice:n0t-it@{base}/0", "WRONGPASS"),
        (f"redis://:n0t-it@{base}/0", "WRONGPASS"),
        (f"redis://:s3cret@{base}/99", "ERR"),  # DB index is out of range
    ]
    for url, kind in cases:
        async with RespClient(url, max_connections=1) as client:
            for _ in range(2):  # the failed connection gave its slot back
                with anyio.fail_after(2), pytest.raises(RedisConnectionError) as info:
                    await client.execute("PING")
                assert isinstance(info.value.__cause__, RedisReplyError)
                assert info.value.__cause__.kind == kind
                assert "n0t-it" not in str(info.value)
    # No password at all: the server answers each command with NOAUTH.
    async with RespClient(f"redis://{base}/0") as client:
        with pytest.raises(RedisReplyError) as reply_info:
            await client.execute("GET", "k")
        assert reply_info.value.kind == "NOAUTH"
    await eventually(lambda: client_connections(server) == 0)


@pytest.fixture
def short_tmp_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory with a short path: a Unix socket path has a ~107-byte limit."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hp-redis-") as name:
        yield Path(name)


async def test_a_unix_socket_with_a_db(
    redis_server_factory: StartServer, short_tmp_dir: Path
) -> None:
    path = short_tmp_dir / "redis.sock"
    server = redis_server_factory(extra_args=["--unixsocket", str(path), "--unixsocketperm", "700"])
    async with RespClient(f"unix://{path}?db=2") as client:
        assert await client.execute("SET", "k", "over unix") == b"OK"
        assert await client.execute("CLIENT", "LIST") is not None
    assert server.command("GET", "k", db=2) == b"over unix"
    async with RespClient(f"unix://{short_tmp_dir}/missing.sock") as client:
        with pytest.raises(RedisConnectionError, match="cannot connect to unix:"):
            await client.execute("PING")


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    """A throw-away CA and a certificate for 127.0.0.1, as PEM files."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    return files


@pytest.fixture
def tls_server(redis_server_factory: StartServer, tls_files: dict[str, Path]) -> tuple[int, int]:
    """A server with a plain port and a TLS port: (plain, tls)."""
    tls_port = free_port()
    try:
        server = redis_server_factory(
            extra_args=[
                "--tls-port",
                str(tls_port),
                "--tls-cert-file",
                str(tls_files["cert"]),
                "--tls-key-file",
                str(tls_files["key"]),
                "--tls-ca-cert-file",
                str(tls_files["ca"]),
                "--tls-auth-clients",
                "no",
            ]
        )
    except RuntimeError as exc:
        if "tls" in str(exc).lower() and "Bad directive" in str(exc):
            pytest.skip("this redis-server was built without TLS")
        raise
    return server.port, tls_port


async def test_rediss_speaks_tls_with_the_default_context(
    tls_server: tuple[int, int], tls_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tls_port = tls_server
    # The client uses ssl.create_default_context(): make it trust the test CA.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files["ca"]))
    async with RespClient(f"rediss://127.0.0.1:{tls_port}/1", max_connections=2) as client:
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(client.execute, "SET", f"k{i}", b"x" * 100_000)
        assert await client.execute("GET", "k3") == b"x" * 100_000
        assert await client.execute("DBSIZE") == 4


async def test_rediss_refuses_a_certificate_it_does_not_trust(
    tls_server: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tls_port = tls_server
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with RespClient(f"rediss://127.0.0.1:{tls_port}/0") as client:
        with anyio.fail_after(3), pytest.raises(RedisConnectionError) as info:
            await client.execute("PING")
    cause: BaseException | None = info.value
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__
    assert isinstance(cause, ssl.SSLCertVerificationError), repr(info.value)


# --------------------------------------------------------------------------
# The pool: its ceiling, fair waiting
# --------------------------------------------------------------------------


async def test_200_concurrent_commands_use_at_most_4_connections(
    redis_server: RedisServer,
) -> None:
    before = connections_received(redis_server)
    results: dict[int, tuple[Any, Any, Any]] = {}
    peak = 0
    polls = 0
    done = False

    async def watch() -> None:
        nonlocal peak, polls
        while not done:
            polls += 1
            peak = max(peak, await anyio.to_thread.run_sync(client_connections, redis_server))

    async with RespClient(redis_server.url, max_connections=4) as client:

        async def one(i: int) -> None:
            value: Any = await client.execute("INCR", "counter")
            (stored,) = await client.pipeline([("SET", f"k{i}", value)])
            results[i] = (value, stored, await client.execute("GET", f"k{i}"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with anyio.create_task_group() as workers:
                for i in range(200):
                    workers.start_soon(one, i)
            done = True
        assert client_connections(redis_server) == 4  # all idle, all kept
    assert sorted(value for value, _, _ in results.values()) == list(range(1, 201))
    assert all(stored == b"OK" and got == b"%d" % value for value, stored, got in results.values())
    assert peak <= 4
    assert opened_since(redis_server, before, helper_calls=polls + 1) == 4


async def test_callers_waiting_for_a_connection_are_served_first_come_first_served(
    redis_server: RedisServer,
) -> None:
    async with RespClient(redis_server.url, max_connections=1) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.execute, "BLPOP", "gate", 5)
            await anyio.wait_all_tasks_blocked()
            for i in range(10):
                tg.start_soon(client.execute, "RPUSH", "order", i)
                await anyio.wait_all_tasks_blocked()
            redis_server.command("RPUSH", "gate", "open")
        assert await client.execute("LRANGE", "order", 0, -1) == [b"%d" % i for i in range(10)]


# --------------------------------------------------------------------------
# Cancellation
# --------------------------------------------------------------------------


async def test_a_cancelled_command_closes_its_connection_and_the_next_gets_its_own_reply(
    redis_server: RedisServer,
) -> None:
    async with RespClient(redis_server.url, max_connections=1) as client:
        assert await client.execute("SET", "other", "value") == b"OK"
        with anyio.move_on_after(0.1) as scope:
            await client.execute("BLPOP", "queue", 5)
        assert scope.cancelled_caught
        # Its connection was closed, so the server stops blocking for it
        # long before BLPOP's own 5 s.
        await eventually(lambda: blocked_clients(redis_server) == 0, within=2)
        # Had the connection gone back to the pool, this push would be the
        # reply the next command reads.
        redis_server.command("RPUSH", "queue", "stale")
        with anyio.fail_after(2):
            assert await client.execute("PING") == b"PONG"
            assert await client.execute("GET", "other") == b"value"


async def test_asyncio_task_cancel_closes_the_connection_too(
    redis_server: RedisServer, anyio_backend_name: str
) -> None:
    """``asyncio.wait_for`` / ``asyncio.timeout`` cancel the task, not an anyio scope."""
    if anyio_backend_name != "asyncio":
        pytest.skip("Task.cancel() is asyncio's")
    import asyncio

    async with RespClient(redis_server.url, max_connections=1) as client:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.execute("BLPOP", "queue", 5), 0.1)
        await eventually(lambda: blocked_clients(redis_server) == 0, within=2)
        redis_server.command("RPUSH", "queue", "stale")
        with anyio.fail_after(2):
            assert await client.execute("PING") == b"PONG"


async def test_a_command_cancelled_anywhere_mid_transfer_never_leaves_bytes_for_the_next(
    redis_server: RedisServer,
) -> None:
    big = random.Random(2).randbytes(4 << 20)
    async with RespClient(redis_server.url, max_connections=1) as client:
        assert await client.execute("SET", "big", big) == b"OK"
        cancelled = 0
        for step in range(30):
            with anyio.CancelScope(deadline=anyio.current_time() + step * 0.0007) as scope:
                if step % 2:
                    assert await client.execute("GET", "big") == big
                else:
                    await client.execute("SET", f"w{step}", big)
            cancelled += scope.cancelled_caught
            with anyio.fail_after(2):
                assert await client.execute("SET", "small", step) == b"OK"
                assert await client.execute("GET", "small") == b"%d" % step
        assert cancelled  # some were cut short mid-way
        assert await client.execute("GET", "big") == big


async def test_a_caller_cancelled_while_waiting_for_a_connection_takes_nothing(
    redis_server: RedisServer,
) -> None:
    before = connections_received(redis_server)
    async with RespClient(redis_server.url, max_connections=1) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.execute, "BLPOP", "gate", 5)
            await anyio.wait_all_tasks_blocked()
            with anyio.move_on_after(0.05) as scope:
                await client.execute("PING")
            assert scope.cancelled_caught
            redis_server.command("RPUSH", "gate", "open")
        with anyio.fail_after(2):
            assert await client.execute("PING") == b"PONG"
    assert opened_since(redis_server, before, helper_calls=1) == 1


async def test_a_call_cancelled_during_login_gives_its_slot_back(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url.removesuffix("/0") + "/1"
    async with RespClient(url, max_connections=1, connect_timeout=5) as client:
        # Every command (SELECT included) waits out the pause.
        redis_server.command("CLIENT", "PAUSE", 300, "ALL")
        with anyio.move_on_after(0.05) as scope:
            await client.execute("SET", "k", "lost")
        assert scope.cancelled_caught
        with anyio.fail_after(3):
            assert await client.execute("SET", "k", "v") == b"OK"
    assert redis_server.command("GET", "k", db=1) == b"v"


async def test_connect_timeout_bounds_the_connection_and_its_login(
    redis_server: RedisServer, stalled_connect_url: str
) -> None:
    # A TCP handshake that never completes.
    async with RespClient(redis_url_of(stalled_connect_url), connect_timeout=0.2) as client:
        start = anyio.current_time()
        with anyio.fail_after(2), pytest.raises(RedisConnectionError, match="timed out") as info:
            await client.execute("PING")
        assert anyio.current_time() - start < 1.5
        assert isinstance(info.value.__cause__, TimeoutError)
    # A server that accepts but does not answer SELECT in time.
    url = redis_server.url.removesuffix("/0") + "/1"
    async with RespClient(url, connect_timeout=0.2) as client:
        redis_server.command("CLIENT", "PAUSE", 600, "ALL")
        start = anyio.current_time()
        with anyio.fail_after(2), pytest.raises(RedisConnectionError, match=r"timeout=0\.2 s"):
            await client.execute("PING")
        assert anyio.current_time() - start < 0.5


# --------------------------------------------------------------------------
# A server restarted, killed, down
# --------------------------------------------------------------------------


async def test_after_a_restart_at_most_one_command_fails_then_the_client_reconnects(
    fresh_redis_server: RedisServer,
) -> None:
    server = fresh_redis_server
    async with RespClient(server.url, max_connections=4) as client:
        await fill_pool(client, 4)
        assert client_connections(server) == 4
        await anyio.to_thread.run_sync(server.restart)
        failures: list[RedisConnectionError] = []
        with anyio.fail_after(3):
            for i in range(6):
                try:
                    assert await client.execute("SET", "k", i) == b"OK"
                except RedisConnectionError as exc:
                    failures.append(exc)
        # The dead connection is closed, and so are the other idle ones.
        assert len(failures) <= 1
        assert all(exc.__cause__ is not None for exc in failures)
        assert await client.execute("GET", "k") == b"5"


async def test_a_server_killed_mid_command_is_a_connection_error_not_a_hang(
    fresh_redis_server: RedisServer,
) -> None:
    server = fresh_redis_server
    async with RespClient(server.url, max_connections=2) as client:
        assert await client.execute("PING") == b"PONG"
        errors: list[BaseException] = []

        async def blocked() -> None:
            try:
                await client.execute("BLPOP", "queue", 10)
            except RedisConnectionError as exc:
                errors.append(exc)

        with anyio.fail_after(3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(blocked)
                await eventually(lambda: blocked_clients(server) == 1)
                server.kill()
        assert len(errors) == 1
        assert errors[0].__cause__ is not None
        with pytest.raises(RedisConnectionError, match="cannot connect"):
            await client.execute("PING")
        await anyio.to_thread.run_sync(server.restart)
        with anyio.fail_after(2):
            assert await client.execute("PING") == b"PONG"


async def test_a_server_that_is_down_is_a_connection_error_at_once(refused_url: str) -> None:
    async with RespClient(redis_url_of(refused_url), max_connections=1) as client:
        for _ in range(3):  # every failure gives the only slot back
            with anyio.fail_after(1), pytest.raises(RedisConnectionError) as info:
                await client.execute("PING")
            assert "cannot connect to 127.0.0.1:" in str(info.value)
            assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(RedisConnectionError):
            await client.pipeline([("PING",), ("PING",)])


@pytest.mark.parametrize(
    ("first_reply", "problem"),
    [
        (b"?garbage\r\n", "protocol error"),
        (b":12x\r\n", "protocol error"),
        (b"$5\r\nabcdefg\r\n", "protocol error"),
        (b"$10\r\nabc", "closed the connection"),  # then the server hangs up
    ],
)
async def test_a_broken_reply_is_a_connection_error_and_its_connection_is_closed(
    first_reply: bytes, problem: str
) -> None:
    """A fake server: its first connection answers ``first_reply``, later ones ``+PONG``."""
    accepted = 0
    closed_by_client = 0

    async def serve(stream: anyio.abc.SocketStream) -> None:
        nonlocal accepted, closed_by_client
        accepted += 1
        first = accepted == 1
        async with stream:
            try:
                while await stream.receive():
                    await stream.send(first_reply if first else b"+PONG\r\n")
                    if first and not first_reply.endswith(b"\r\n"):
                        return
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                closed_by_client += 1

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        async with RespClient(f"redis://127.0.0.1:{port}", max_connections=1) as client:
            with anyio.fail_after(2), pytest.raises(RedisConnectionError, match=problem) as info:
                await client.execute("PING")
            assert info.value.__cause__ is not None
            if first_reply.endswith(b"\r\n"):
                # The client hung up on the connection that spoke garbage.
                await eventually(lambda: closed_by_client == 1)
            with anyio.fail_after(2):
                assert await client.execute("PING") == b"PONG"
            assert accepted == 2
        tg.cancel_scope.cancel()


# --------------------------------------------------------------------------
# Closing
# --------------------------------------------------------------------------


async def test_aclose_closes_idle_connections_and_is_idempotent(
    redis_server: RedisServer,
) -> None:
    client = RespClient(redis_server.url, max_connections=3)
    await fill_pool(client, 3)
    assert client_connections(redis_server) == 3
    await client.aclose()
    await client.aclose()
    await eventually(lambda: client_connections(redis_server) == 0)
    with pytest.raises(RedisConnectionError, match="client closed"):
        await client.execute("PING")
    with pytest.raises(RedisConnectionError, match="client closed"):
        await client.pipeline([("PING",)])
    with pytest.raises(RedisConnectionError, match="client closed"):
        await client.pipeline([])
    assert "closed" in repr(client)


async def test_aclose_lets_commands_in_flight_finish_then_closes_their_connections(
    redis_server: RedisServer,
) -> None:
    client = RespClient(redis_server.url, max_connections=1)
    results: list[object] = []

    async def in_flight() -> None:
        results.append(await client.execute("BLPOP", "queue", 5))

    async def waiting() -> None:
        try:
            await client.execute("PING")
        except RedisConnectionError as exc:
            results.append(str(exc))

    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(waiting)
            await anyio.wait_all_tasks_blocked()
            await client.aclose()
            redis_server.command("RPUSH", "queue", "last")
    assert results == [[b"queue", b"last"], "client closed"]
    await eventually(lambda: client_connections(redis_server) == 0)


# --------------------------------------------------------------------------
# Large replies
# --------------------------------------------------------------------------


async def test_replies_larger_than_one_read(redis_server: RedisServer) -> None:
    rng = random.Random(3)
    medium = rng.randbytes(100 * 1024)
    large = rng.randbytes(1 << 20)
    async with RespClient(redis_server.url, max_connections=1) as client:
        assert await client.pipeline([("SET", "m", medium), ("SET", "l", large)]) == [b"OK"] * 2
        assert await client.execute("GET", "m") == medium
        assert await client.execute("GET", "l") == large
        assert await client.pipeline([("GET", "l"), ("GET", "m"), ("STRLEN", "l")]) == [
            large,
            medium,
            1 << 20,
        ]
        items = [b"item-%d" % i for i in range(20_000)]
        for start in range(0, len(items), 5000):
            await client.execute("RPUSH", "list", *items[start : start + 5000])
        assert await client.execute("LRANGE", "list", 0, -1) == items
        nested = await client.execute(
            "EVAL", "return {redis.call('LRANGE', KEYS[1], 0, -1)}", 1, "list"
        )
        assert nested == [items]


# --------------------------------------------------------------------------
# Event loops
# --------------------------------------------------------------------------


def test_a_client_moves_from_one_event_loop_to_the_next(redis_server: RedisServer) -> None:
    before = connections_received(redis_server)
    client = RespClient(redis_server.url)

    async def incr() -> Any:
        return await client.execute("INCR", "n")

    runs: list[tuple[str, dict[str, Any]]] = [("asyncio", {}), ("trio", {})]
    if importlib.util.find_spec("uvloop") is not None:
        runs.append(("asyncio", {"use_uvloop": True}))
    runs.append(("asyncio", {}))
    for n, (backend, options) in enumerate(runs, 1):
        assert anyio.run(incr, backend=backend, backend_options=options) == n
    anyio.run(client.aclose, backend="asyncio")
    # Each loop opened its own connection; the old loop's were left behind.
    assert opened_since(redis_server, before) == len(runs)

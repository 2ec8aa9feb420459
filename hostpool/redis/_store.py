"""``RedisFleet``: fleet-wide quotas kept in Redis, one script call per admission.

Every rule runs inside Redis, in a Lua script, on Redis's clock (``TIME``):
no client clock is ever compared with another, so a skewed host changes
nothing. Per partition there are three keys, sharing one hash tag so that a
script sees them all on Redis Cluster too:

- ``hostpool:{<namespace>:<partition>}:leases``: a sorted set, lease id ->
  expiry (µs). Its size, after expired ids are purged, is the partition's
  requests in flight across the fleet.
- ``...:rate``: the fleet rate's GCRA theoretical arrival time (µs).
- ``...:pause``: the end of a fleet-wide Retry-After pause (µs).
- ``...:queue`` and ``...:seen``: the routers (lines) waiting for a lease,
  by when they started waiting and when they last asked (see ``_ACQUIRE``).

Every key expires when idle (leases after two TTLs, the rate state once it
no longer constrains, a pause when it ends), so a namespace leaves nothing
behind.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from .._fleet import FleetAnswer, FleetStoreError, OnUnavailable
from .._quota import FleetQuota
from ._resp import (
    RedisConnectionError,
    RedisError,
    RedisReplyError,
    RespClient,
    parse_redis_url,
)

__all__ = ["RedisFleet"]

_US = 1_000_000

# KEYS: leases, rate, pause, queue, seen. ARGV: lease id, lease ttl (µs),
# max connections (0: no cap), rate interval (µs, 0: no rate), rate
# tolerance (µs), line id (the asking router's), stale (µs).
# Answer: {1, 0, "", 0} granted, or {0, wait µs (0: unknown), reason, first}
# where first = 1 when the asker's line is the oldest waiting one.
#
# The queue (line id -> when it started waiting) makes the fleet fair across
# processes: while lines wait, n free slots go only to the n oldest, and a
# line served goes to the back (it asks again, and queues anew). A line that
# has not asked for ``stale`` µs (its process died or gave up) loses its
# place, so it can hold the others up no longer than that.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause = tonumber(redis.call('GET', KEYS[3]) or '0')
if pause > now then
  return {0, pause - now, 'pause', 0}
end
local cap = tonumber(ARGV[3])
local ttl = tonumber(ARGV[2])
local line = ARGV[6]
local stale = tonumber(ARGV[7])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now - stale)
  for i = 1, #gone do
    redis.call('ZREM', KEYS[4], gone[i])
    redis.call('ZREM', KEYS[5], gone[i])
  end
  -- With n leases free, the n lines waiting longest may take one; a line
  -- not waiting yet, only if there is one for every line before it. (No
  -- lease free: nobody may.)
  local free = cap - redis.call('ZCARD', KEYS[1])
  local rank = redis.call('ZRANK', KEYS[4], line)
  if not rank then rank = redis.call('ZCARD', KEYS[4]) end
  if rank >= free then
    redis.call('ZADD', KEYS[4], 'NX', now, line)
    redis.call('ZADD', KEYS[5], now, line)
    local keep = math.ceil(stale / 1000) * 2
    redis.call('PEXPIRE', KEYS[4], keep)
    redis.call('PEXPIRE', KEYS[5], keep)
    local first = 0
    if redis.call('ZRANK', KEYS[4], line) == 0 then first = 1 end
    return {0, 0, 'connections', first}
  end
end
local interval = tonumber(ARGV[4])
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
  if tat < now then tat = now end
  local wait = tat - tonumber(ARGV[5]) - now
  if wait > 0 then
    return {0, wait, 'rate', 0}
  end
  tat = tat + interval
  redis.call('SET', KEYS[2], string.format('%.0f', tat), 'PX',
             math.ceil((tat - now) / 1000) + 1000)
end
if cap > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000) * 2)
  redis.call('ZREM', KEYS[4], line)
  redis.call('ZREM', KEYS[5], line)
end
return {1, 0, '', 0}
"""

# KEYS: leases. ARGV: lease ttl (µs), lease ids. Answer: 1 per id still held
# (its expiry pushed to now + ttl), 0 per id lost. An expired id is never
# revived, even if not purged yet: its slot may have been granted again.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])
    out[#out + 1] = 1
  else
    if score then redis.call('ZREM', KEYS[1], ARGV[i]) end
    out[#out + 1] = 0
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000) * 2)
return out
"""

# KEYS: pause. ARGV: pause length (µs). Never shortens a pause.
_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local untl = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if untl > cur then
  redis.call('SET', KEYS[1], string.format('%.0f', untl), 'PX',
             math.ceil(tonumber(ARGV[1]) / 1000) + 1)
end
return 1
"""


class _Script:
    """A Lua script called by SHA, loaded again when Redis lost it (restart, SCRIPT FLUSH)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def call(self, keys: Sequence[str], args: Sequence[str | int]) -> list[str | int]:
        return ["EVALSHA", self.sha, len(keys), *keys, *args]

    def load(self, keys: Sequence[str], args: Sequence[str | int]) -> list[str | int]:
        return ["EVAL", self.source, len(keys), *keys, *args]


_ACQUIRE_SCRIPT = _Script(_ACQUIRE)
_RENEW_SCRIPT = _Script(_RENEW)
_PAUSE_SCRIPT = _Script(_PAUSE)


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"RedisFleet {name} must be a number of seconds, not {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"RedisFleet {name} must be > 0 and finite; got {value!r}")
    return float(value)


class RedisFleet:
    """Fleet-wide quotas on Redis: pass one to ``HostRouter(fleet=...)``.

    Every router that uses the same Redis and ``namespace`` shares each
    partition's ``FleetQuota``. Each router needs its own ``RedisFleet``; the
    router opens it with its first fleet admission and closes it with itself
    (``async with router`` / ``aclose()``).

    Args:
        url_or_client: a Redis URL (``redis://[user:password@]host:port/db``,
            ``rediss://`` for TLS, ``unix:///path.sock?db=0``), or a client of
            yours that has ``async execute_command(*args)`` (redis-py's
            ``redis.asyncio.Redis``: asyncio only; the URL form runs under
            asyncio, uvloop and trio).
        namespace: the fleet's name in Redis; routers share quotas only
            within one namespace.
        lease_ttl: seconds a lease outlives a process that stopped renewing
            it (killed, stalled): its slot comes back after at most this.
            Held leases are renewed every ``lease_ttl / 3``.
        on_unavailable: what admission does when Redis cannot answer within
            ``timeout``: ``"local"`` (default) admits on the local quota
            alone, ``"fail"`` raises :class:`hostpool.FleetUnavailable`.
            Either way Redis is asked again after ``retry_interval``.
        timeout: seconds one admission waits for Redis.
        retry_interval: seconds between attempts while Redis is unavailable.
        poll_interval: seconds (on average; jittered) between two asks of a
            partition's head waiter while the fleet's connections are full.
        max_connections: connections to Redis this router may open.
    """

    def __init__(
        self,
        url_or_client: str | Any,
        namespace: str = "hostpool",
        *,
        lease_ttl: float = 10.0,
        on_unavailable: Literal["local", "fail"] = "local",
        timeout: float = 0.1,
        retry_interval: float = 1.0,
        poll_interval: float = 0.01,
        max_connections: int = 16,
    ) -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"RedisFleet namespace must be a non-empty str, not {namespace!r}")
        if "{" in namespace or "}" in namespace:
            raise ValueError(
                f"RedisFleet namespace {namespace!r} must not contain braces "
                "(they delimit Redis Cluster hash tags)"
            )
        if on_unavailable not in ("local", "fail"):
            raise ValueError(
                f"RedisFleet on_unavailable must be 'local' or 'fail', not {on_unavailable!r}"
            )
        self.namespace = namespace
        self.lease_ttl = _check_seconds("lease_ttl", lease_ttl)
        self.on_unavailable: OnUnavailable = on_unavailable
        self.timeout = _check_seconds("timeout", timeout)
        self.retry_interval = _check_seconds("retry_interval", retry_interval)
        self.poll_interval = _check_seconds("poll_interval", poll_interval)
        if self.timeout >= self.lease_ttl:
            raise ValueError(
                f"RedisFleet timeout ({timeout}s) must be shorter than lease_ttl ({lease_ttl}s)"
            )
        self._ttl_us = int(self.lease_ttl * _US)
        # A waiting router that has not asked for this long loses its place.
        self._stale_us = int(max(0.25, 10 * self.poll_interval) * _US)
        self._client: _Client
        if isinstance(url_or_client, str):
            parse_redis_url(url_or_client)  # a malformed URL fails here, named
            self._client = RespClient(url_or_client, max_connections=max_connections)
            self._shown = _masked(url_or_client)
        elif callable(getattr(url_or_client, "execute_command", None)):
            self._client = _ForeignClient(url_or_client)
            self._shown = type(url_or_client).__name__
        else:
            raise TypeError(
                "RedisFleet needs a Redis URL or a client with async execute_command(), "
                f"not {type(url_or_client).__name__}"
            )
        self._claimed = False

    def __repr__(self) -> str:
        return (
            f"<RedisFleet {self._shown} namespace={self.namespace!r} "
            f"lease_ttl={self.lease_ttl:g}s on_unavailable={self.on_unavailable!r}>"
        )

    def claim(self) -> None:
        """Bind this fleet to the router being built (one router per RedisFleet)."""
        if self._claimed:
            raise ValueError(
                "this RedisFleet already belongs to another HostRouter: "
                "give each router its own RedisFleet (same URL and namespace)"
            )
        self._claimed = True

    # -- keys --------------------------------------------------------------------

    def _keys(self, key: str) -> tuple[str, str, str, str, str]:
        base = f"hostpool:{{{self.namespace}:{key}}}"
        return (
            f"{base}:leases",
            f"{base}:rate",
            f"{base}:pause",
            f"{base}:queue",
            f"{base}:seen",
        )

    def keys_of(self, key: str) -> tuple[str, str, str, str, str]:
        """Return the Redis keys of a partition: leases, rate, pause, queue, seen."""
        return self._keys(key)

    # -- the store protocol --------------------------------------------------------

    async def acquire(
        self,
        key: str,
        lease: str,
        quota: FleetQuota,
        line: str,
        releases: Sequence[tuple[str, str]] = (),
    ) -> FleetAnswer:
        cap = quota.max_connections or 0
        rate = quota.rate
        interval = tolerance = 0
        if rate is not None:
            interval = max(1, round(rate.interval * _US))
            tolerance = (rate.burst_size - 1) * interval
        keys = self._keys(key)
        args: list[str | int] = [
            lease,
            self._ttl_us,
            cap,
            interval,
            tolerance,
            line,
            self._stale_us,
        ]
        if releases:
            # Queued releases ride in the same write: one round trip, not two.
            commands = [*self._removals(releases), _ACQUIRE_SCRIPT.call(keys, args)]
            replies = await self._pipeline(commands)
            for reply in replies[:-1]:
                if isinstance(reply, RedisReplyError):
                    raise FleetStoreError(f"release failed: {reply}")
            reply = replies[-1]
            if _is_noscript(reply):
                reply = await self._run(_ACQUIRE_SCRIPT, keys, args)
            elif isinstance(reply, RedisReplyError):
                raise FleetStoreError(str(reply))
        else:
            reply = await self._run(_ACQUIRE_SCRIPT, keys, args)
        if not isinstance(reply, list) or len(reply) != 4:
            raise FleetStoreError(f"unexpected answer from the acquire script: {reply!r}")
        granted, wait, reason, first = reply
        text = reason.decode() if isinstance(reason, bytes) else str(reason)
        return FleetAnswer(granted == 1, int(wait) / _US, text, first == 1)

    async def forget(self, lines: Sequence[tuple[str, str]]) -> None:
        commands: list[list[str | int]] = []
        for key, line in lines:
            keys = self._keys(key)
            commands += [["ZREM", keys[3], line], ["ZREM", keys[4], line]]
        for reply in await self._pipeline(commands):
            if isinstance(reply, RedisReplyError):
                raise FleetStoreError(f"forget failed: {reply}")

    def _removals(self, leases: Sequence[tuple[str, str]]) -> list[list[str | int]]:
        """One ZREM per partition for ``(key, lease)`` pairs."""
        by_key: dict[str, list[str]] = {}
        for key, lease in leases:
            by_key.setdefault(key, []).append(lease)
        return [["ZREM", self._keys(key)[0], *ids] for key, ids in by_key.items()]

    async def release(self, leases: Sequence[tuple[str, str]]) -> None:
        for reply in await self._pipeline(self._removals(leases)):
            if isinstance(reply, RedisReplyError):
                raise FleetStoreError(f"release failed: {reply}")

    async def renew(self, leases: Sequence[tuple[str, str]]) -> list[bool]:
        by_key: dict[str, list[int]] = {}
        for index, (key, _) in enumerate(leases):
            by_key.setdefault(key, []).append(index)
        keys = list(by_key)
        argv: list[list[str | int]] = [
            [self._ttl_us, *(leases[i][1] for i in by_key[key])] for key in keys
        ]
        pairs = list(zip(keys, argv, strict=True))
        commands = [_RENEW_SCRIPT.call([self._keys(k)[0]], a) for k, a in pairs]
        replies = await self._pipeline(commands)
        if any(_is_noscript(r) for r in replies):
            commands = [_RENEW_SCRIPT.load([self._keys(k)[0]], a) for k, a in pairs]
            replies = await self._pipeline(commands)
        alive = [False] * len(leases)
        for key, reply in zip(keys, replies, strict=True):
            if not isinstance(reply, list) or len(reply) != len(by_key[key]):
                raise FleetStoreError(f"renewal failed: {reply!r}")
            for index, flag in zip(by_key[key], reply, strict=True):
                alive[index] = flag == 1
        return alive

    async def pause(self, key: str, seconds: float) -> None:
        await self._run(_PAUSE_SCRIPT, [self._keys(key)[2]], [max(1, round(seconds * _US))])

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- plumbing --------------------------------------------------------------------

    async def _run(self, script: _Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """One script call: EVALSHA, or EVAL when Redis lost the script (NOSCRIPT)."""
        try:
            return await self._client.execute(*script.call(keys, args))
        except RedisReplyError as exc:
            if exc.kind != "NOSCRIPT":
                raise FleetStoreError(str(exc)) from exc
        except RedisError as exc:
            raise FleetStoreError(str(exc)) from exc
        try:
            return await self._client.execute(*script.load(keys, args))
        except RedisError as exc:
            raise FleetStoreError(str(exc)) from exc

    async def _pipeline(self, commands: Sequence[Sequence[str | int]]) -> list[Any]:
        try:
            return await self._client.pipeline(commands)
        except RedisError as exc:
            raise FleetStoreError(str(exc)) from exc


def _is_noscript(reply: object) -> bool:
    return isinstance(reply, RedisReplyError) and reply.kind == "NOSCRIPT"


def _masked(url: str) -> str:
    address = parse_redis_url(url)
    where = address.unix_path or f"{address.host}:{address.port}"
    scheme = "unix" if address.unix_path else ("rediss" if address.tls else "redis")
    return f"{scheme}://{where}/{address.db}"


class _Client(Protocol):
    """What the store needs of a Redis client (:class:`RespClient` has it)."""

    async def execute(self, *args: str | int) -> Any: ...

    async def pipeline(self, commands: Sequence[Sequence[str | int]]) -> list[Any]: ...

    async def aclose(self) -> None: ...


class _ForeignClient:
    """A user's client with ``execute_command`` (redis-py's asyncio client).

    Its errors become :class:`RedisReplyError` (an error reply: redis-py's
    ``ResponseError``, ``NoScriptError`` as NOSCRIPT) or
    :class:`RedisConnectionError` (anything else), so the store treats them
    as its own. The user's client is theirs to close.
    """

    def __init__(self, client: Any) -> None:
        self._client = client

    async def execute(self, *args: str | int) -> Any:
        try:
            return await self._client.execute_command(*args)
        except Exception as exc:
            raise _translate(exc) from exc

    async def pipeline(self, commands: Sequence[Sequence[str | int]]) -> list[Any]:
        out: list[Any] = []
        for command in commands:
            try:
                out.append(await self.execute(*command))
            except RedisReplyError as exc:
                out.append(exc)
        return out

    async def aclose(self) -> None:
        return None


def _translate(exc: Exception) -> RedisError:
    """Map a foreign client's exception by its class name (no import of that library)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "NoScriptError" in names:
        return RedisReplyError(f"NOSCRIPT {exc}")
    if "ResponseError" in names:
        return RedisReplyError(f"ERR {exc}")
    return RedisConnectionError(f"{type(exc).__name__}: {exc}")

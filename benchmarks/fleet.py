"""Fleet quotas on Redis: what a fleet admission costs, and throughput with one.

A ``redis-server`` (``$HOSTPOOL_REDIS_SERVER``, else the PATH's) is started
on a free port of ``127.0.0.1`` in a temporary directory, without persistence
(``--save "" --appendonly no``), and always stopped at the end. Without one,
the scenario writes a result saying it was skipped, and the run goes on.

- **cost**: ``HostRouter`` over a canned ``httpx.MockTransport`` (no HTTP
  socket: a user-supplied transport still gets every quota at admission, the
  fleet's included), with ``Quota(max_connections=50)`` (*local*) and the
  same with ``fleet=FleetQuota(max_connections=10_000)`` on a ``RedisFleet``
  (*fleet*; the cap never binds), at concurrency 1 and 50. Wall and CPU µs
  per request; *fleet* minus *local* is the fleet admission's cost. At 50,
  *fleet_64* gives the Redis client 64 connections instead of its default 16:
  its difference with *fleet* is time spent waiting for a connection of the
  client's pool.
- **round trips**: Redis ``INFO commandstats`` before and after N requests
  (the acquire is ``EVALSHA``, or ``EVAL`` after ``NOSCRIPT``; releases are
  ``ZREM``, one per partition per round trip of the keeper), with the
  store's calls also counted client side (acquires, release round trips and
  the leases each carried). ``lease_ttl`` is 60 s there, so that no renewal
  (also an ``EVALSHA``) falls inside the count.
- **throughput**: closed-loop trials at concurrency 50 against the loopback
  upstream of the other scenarios (limits as in ``throughput``): plain
  ``httpx.AsyncClient`` for reference, ``HostRouter`` local only, and
  ``HostRouter`` with ``FleetQuota(max_connections=1000)`` (never binds). The
  Redis calls of each fleet trial are read from ``INFO commandstats``.

Interleaved repeats (a rotated order per repeat), a fresh router per trial;
figures are medians, ratios and differences medians of per-repeat ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import httpx

import hostpool
from hostpool._fleet import FleetAnswer
from hostpool.demo.fleet import RedisProcess
from hostpool.redis import RedisFleet

from . import clients
from ._common import Settings, median, paired_ratio, write_result
from ._load import closed_loop_trial
from .throughput import HOST, LIMITS, rotated
from .upstream import Upstream

__all__ = ["SKIPPED", "RedisServer", "redis_server_binary", "run"]

#: What the result says when there is no redis-server to run.
SKIPPED = "redis-server not installed (apt-get install redis-server)"

MOCK_URL = "http://127.0.0.1:9/"  # never contacted: the transport is canned
NAMESPACE = "bench"
#: The local per-host cap of the cost runs (never binds at concurrency 50).
LOCAL_CAP = 50
#: Fleet caps that never bind: the cost of asking, not of waiting.
MOCK_FLEET_CAP = 10_000
LOAD_FLEET_CAP = 1000
LOAD_CONCURRENCY = 50
COST_CONCURRENCY = (1, 50)
#: Seconds an admission waits for Redis before admitting on the local quota
#: alone: long enough never to happen here (``fleet_unavailable`` says if it did).
REDIS_TIMEOUT = 1.0
#: Redis connections of the *fleet_64* variant (the default is 16).
WIDE_POOL = 64

_GUARD = 120.0
#: Commands the client sends (one round trip each, or one per pipeline);
#: every other command in ``commandstats`` ran inside a script.
_ACQUIRE_COMMANDS = ("evalsha", "eval")
_RELEASE_COMMANDS = ("zrem",)
_OWN_COMMANDS = ("info",)  # this module's measurements


# -- the redis-server ------------------------------------------------------------


def redis_server_binary() -> tuple[str | None, str]:
    """Return the redis-server to run (``$HOSTPOOL_REDIS_SERVER``, else the PATH's) or
    None, and why there is none."""
    configured = os.environ.get("HOSTPOOL_REDIS_SERVER")
    if configured:
        return shutil.which(configured), f"HOSTPOOL_REDIS_SERVER={configured!r} is not executable"
    return shutil.which("redis-server"), SKIPPED


def _encode(args: Sequence[str]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(reader: IO[bytes]) -> Any:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"redis closed the connection mid-reply ({line!r})")
    marker, body = line[:1], line[1:-2]
    if marker == b"+":
        return body
    if marker == b"-":
        raise RuntimeError(f"redis: {body.decode(errors='replace')}")
    if marker == b":":
        return int(body)
    if marker == b"$":
        length = int(body)
        return None if length < 0 else reader.read(length + 2)[:-2]
    if marker == b"*":
        length = int(body)
        return None if length < 0 else [_read_reply(reader) for _ in range(length)]
    raise ConnectionError(f"not RESP: {line!r}")


class RedisServer:
    """A redis-server child process on loopback, and one connection to measure it with."""

    def __init__(self, binary: str, directory: Path) -> None:
        # Started and stopped as the fleet demo does it (hostpool.demo.fleet).
        self._redis = RedisProcess(binary, directory)
        self.port = 0
        self._sock: socket.socket | None = None
        self._reader: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        process = self._redis.process
        return None if process is None else process.pid

    def start(self) -> None:
        """Start on a free port and wait for PING; open the measuring connection."""
        self._redis.start()
        self.port = self._redis.port
        try:
            self._connect(self.port)
        except BaseException:
            self._redis.stop()
            raise

    def _connect(self, port: int) -> None:
        sock = socket.create_connection((HOST, port), timeout=10.0)
        try:
            reader = sock.makefile("rb")
            sock.sendall(_encode(["PING"]))
            if _read_reply(reader) != b"PONG":
                raise OSError("no PONG")
        except BaseException:
            sock.close()
            raise
        self._sock, self._reader = sock, reader

    def command(self, *args: str) -> Any:
        """Run one command on the measuring connection and return its reply."""
        assert self._sock is not None and self._reader is not None
        self._sock.sendall(_encode(args))
        return _read_reply(self._reader)

    def info(self, section: str) -> dict[str, str]:
        text: bytes = self.command("INFO", section)
        fields: dict[str, str] = {}
        for line in text.decode().splitlines():
            name, sep, value = line.partition(":")
            if sep and not name.startswith("#"):
                fields[name] = value
        return fields

    def snapshot(self) -> dict[str, Any]:
        """Calls and µs per command so far, the server's CPU seconds, connections accepted."""
        commands: dict[str, dict[str, int]] = {}
        for name, value in self.info("commandstats").items():
            if not name.startswith("cmdstat_"):
                continue
            fields = dict(part.split("=", 1) for part in value.split(","))
            commands[name[8:]] = {"calls": int(fields["calls"]), "usec": int(fields["usec"])}
        cpu = self.info("cpu")
        stats = self.info("stats")
        return {
            "commands": commands,
            "cpu_seconds": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "connections_received": int(stats["total_connections_received"]),
        }

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers); idempotent."""
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None
        self._redis.stop()


def redis_delta(before: dict[str, Any], after: dict[str, Any], requests: int) -> dict[str, Any]:
    """What Redis did between two snapshots, per request where it makes sense."""
    calls: dict[str, int] = {}
    usec: dict[str, int] = {}
    for name, stat in after["commands"].items():
        if name in _OWN_COMMANDS:
            continue
        old = before["commands"].get(name, {"calls": 0, "usec": 0})
        if stat["calls"] > old["calls"]:
            calls[name] = stat["calls"] - old["calls"]
            usec[name] = stat["usec"] - old["usec"]
    acquire = sum(calls.get(n, 0) for n in _ACQUIRE_COMMANDS)
    release = sum(calls.get(n, 0) for n in _RELEASE_COMMANDS)
    in_script = sum(v for n, v in calls.items() if n not in _ACQUIRE_COMMANDS + _RELEASE_COMMANDS)
    acquire_usec = sum(usec.get(n, 0) for n in _ACQUIRE_COMMANDS)
    cpu = after["cpu_seconds"] - before["cpu_seconds"]
    per = 1 / requests if requests else float("nan")
    return {
        "requests": requests,
        "calls": calls,
        "usec": usec,
        "acquire_calls_per_request": acquire * per,
        "release_calls_per_request": release * per,
        "in_script_commands_per_request": in_script * per,
        "redis_us_per_acquire": acquire_usec / acquire if acquire else None,
        "redis_cpu_us_per_request": cpu * per * 1e6,
        "connections_received": after["connections_received"] - before["connections_received"],
    }


# -- routers ---------------------------------------------------------------------------


def _canned(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b"ok")


class CountingFleet(RedisFleet):
    """A RedisFleet that counts the store's calls (for the round-trip counts only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts = {"acquires": 0, "releases": 0, "leases_released": 0, "renewals": 0}

    async def acquire(
        self,
        key: str,
        lease: str,
        quota: hostpool.FleetQuota,
        line: str,
        releases: Sequence[tuple[str, str]] = (),
    ) -> FleetAnswer:
        self.counts["acquires"] += 1
        self.counts["leases_released"] += len(releases)
        return await super().acquire(key, lease, quota, line, releases)

    async def release(self, leases: Sequence[tuple[str, str]]) -> None:
        self.counts["releases"] += 1
        self.counts["leases_released"] += len(leases)
        await super().release(leases)

    async def renew(self, leases: Sequence[tuple[str, str]]) -> list[bool]:
        self.counts["renewals"] += 1
        return await super().renew(leases)


def _redis_fleet(url: str, **kwargs: Any) -> RedisFleet:
    return RedisFleet(url, namespace=NAMESPACE, timeout=REDIS_TIMEOUT, **kwargs)


def mock_router(
    variant: str, redis_url: str, store: RedisFleet | None = None
) -> hostpool.HostRouter:
    """A HostRouter over the canned transport: ``local``, ``fleet`` or ``fleet_64``;
    with ``store``, a fleet on that store."""
    transport = httpx.MockTransport(_canned)
    if variant == "local":
        return hostpool.HostRouter(
            transport=transport, quotas={HOST: hostpool.Quota(max_connections=LOCAL_CAP)}
        )
    quota = hostpool.Quota(
        max_connections=LOCAL_CAP, fleet=hostpool.FleetQuota(max_connections=MOCK_FLEET_CAP)
    )
    if store is None:
        if variant not in ("fleet", "fleet_64"):
            raise ValueError(f"unknown variant {variant!r}")
        wide = {"max_connections": WIDE_POOL} if variant == "fleet_64" else {}
        store = _redis_fleet(redis_url, **wide)
    return hostpool.HostRouter(transport=transport, quotas={HOST: quota}, fleet=store)


def load_factories(redis_url: str) -> dict[str, clients.ClientFactory]:
    """The clients of the throughput comparison: local, fleet, httpx (equal limits)."""
    local = hostpool.Quota(max_connections=LIMITS.per_host)
    fleet = hostpool.Quota(
        max_connections=LIMITS.per_host,
        fleet=hostpool.FleetQuota(max_connections=LOAD_FLEET_CAP),
    )
    return {
        "local": lambda: clients.make_hostpool(LIMITS, quotas={HOST: local}),
        "fleet": lambda: clients.make_hostpool(
            LIMITS, quotas={HOST: fleet}, fleet=_redis_fleet(redis_url)
        ),
        "httpx": lambda: clients.make_httpx(LIMITS),
    }


# -- trials ------------------------------------------------------------------------------


async def _drive(router: hostpool.HostRouter, total: int, concurrency: int) -> None:
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            response = await router.get(MOCK_URL)
            response.raise_for_status()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), _GUARD)


async def _aclose(router: hostpool.HostRouter) -> None:
    with contextlib.suppress(Exception):  # best effort, bounded
        await asyncio.wait_for(router.aclose(), 30.0)


async def cost_trial(
    server: RedisServer, variant: str, concurrency: int, requests: int
) -> dict[str, Any]:
    """µs per request (wall and CPU) of ``requests`` canned requests, after a warm-up."""
    gc.collect()
    router = mock_router(variant, server.url)
    try:
        # Warm: the Redis connections open, the script loaded, the partition made.
        await _drive(router, concurrency * 2, concurrency)
        before = server.snapshot()
        cpu0 = time.process_time()
        start = time.perf_counter()
        await _drive(router, requests, concurrency)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        stats = router.stats()
    finally:
        await _aclose(router)
    redis = redis_delta(before, server.snapshot(), requests)
    return {
        "requests": requests,
        "us_per_request": elapsed / requests * 1e6,
        "cpu_us_per_request": cpu / requests * 1e6,
        "redis_cpu_us_per_request": redis["redis_cpu_us_per_request"],
        "acquire_calls_per_request": redis["acquire_calls_per_request"],
        "fleet_unavailable": stats.fleet_unavailable,
    }


async def count_round_trips(server: RedisServer, concurrency: int, requests: int) -> dict[str, Any]:
    """Redis calls per request (server: commandstats; client: the store's calls)."""
    gc.collect()
    # lease_ttl 60 s: no renewal (an EVALSHA too) falls inside the count.
    store = CountingFleet(server.url, namespace=NAMESPACE, timeout=REDIS_TIMEOUT, lease_ttl=60.0)
    router = mock_router("fleet", server.url, store)
    try:
        await _drive(router, concurrency * 2, concurrency)
        await asyncio.sleep(0.05)  # the keeper sends the warm-up's releases
        before = server.snapshot()
        counts0 = dict(store.counts)
        await _drive(router, requests, concurrency)
        stats = router.stats()
    finally:
        await _aclose(router)  # sends the releases still queued: they count
    result = redis_delta(before, server.snapshot(), requests)
    counted = {k: v - counts0[k] for k, v in store.counts.items()}
    result["client"] = {
        **counted,
        "acquires_per_request": counted["acquires"] / requests,
        "release_round_trips_per_request": counted["releases"] / requests,
        "leases_per_release_round_trip": (
            counted["leases_released"] / counted["releases"] if counted["releases"] else None
        ),
    }
    result["fleet_unavailable"] = stats.fleet_unavailable
    return result


# -- the scenario ------------------------------------------------------------------------------


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float:
    """Median over repeats of ``a[key] - b[key]`` (same repeat; missing values skipped)."""
    theirs = {t["repeat"]: t[key] for t in b if t[key] is not None}
    return median(
        [t[key] - theirs[t["repeat"]] for t in a if t[key] is not None and t["repeat"] in theirs]
    )


def _cost_variants(concurrency: int) -> list[str]:
    return ["local", "fleet", "fleet_64"] if concurrency > 1 else ["local", "fleet"]


async def _run_cost(settings: Settings, server: RedisServer, log: Any) -> dict[str, Any]:
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        str(c): {v: [] for v in _cost_variants(c)} for c in COST_CONCURRENCY
    }
    for repeat in range(settings.repeats):
        for c in COST_CONCURRENCY:
            for variant in rotated(_cost_variants(c), repeat):
                trial = await cost_trial(server, variant, c, settings.fleet_requests)
                trial["repeat"] = repeat
                samples[str(c)][variant].append(trial)
                log(
                    f"fleet cost r{repeat + 1} c={c:<2} {variant:<8} "
                    f"{trial['us_per_request']:7.1f} us/request, "
                    f"cpu {trial['cpu_us_per_request']:6.1f} us (canned transport)"
                )
    medians: dict[str, dict[str, dict[str, float]]] = {}
    added: dict[str, dict[str, float]] = {}
    for level, by_variant in samples.items():
        medians[level] = {
            v: {
                key: median([t[key] for t in trials])
                for key in ("us_per_request", "cpu_us_per_request", "redis_cpu_us_per_request")
            }
            for v, trials in by_variant.items()
        }
        local, fleet = by_variant["local"], by_variant["fleet"]
        added[level] = {
            "us_per_request": _paired(fleet, local, "us_per_request"),
            "cpu_us_per_request": _paired(fleet, local, "cpu_us_per_request"),
            "fleet/local": paired_ratio(fleet, local, "us_per_request"),
        }
        if "fleet_64" in by_variant:
            added[level]["fleet_64/fleet"] = paired_ratio(
                by_variant["fleet_64"], fleet, "us_per_request"
            )
    unavailable = sum(
        t["fleet_unavailable"] for by in samples.values() for ts in by.values() for t in ts
    )
    return {
        "samples": samples,
        "medians": medians,
        "fleet_added": added,
        "fleet_unavailable": unavailable,
    }


async def _run_round_trips(settings: Settings, server: RedisServer, log: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in COST_CONCURRENCY:
        counted = await count_round_trips(server, c, settings.fleet_count_requests)
        out[str(c)] = counted
        client = counted["client"]
        log(
            f"fleet round trips c={c:<2} acquire {counted['acquire_calls_per_request']:.3f}"
            f"/request, release {client['release_round_trips_per_request']:.3f} round trips"
            f"/request of its own, {counted['release_calls_per_request']:.3f} ZREM/request "
            f"({_num(client['leases_per_release_round_trip'])} leases per ZREM round trip), "
            f"{counted['in_script_commands_per_request']:.1f} commands inside the script"
        )
    return out


async def _run_load(
    settings: Settings, server: RedisServer, upstream: Upstream, log: Any
) -> dict[str, Any]:
    url = upstream.url(HOST, "/")
    factories = load_factories(server.url)
    names = list(factories)
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for repeat in range(settings.repeats):
        for name in rotated(names, repeat):
            before = server.snapshot()
            trial = await closed_loop_trial(
                factories[name], [url], LOAD_CONCURRENCY, settings.trial_seconds, upstream
            )
            trial["repeat"] = repeat
            # Warm-up requests (one per worker) went through the fleet too.
            total = trial["requests"] + LOAD_CONCURRENCY + trial["cancelled_at_hard_stop"]
            redis = redis_delta(before, server.snapshot(), total)
            trial["redis"] = {
                k: redis[k]
                for k in (
                    "acquire_calls_per_request",
                    "release_calls_per_request",
                    "redis_cpu_us_per_request",
                    "connections_received",
                )
            }
            samples[name].append(trial)
            log(
                f"fleet load r{repeat + 1} c={LOAD_CONCURRENCY} {name:<6} "
                f"{trial['rps']:>7,.0f} req/s, cpu {trial['cpu_us_per_request'] or 0:6.1f} us"
                + (
                    f", {redis['acquire_calls_per_request']:.2f} acquire + "
                    f"{redis['release_calls_per_request']:.2f} release calls/request"
                    if name == "fleet"
                    else ""
                )
            )
    medians: dict[str, dict[str, Any]] = {}
    for name, trials in samples.items():
        medians[name] = {
            "rps": median([t["rps"] for t in trials]),
            "cpu_us_per_request": median(
                [t["cpu_us_per_request"] for t in trials if t["cpu_us_per_request"]]
            ),
            "upstream_cpu_util": median(
                [t["upstream_cpu_util"] for t in trials if t["upstream_cpu_util"] is not None]
            ),
            "errors": sum(t["errors"] for t in trials),
        }
        if name == "fleet":
            medians[name]["redis"] = {
                k: median([t["redis"][k] for t in trials]) for k in trials[0]["redis"]
            }
    ratios = {
        "fleet/local": paired_ratio(samples["fleet"], samples["local"]),
        "local/httpx": paired_ratio(samples["local"], samples["httpx"]),
        "fleet/httpx": paired_ratio(samples["fleet"], samples["httpx"]),
    }
    added_cpu = _paired(samples["fleet"], samples["local"], "cpu_us_per_request")
    return {
        "url": url,
        "limits": LIMITS.__dict__,
        "concurrency": LOAD_CONCURRENCY,
        "fleet_cap": LOAD_FLEET_CAP,
        "samples": samples,
        "medians": medians,
        "ratios": ratios,
        "fleet_added_cpu_us_per_request": added_cpu,
    }


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _targets(round_trips: dict[str, Any]) -> dict[str, Any]:
    acquire = {f"c={c}": r["acquire_calls_per_request"] for c, r in round_trips.items()}
    # Round trips of their own: ZREMs sent with an acquire (same write) are not.
    release = {
        f"c={c}": r["client"]["release_round_trips_per_request"] for c, r in round_trips.items()
    }
    return {
        "fleet_acquire_round_trips": {
            "value": acquire,
            "target": "1 Redis call (EVALSHA) per request to acquire",
            "met": all(abs(v - 1) <= 0.01 for v in acquire.values()),
        },
        "fleet_release_round_trips": {
            "value": release,
            "target": "<= 1 round trip of its own (ZREM) per request to release",
            "met": all(v <= 1.0 for v in release.values()),
        },
    }


def _redis_version(binary: str) -> str:
    try:
        text = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for word in text.split():
        if word.startswith("v="):
            return f"Redis {word[2:]}"
    return text.strip() or "unknown"


async def run(settings: Settings, upstream: Upstream, log: Any) -> dict[str, Any]:
    binary, why = redis_server_binary()
    if binary is None:
        log(f"fleet skipped: {why}")
        data: dict[str, Any] = {"skipped": why}
        write_result(settings, "fleet", data)
        return data
    with tempfile.TemporaryDirectory(prefix="hostpool-bench-redis-") as directory:
        server = RedisServer(binary, Path(directory))
        try:
            server.start()
            log(f"fleet: redis-server pid {server.pid} on {HOST}:{server.port}")
            cost = await _run_cost(settings, server, log)
            round_trips = await _run_round_trips(settings, server, log)
            load = await _run_load(settings, server, upstream, log)
        finally:
            server.stop()
    data = {
        "redis_server": _redis_version(binary),
        "redis_timeout": REDIS_TIMEOUT,
        "local_cap": LOCAL_CAP,
        "mock_fleet_cap": MOCK_FLEET_CAP,
        "requests_per_trial": settings.fleet_requests,
        "cost": cost,
        "round_trips": round_trips,
        "load": load,
        "targets": _targets(round_trips),
    }
    write_result(settings, "fleet", data)
    return data

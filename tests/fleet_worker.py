"""One member of a test fleet: a process with its own HostRouter on a shared RedisFleet.

Run by the fleet tests (``tests/integration/test_fleet.py``) as a separate
process, so that SIGKILL, SIGSTOP and a skewed clock hit one member only.
It sends ``--requests`` requests to ``--url`` with ``--concurrency`` at a
time, then prints one JSON line: what it saw (statuses, errors by class) and
its partition's stats.

    python tests/fleet_worker.py --redis redis://127.0.0.1:6379/0 \\
        --url http://127.0.0.1:8000/delay?ms=50 --requests 100 --concurrency 20 \\
        --local-cap 20 --fleet-cap 10
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from typing import Any


def _skew_clocks(seconds: float) -> None:
    """Shift this process's clocks (wall, monotonic: asyncio's, perf_counter: trio's)."""
    if not seconds:
        return
    for name in ("time", "monotonic", "perf_counter"):
        real = getattr(time, name)
        setattr(time, name, lambda real=real: real() + seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True)
    parser.add_argument("--namespace", default="test")
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--local-cap", type=int, default=50)
    parser.add_argument("--fleet-cap", type=int, default=0)
    parser.add_argument("--fleet-rate", type=float, default=0.0)
    parser.add_argument("--fleet-burst", type=int, default=0)
    parser.add_argument("--ttl", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--pool-timeout", type=float, default=30.0)
    parser.add_argument("--on-unavailable", default="local")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "uvloop", "trio"])
    parser.add_argument("--skew", type=float, default=0.0)
    args = parser.parse_args()
    _skew_clocks(args.skew)

    import anyio
    import httpx

    from hostpool import FleetQuota, HostRouter, Quota, Rate
    from hostpool.redis import RedisFleet

    fleet_rate = None
    if args.fleet_rate:
        fleet_rate = Rate(args.fleet_rate, burst=args.fleet_burst or None)
    host = httpx.URL(args.url).host
    quota = Quota(
        max_connections=args.local_cap,
        fleet=FleetQuota(max_connections=args.fleet_cap or None, rate=fleet_rate),
        respect_retry_after=True,
    )
    outcome: dict[str, Any] = {"statuses": collections.Counter(), "errors": collections.Counter()}

    async def run() -> None:
        fleet = RedisFleet(
            args.redis,
            namespace=args.namespace,
            lease_ttl=args.ttl,
            timeout=args.timeout,
            on_unavailable=args.on_unavailable,
        )
        router = HostRouter(
            quotas={host: quota},
            fleet=fleet,
            timeout=httpx.Timeout(60.0, pool=args.pool_timeout),
            limits=httpx.Limits(max_connections=args.local_cap + 10),
        )
        async with router:
            sent = iter(range(args.requests))

            async def worker() -> None:
                for _ in sent:
                    try:
                        response = await router.get(args.url)
                        outcome["statuses"][str(response.status_code)] += 1
                    except Exception as exc:
                        outcome["errors"][type(exc).__name__] += 1

            print("ready", flush=True)
            async with anyio.create_task_group() as group:
                for _ in range(args.concurrency):
                    group.start_soon(worker)
            stats = router.stats()
            partition = stats.partitions.get(host)
            outcome["stats"] = {
                "fleet_waits": stats.fleet_waits,
                "fleet_unavailable": stats.fleet_unavailable,
                "fleet_leases_lost": stats.fleet_leases_lost,
                "pool_timeouts": stats.pool_timeouts,
                "peak_in_flight": partition.peak_in_flight if partition else 0,
            }

    if args.backend == "trio":
        anyio.run(run, backend="trio")
    else:
        anyio.run(run, backend="asyncio", backend_options={"use_uvloop": args.backend == "uvloop"})
    print(json.dumps(outcome), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()

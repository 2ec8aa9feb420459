"""Fleet-wide quotas on Redis: ``HostRouter(fleet=RedisFleet(url, namespace=...))``.

Every router on the same Redis and namespace shares each partition's
:class:`hostpool.FleetQuota`. The client is hostpool's own (a small RESP
client on anyio), so it runs wherever the router does: asyncio, uvloop and
trio, with nothing to install beyond hostpool.
"""

from ._resp import RedisConnectionError, RedisError, RedisReplyError, parse_redis_url
from ._store import RedisFleet

__all__ = [
    "RedisConnectionError",
    "RedisError",
    "RedisFleet",
    "RedisReplyError",
    "parse_redis_url",
]

"""hostpool: per-host connection pools and quotas behind the ``httpx.AsyncClient`` API.

>>> import hostpool
>>> router = hostpool.HostRouter(quotas={"api.stripe.com": 20})
"""

from ._diagnose import Finding
from ._errors import FleetUnavailable, PendingLimitExceeded, PoolTimeout, RouterClosed
from ._quota import FleetQuota, PartitionBy, Quota, Rate
from ._router import HostRouter
from ._stats import PartitionStats, RouterStats, WaitSummary

__all__ = [
    "Finding",
    "FleetQuota",
    "FleetUnavailable",
    "HostRouter",
    "PartitionBy",
    "PartitionStats",
    "PendingLimitExceeded",
    "PoolTimeout",
    "Quota",
    "Rate",
    "RouterClosed",
    "RouterStats",
    "WaitSummary",
]

__version__ = "0.1.0"

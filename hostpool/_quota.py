"""Quotas, quota tables and partition keys: plain data, no I/O.

The bottom layer of hostpool. Everything here is validated when it is built,
so a bad configuration fails in the ``HostRouter`` constructor and names the
offending key, never later on the request path.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Union

import httpx

__all__ = [
    "DEFAULT_GROUP",
    "FleetQuota",
    "PartitionBy",
    "Partitioner",
    "Quota",
    "QuotaEntry",
    "QuotaTable",
    "Rate",
    "normalize_host",
]

PartitionBy = Union[Literal["host", "origin", "domain"], Callable[[httpx.URL], str]]  # noqa: UP007

#: Name of the quota entry that applies to partitions no key matches.
DEFAULT_GROUP = "<default>"

_MAX_HOST_LENGTH = 253
_MAX_LABEL_LENGTH = 63
_LABEL = re.compile(r"[a-z0-9_-]+")


def _check_timeout(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be > 0 and finite, or None; got {value!r}")


def _check_count(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be > 0 and finite; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Rate:
    """A request rate: ``requests`` per ``per`` seconds, ``burst`` of them back to back.

    Enforced as GCRA (a token bucket kept as one timestamp, no timer): one
    request may start every ``per / requests`` seconds on average, and up to
    ``burst`` may start at once after a quiet spell. So over any window of
    ``w`` seconds at most ``burst + w * requests / per`` requests start.
    ``burst`` defaults to ``requests`` (at least 1).

    >>> Rate(50, per=1.0, burst=10).interval
    0.02
    >>> Rate(300).burst_size
    300
    """

    requests: float
    per: float = 1.0
    burst: int | None = None

    def __post_init__(self) -> None:
        _check_positive("Rate requests", self.requests)
        _check_positive("Rate per", self.per)
        if self.burst is not None:
            _check_count("Rate burst", self.burst, minimum=1)

    @property
    def interval(self) -> float:
        """Seconds between two requests at the steady rate."""
        return self.per / self.requests

    @property
    def burst_size(self) -> int:
        """Requests that may start back to back."""
        if self.burst is not None:
            return self.burst
        return max(1, int(self.requests))

    def __str__(self) -> str:
        return f"{self.requests:g}/{self.per:g}s (burst {self.burst_size})"


@dataclass(frozen=True)
class FleetQuota:
    """What one partition may use summed over every router of a fleet namespace.

    Applies on top of the local :class:`Quota` (each process still keeps its
    own), and needs a fleet on the router (``HostRouter(fleet=RedisFleet(...))``).
    ``max_connections`` caps the requests in flight across the fleet, ``rate``
    the requests started across the fleet. At least one must be given.
    """

    max_connections: int | None = None
    rate: Rate | None = None

    def __post_init__(self) -> None:
        if self.max_connections is None and self.rate is None:
            raise ValueError("FleetQuota needs max_connections, rate, or both")
        if self.max_connections is not None:
            _check_count("FleetQuota max_connections", self.max_connections, minimum=1)
        if self.rate is not None and not isinstance(self.rate, Rate):
            raise TypeError(f"FleetQuota rate must be a hostpool.Rate, not {self.rate!r}")


@dataclass(frozen=True)
class Quota:
    """What one partition may use.

    ``max_connections`` caps the requests in flight to the partition (for
    HTTP/1.1, its active sockets). ``max_keepalive_connections`` caps its idle
    sockets (default: ``max_connections``; the router-wide keepalive budget
    applies on top). ``reserved`` slots of the router's budget are held for
    this quota's partitions alone. ``pool_timeout`` bounds the wait for a slot
    (default: the request's ``timeout.pool``). ``max_pending`` bounds the queue
    of waiters; past it a request fails at once with
    :class:`~hostpool.PendingLimitExceeded`.

    The upstream's own limits (see the README, "Limits that belong to the
    upstream"): ``rate`` paces the requests this process starts to the
    partition; ``fleet`` caps the partition across every router sharing the
    router's fleet; with ``respect_retry_after``, a 429 or 503 answer with a
    ``Retry-After`` header pauses new admissions to the partition until then,
    for at most ``max_retry_after`` seconds per pause.

    >>> Quota(max_connections=20, reserved=5, pool_timeout=2.0).keepalive
    20
    """

    max_connections: int
    max_keepalive_connections: int | None = None
    reserved: int = 0
    pool_timeout: float | None = None
    max_pending: int | None = None
    rate: Rate | None = None
    fleet: FleetQuota | None = None
    respect_retry_after: bool = False
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        _check_count("max_connections", self.max_connections, minimum=1)
        _check_count("reserved", self.reserved, minimum=0)
        if self.reserved > self.max_connections:
            raise ValueError(
                f"reserved ({self.reserved}) must be <= max_connections ({self.max_connections})"
            )
        if self.max_keepalive_connections is not None:
            _check_count("max_keepalive_connections", self.max_keepalive_connections, minimum=0)
            if self.max_keepalive_connections > self.max_connections:
                raise ValueError(
                    f"max_keepalive_connections ({self.max_keepalive_connections}) "
                    f"must be <= max_connections ({self.max_connections})"
                )
        _check_timeout("pool_timeout", self.pool_timeout)
        if self.max_pending is not None:
            _check_count("max_pending", self.max_pending, minimum=0)
        if self.rate is not None and not isinstance(self.rate, Rate):
            raise TypeError(f"rate must be a hostpool.Rate, not {self.rate!r}")
        if self.fleet is not None:
            if not isinstance(self.fleet, FleetQuota):
                raise TypeError(f"fleet must be a hostpool.FleetQuota, not {self.fleet!r}")
            cap = self.fleet.max_connections
            if cap is not None and cap < self.reserved:
                raise ValueError(
                    f"fleet max_connections ({cap}) is below reserved ({self.reserved}): "
                    "the fleet could never honour the reservation"
                )
        if not isinstance(self.respect_retry_after, bool):
            raise TypeError(f"respect_retry_after must be a bool, not {self.respect_retry_after!r}")
        _check_positive("max_retry_after", self.max_retry_after)

    @property
    def upstream_limited(self) -> bool:
        """Tell whether admission must look past the slot: a rate, a pause, a fleet."""
        return self.rate is not None or self.fleet is not None or self.respect_retry_after

    @property
    def keepalive(self) -> int:
        """Idle sockets this partition may keep."""
        if self.max_keepalive_connections is None:
            return self.max_connections
        return self.max_keepalive_connections


def normalize_host(host: str) -> str:
    """Return the canonical form of a hostname: lower-case, IDNA, no trailing dot.

    Non-ASCII names are encoded exactly as httpx encodes a URL's host (IDNA
    2008 via the ``idna`` package), so a quota key and the requests it means
    always agree (``faß.de`` is ``xn--fa-hia.de``, not ``fass.de``). IPv6
    literals lose their brackets and are compressed (``[0:0::1]`` → ``::1``).
    Raise ``ValueError`` for an empty or malformed name.
    """
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if ":" in name:
        try:
            return ipaddress.IPv6Address(name).compressed
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv6 address") from None
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("empty hostname")
    try:
        ascii_name = httpx.URL(f"http://{name}/").raw_host.decode("ascii").lower()
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise ValueError(f"{host!r} is not a valid hostname ({exc})") from None
    if len(ascii_name) > _MAX_HOST_LENGTH:
        raise ValueError(f"hostname longer than {_MAX_HOST_LENGTH} characters")
    for label in ascii_name.split("."):
        if not label or len(label) > _MAX_LABEL_LENGTH:
            raise ValueError(f"{host!r} has an empty or over-long label")
        if not _LABEL.fullmatch(label):
            raise ValueError(f"{host!r} has a label with characters not allowed in a hostname")
    return ascii_name


def _looks_like_ipv6(name: str) -> bool:
    try:
        ipaddress.IPv6Address(name.strip("[]"))
    except ValueError:
        return False
    return True


def is_ip_or_localhost(host: str) -> bool:
    """Tell whether a normalised host is an IP literal or ``localhost``."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class QuotaEntry:
    """One resolved line of the quota table: the key that matched and its quota.

    ``group`` names the reservation group. Partitions that share an entry (all
    hosts under one wildcard, or every unlisted host) share its reservation.
    """

    group: str
    quota: Quota


def _coerce_quota(key: str, value: object) -> Quota:
    if isinstance(value, Quota):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"quota for {key!r} must be an int or a hostpool.Quota, not {type(value).__name__}"
        )
    try:
        return Quota(max_connections=value)
    except ValueError as exc:
        raise ValueError(f"quota for {key!r}: {exc}") from None


class QuotaTable:
    """Map partition names to quotas: exact names, ``*.suffix`` wildcards, a default.

    The most specific key wins: an exact name beats any wildcard, and a longer
    wildcard suffix beats a shorter one. ``*.example.com`` matches
    ``a.example.com`` and ``a.b.example.com`` but not ``example.com`` itself.
    """

    def __init__(
        self,
        quotas: Mapping[str, int | Quota],
        default: Quota,
        budget: int,
    ) -> None:
        if not isinstance(quotas, Mapping):
            raise TypeError(f"quotas must be a mapping, not {type(quotas).__name__}")
        if not isinstance(default, Quota):
            raise TypeError(f"default_quota must be a hostpool.Quota, not {type(default).__name__}")
        self._exact: dict[str, QuotaEntry] = {}
        self._wildcards: dict[str, QuotaEntry] = {}
        self.default = QuotaEntry(DEFAULT_GROUP, default)
        for key, value in quotas.items():
            if not isinstance(key, str):
                raise TypeError(f"quota key {key!r} must be a str, not {type(key).__name__}")
            quota = _coerce_quota(key, value)
            if key.startswith("*."):
                name = self._normalize_key(key, key[2:])
                table, group = self._wildcards, f"*.{name}"
            else:
                name = self._normalize_key(key, key)
                table, group = self._exact, name
            if group in table or group in self._exact or group in self._wildcards:
                raise ValueError(f"quota key {key!r} duplicates another key once normalised")
            table[name] = QuotaEntry(group, quota)
        reserved = self.total_reserved()
        if reserved > budget:
            raise ValueError(
                f"the quotas reserve {reserved} slots in all, more than "
                f"limits.max_connections={budget}"
            )

    @staticmethod
    def _normalize_key(key: str, name: str) -> str:
        if "*" in name:
            raise ValueError(
                f"quota key {key!r} is malformed: only a leading '*.' wildcard is supported"
            )
        if "/" in name or (":" in name and not _looks_like_ipv6(name)):
            raise ValueError(
                f"quota key {key!r} is malformed: use a hostname, without scheme, port or path"
            )
        try:
            return normalize_host(name)
        except ValueError as exc:
            raise ValueError(f"quota key {key!r} is malformed: {exc}") from None

    def entries(self) -> list[QuotaEntry]:
        """Return every entry, the default last."""
        return [*self._exact.values(), *self._wildcards.values(), self.default]

    def exact_names(self) -> list[str]:
        """Return the exact (non-wildcard) names in the table."""
        return list(self._exact)

    def total_reserved(self) -> int:
        """Return the slots reserved by all entries together."""
        return sum(entry.quota.reserved for entry in self.entries())

    def lookup(self, name: str) -> QuotaEntry:
        """Return the entry for a normalised name: exact, else longest wildcard, else default."""
        entry = self._exact.get(name)
        if entry is not None:
            return entry
        if self._wildcards:
            dot = name.find(".")
            while dot != -1:
                entry = self._wildcards.get(name[dot + 1 :])
                if entry is not None:
                    return entry
                dot = name.find(".", dot + 1)
        return self.default


class Partitioner:
    """Turn a URL into its partition key and the name its quota is looked up by.

    Results are cached per (scheme, host, port) so that the per-request cost is
    one dict lookup; the registrable-domain lookup runs once per new host. The
    cache is bounded: it is cleared when it grows past ``cache_size`` entries.
    """

    def __init__(self, partition_by: PartitionBy, *, cache_size: int = 65536) -> None:
        self._custom: Callable[[httpx.URL], str] | None = None
        if callable(partition_by):
            self._custom = partition_by
            self.mode = "callable"
        elif partition_by in ("host", "origin", "domain"):
            self.mode = partition_by
        else:
            raise ValueError(
                "partition_by must be 'host', 'origin', 'domain' or a callable; "
                f"got {partition_by!r}"
            )
        self._cache: dict[tuple[str, str, int | None], tuple[str, str]] = {}
        self._cache_size = cache_size
        self._extract: Callable[[str], str] | None = None
        if self.mode == "domain":
            self._extract = _registrable_domain_function()

    def domain_of(self, host: str) -> str:
        """Return the registrable domain of a normalised host (the host itself if none)."""
        if self._extract is None:
            self._extract = _registrable_domain_function()
        return self._extract(host)

    def shrink(self, live_partitions: int) -> None:
        """Drop the cache if it is far larger than the partitions still alive."""
        if len(self._cache) > 2 * live_partitions + 1024:
            self._cache = {}

    def __call__(self, url: httpx.URL) -> tuple[str, str]:
        """Return ``(partition_key, quota_name)`` for a URL.

        Raise ``ValueError`` for a URL without a usable host.
        """
        if self._custom is not None:
            key = self._custom(url)
            if not isinstance(key, str) or not key:
                raise TypeError(f"partition_by callable must return a non-empty str, not {key!r}")
            return key, key.lower()
        cache_key = (url.scheme, url.host, url.port)
        hit = self._cache.get(cache_key)
        if hit is not None:
            return hit
        result = self._compute(url)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[cache_key] = result
        return result

    def _compute(self, url: httpx.URL) -> tuple[str, str]:
        if not url.host:
            raise ValueError(f"URL {str(url)!r} has no host")
        host = _host_of(url)
        if self.mode == "host":
            return host, host
        if self.mode == "origin":
            port = url.port if url.port is not None else _default_port(url.scheme)
            shown = f"[{host}]" if ":" in host else host
            return f"{url.scheme}://{shown}:{port}", host
        domain = self.domain_of(host)
        return domain, domain


def _host_of(url: httpx.URL) -> str:
    """Return the canonical host of a URL, from the bytes httpx already IDNA-encoded."""
    host = url.raw_host.decode("ascii").lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise ValueError(f"URL {str(url)!r} has no host")
    if ":" in host:
        return ipaddress.IPv6Address(host).compressed
    return host


def _default_port(scheme: str) -> int | None:
    return {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(scheme)


def _registrable_domain_function() -> Callable[[str], str]:
    """Build a registrable-domain lookup that never touches the network or disk.

    ``suffix_list_urls=()`` makes tldextract use the public suffix list bundled
    in the package, and ``cache_dir=None`` stops it writing a cache directory.
    """
    import tldextract

    extractor = tldextract.TLDExtract(
        suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True
    )

    def registrable(host: str) -> str:
        if is_ip_or_localhost(host):
            return host
        result = extractor.extract_str(host)
        if result.domain and result.suffix:
            return f"{result.domain}.{result.suffix}"
        return host

    return registrable

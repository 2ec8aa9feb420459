"""``HostRouter``: an ``httpx.AsyncClient`` with one pool and one quota per upstream."""

from __future__ import annotations

import ssl
import warnings
from collections.abc import Callable, Mapping
from types import TracebackType

import httpx

from ._admission import Admission
from ._compat import DEFAULT_LIMITS, ClientSeams
from ._diagnose import Finding, diagnose
from ._fleet import Fleet, FleetStore
from ._quota import PartitionBy, Partitioner, Quota, QuotaTable
from ._stats import RouterStats
from ._transport import AdmissionTransport, AdmittedTransport, PartitionedTransport
from ._types import (
    AuthTypes,
    CertTypes,
    CookieTypes,
    EventHook,
    HeaderTypes,
    ProxyTypes,
    QueryParamTypes,
    TimeoutTypes,
)

__all__ = ["HostRouter"]

_UNBOUNDED = 1_000_000

#: httpx's own defaults (tests/test_compat.py checks that they still agree).
DEFAULT_TIMEOUT = httpx.Timeout(timeout=5.0)
DEFAULT_MAX_REDIRECTS = 20


class HostRouter(ClientSeams):
    """An ``httpx.AsyncClient`` that isolates upstream hosts from one another.

    Every request is routed to a *partition* (by default its hostname) with
    its own connection pool and its own quota, under a router-wide budget
    ``limits``. A slow or failing upstream can use up its own quota, never
    the connections the other upstreams need.

    >>> router = HostRouter(
    ...     quotas={"api.stripe.com": Quota(max_connections=20, reserved=5), "*.internal": 10},
    ...     default_quota=Quota(max_connections=10),
    ...     limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
    ... )
    >>> router.partition_key("https://API.Stripe.com:8443/v1/charges")
    'api.stripe.com'

    Every other argument is ``httpx.AsyncClient``'s, with the same meaning.

    Args:
        quotas: per-host quotas, keyed by exact hostname or ``*.suffix``
            wildcard (most specific wins); an ``int`` means
            ``Quota(max_connections=n)``.
        default_quota: the quota of every host no key matches. Default:
            half the budget, so no single unlisted host can take it all.
        partition_by: ``"host"`` (default, port ignored), ``"origin"``
            (scheme, host and port), ``"domain"`` (registrable domain, from
            tldextract's bundled suffix list) or a callable ``(httpx.URL) -> str``.
        partition_idle_timeout: seconds a partition may stay unused (nothing
            in flight or waiting) before it is dropped and its idle sockets closed.
        limits: the router-wide budget: ``max_connections`` sockets open at
            most across all partitions, ``max_keepalive_connections`` idle.
        fleet: where fleet-wide quotas (``Quota(fleet=FleetQuota(...))``) are
            kept, e.g. ``hostpool.redis.RedisFleet(url, namespace=...)``.
            The router opens and closes it with itself.
    """

    def __init__(
        self,
        *,
        quotas: Mapping[str, int | Quota] | None = None,
        default_quota: Quota | None = None,
        partition_by: PartitionBy = "host",
        partition_idle_timeout: float = 300.0,
        limits: httpx.Limits = DEFAULT_LIMITS,
        fleet: FleetStore | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        mounts: Mapping[str, httpx.AsyncBaseTransport | None] | None = None,
        # Everything below is httpx.AsyncClient's, spelled out so that type
        # checkers catch a misspelt argument as they would for AsyncClient.
        auth: AuthTypes | None = None,
        params: QueryParamTypes | None = None,
        headers: HeaderTypes | None = None,
        cookies: CookieTypes | None = None,
        verify: ssl.SSLContext | str | bool = True,
        cert: CertTypes | None = None,
        http1: bool = True,
        http2: bool = False,
        proxy: ProxyTypes | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        follow_redirects: bool = False,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        event_hooks: Mapping[str, list[EventHook]] | None = None,
        base_url: httpx.URL | str = "",
        trust_env: bool = True,
        default_encoding: str | Callable[[bytes], str] = "utf-8",
    ) -> None:
        if not isinstance(limits, httpx.Limits):
            raise TypeError(f"limits must be an httpx.Limits, not {type(limits).__name__}")
        budget = limits.max_connections if limits.max_connections is not None else _UNBOUNDED
        if budget < 1:
            raise ValueError(f"limits.max_connections must be >= 1; got {budget}")
        keepalive = limits.max_keepalive_connections
        max_keepalive = budget if keepalive is None else min(keepalive, budget)
        if isinstance(partition_idle_timeout, bool) or not isinstance(
            partition_idle_timeout, (int, float)
        ):
            raise TypeError("partition_idle_timeout must be a number of seconds")
        if not partition_idle_timeout > 0:
            raise ValueError(f"partition_idle_timeout must be > 0; got {partition_idle_timeout}")
        if default_quota is None:
            # Half the budget: no single unlisted host can take all of it.
            half = (100 if budget == _UNBOUNDED else budget) // 2
            default_quota = Quota(max_connections=max(1, half))
        table = QuotaTable(quotas if quotas is not None else {}, default_quota, budget)
        if table.total_reserved() >= budget and budget != _UNBOUNDED:
            warnings.warn(
                f"the quotas reserve all {budget} slots of limits.max_connections: "
                "hosts without a reservation can never be served",
                UserWarning,
                stacklevel=2,
            )
        partitioner = Partitioner(partition_by)
        if partitioner.mode == "domain":
            _check_domain_keys(table, partitioner)
        self._hp_table = table
        self._hp_partitioner = partitioner
        self._hp_admission = Admission(
            table,
            partitioner,
            budget,
            max_keepalive=max_keepalive,
            partition_idle_timeout=float(partition_idle_timeout),
            fleet=_fleet_for(table, fleet),
        )
        # Parsed URLs of the hosts of a crowd that has gone would keep the
        # memory of that crowd (CPython's arenas) after its partitions go.
        self._hp_admission.on_shrink.append(self._hp_forget_urls)
        self._hp_limits = limits
        if mounts is not None:
            # Wrapped here, so that AsyncClient keeps them in its own order.
            mounts = {
                pattern: None if inner is None else self._hp_wrap(inner)
                for pattern, inner in mounts.items()
            }
        super().__init__(
            limits=limits,
            transport=transport,
            mounts=mounts,
            auth=auth,
            params=params,
            headers=headers,
            cookies=cookies,
            verify=verify,
            cert=cert,
            http1=http1,
            http2=http2,
            proxy=proxy,
            timeout=timeout,
            follow_redirects=follow_redirects,
            max_redirects=max_redirects,
            event_hooks=event_hooks,
            base_url=base_url,
            trust_env=trust_env,
            default_encoding=default_encoding,
        )

    def _hp_wrap(self, transport: httpx.AsyncBaseTransport) -> AdmissionTransport:
        """Put admission in front of a transport (``transport=``, a mount, a proxy).

        Called by AsyncClient's constructor for the transports it builds.
        """
        if isinstance(transport, AdmissionTransport):
            if transport.admission is not self._hp_admission:
                raise ValueError(
                    "this transport belongs to another HostRouter (its quotas and "
                    "sockets are that router's): give each router its own transport"
                )
            return transport
        if type(transport) is httpx.AsyncHTTPTransport:
            # A plain httpx transport (retries=, local_address=, uds=, ...):
            # keep its settings, partition its pool.
            return PartitionedTransport(self._hp_admission, transport)
        return AdmittedTransport(self._hp_admission, transport)

    # -- public API -----------------------------------------------------------

    def partition_key(self, url: httpx.URL | str) -> str:
        """Return the partition a URL is routed to.

        >>> HostRouter(partition_by="origin").partition_key("https://Example.com/x")
        'https://example.com:443'
        """
        key, _ = self._hp_partitioner(httpx.URL(url))
        return key

    def quota_for(self, url: httpx.URL | str) -> Quota:
        """Return the quota that applies to a URL's partition."""
        _, name = self._hp_partitioner(httpx.URL(url))
        return self._hp_table.lookup(name).quota

    def stats(self) -> RouterStats:
        """Return an immutable snapshot of the router and of every live partition."""
        return self._hp_admission.snapshot()

    def __repr__(self) -> str:
        admission = self._hp_admission
        scheduler = admission.scheduler
        ledger = admission.ledger
        state = " closed" if admission.closed else ""
        return (
            f"<HostRouter{state} [{len(admission)} partitions | "
            f"{scheduler.in_flight}/{scheduler.budget} in flight, {scheduler.waiting} waiting | "
            f"{ledger.open} sockets open, {len(ledger.idle)} idle]>"
        )

    def diagnose(self, *, min_requests: int = 20) -> list[Finding]:
        """Read the stats for the warning signs of a mis-sized pool, in plain words.

        Each :class:`~hostpool.Finding` names the partition, the figures behind
        it and a setting to try: pool too small (waits, timeouts, rejections),
        connection churn, keepalive close to the cap, no pool timeout, a
        reservation that never helped.

        >>> for finding in router.diagnose():  # doctest: +SKIP
        ...     print(finding)
        api.example.com: pool too small: requests wait for a slot (...). Requests ...
        """
        table = self._hp_table
        reserved = {
            name: quota
            for name in table.exact_names()
            if (quota := table.lookup(name).quota).reserved
        }
        return diagnose(
            self.stats(),
            default_pool_timeout=self.timeout.pool,
            min_requests=min_requests,
            reserved_keys=reserved,
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        # Each wrapped transport closes the admission first (waiters fail,
        # open bodies close, every socket closes), then its inner transport.
        await super().__aexit__(exc_type, exc_value, traceback)
        await self._hp_admission.aclose()

    async def aclose(self) -> None:
        """Close the router: fail waiting requests, close every socket.

        Requests waiting for a slot fail at once with :class:`~hostpool.RouterClosed`;
        requests in flight fail as their connections close.
        """
        await super().aclose()
        await self._hp_admission.aclose()


def _check_domain_keys(table: QuotaTable, partitioner: Partitioner) -> None:
    """With ``partition_by="domain"``, an exact key must be a registrable domain."""
    for name in table.exact_names():
        domain = partitioner.domain_of(name)
        if domain != name:
            raise ValueError(
                f"quota key {name!r} never matches with partition_by='domain': "
                f"partitions are registrable domains, so use {domain!r}"
            )


def _fleet_for(table: QuotaTable, store: FleetStore | None) -> Fleet | None:
    """Check that fleet quotas have a fleet to live in, and claim the store for this router."""
    fleet_keys = [entry.group for entry in table.entries() if entry.quota.fleet is not None]
    if store is None:
        if fleet_keys:
            raise ValueError(
                f"quota {fleet_keys[0]!r} has a FleetQuota but the router has no fleet: "
                "pass fleet=hostpool.redis.RedisFleet(...) (or drop fleet= from the quota)"
            )
        return None
    claim = getattr(store, "claim", None)
    if not callable(claim):
        raise TypeError(
            f"fleet must be a fleet store such as hostpool.redis.RedisFleet, not {store!r}"
        )
    claim()
    return Fleet(store)

"""Quota validation, the quota table and partition keys (pure logic, no I/O)."""

from __future__ import annotations

import os

import httpx
import pytest

from hostpool import HostRouter, Quota
from hostpool._quota import Partitioner, QuotaTable, normalize_host

# -- Quota -------------------------------------------------------------------


def test_quota_is_frozen() -> None:
    quota = Quota(max_connections=3)
    with pytest.raises(AttributeError):
        quota.max_connections = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"max_connections": 0}, ValueError, "max_connections must be >= 1"),
        ({"max_connections": -1}, ValueError, "max_connections must be >= 1"),
        ({"max_connections": 1.5}, TypeError, "max_connections must be an int"),
        ({"max_connections": True}, TypeError, "max_connections must be an int"),
        ({"max_connections": 2, "reserved": 3}, ValueError, "reserved (3) must be <="),
        ({"max_connections": 2, "reserved": -1}, ValueError, "reserved must be >= 0"),
        (
            {"max_connections": 2, "max_keepalive_connections": 3},
            ValueError,
            "max_keepalive_connections (3) must be <=",
        ),
        (
            {"max_connections": 2, "max_keepalive_connections": -1},
            ValueError,
            "max_keepalive_connections must be >= 0",
        ),
        ({"max_connections": 2, "pool_timeout": 0}, ValueError, "pool_timeout must be > 0"),
        ({"max_connections": 2, "pool_timeout": -1.0}, ValueError, "pool_timeout must be > 0"),
        (
            {"max_connections": 2, "pool_timeout": float("inf")},
            ValueError,
            "pool_timeout must be > 0 and finite",
        ),
        ({"max_connections": 2, "pool_timeout": "1"}, TypeError, "pool_timeout must be a number"),
        ({"max_connections": 2, "max_pending": -1}, ValueError, "max_pending must be >= 0"),
    ],
)
def test_quota_rejects_bad_values(kwargs: dict[str, object], error: type, fragment: str) -> None:
    with pytest.raises(error, match=_literal(fragment)):
        Quota(**kwargs)  # type: ignore[arg-type]


def test_quota_accepts_edge_values() -> None:
    quota = Quota(
        max_connections=1,
        max_keepalive_connections=0,
        reserved=1,
        pool_timeout=0.001,
        max_pending=0,
    )
    assert quota.keepalive == 0
    assert Quota(max_connections=5).keepalive == 5


# -- host normalisation ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("API.Stripe.COM", "api.stripe.com"),
        ("api.stripe.com.", "api.stripe.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("[::1]", "::1"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
        ("127.0.0.2", "127.0.0.2"),
        ("localhost", "localhost"),
    ],
)
def test_hosts_are_normalised(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize("raw", ["", ".", "a..b", "a b", "x" * 64 + ".com", "a." * 130 + "com"])
def test_malformed_hosts_are_rejected(raw: str) -> None:
    with pytest.raises(ValueError):
        normalize_host(raw)


# -- the quota table ---------------------------------------------------------


def _table(quotas: dict[str, int | Quota], budget: int = 100) -> QuotaTable:
    return QuotaTable(quotas, Quota(max_connections=7), budget)


def test_exact_key_beats_wildcard() -> None:
    table = _table({"api.example.com": 1, "*.example.com": 2})
    assert table.lookup("api.example.com").quota.max_connections == 1
    assert table.lookup("www.example.com").quota.max_connections == 2


def test_longest_wildcard_wins() -> None:
    table = _table({"*.example.com": 2, "*.internal.example.com": 3})
    assert table.lookup("a.internal.example.com").quota.max_connections == 3
    assert table.lookup("a.b.internal.example.com").quota.max_connections == 3
    assert table.lookup("internal.example.com").quota.max_connections == 2


def test_wildcard_does_not_match_its_own_apex() -> None:
    table = _table({"*.example.com": 2})
    assert table.lookup("example.com").group == "<default>"


def test_unlisted_host_gets_the_default_quota() -> None:
    assert _table({"a.com": 1}).lookup("b.com").quota.max_connections == 7


def test_keys_are_case_insensitive_idna_and_ignore_trailing_dot() -> None:
    table = _table({"API.Example.COM.": 4, "*.Bücher.Example": 5})
    assert table.lookup("api.example.com").quota.max_connections == 4
    assert table.lookup("shop.xn--bcher-kva.example").quota.max_connections == 5


def test_int_value_means_max_connections() -> None:
    assert _table({"a.com": 9}).lookup("a.com").quota == Quota(max_connections=9)


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("", "quota key '' is malformed"),
        ("*.", "quota key '*.' is malformed"),
        ("a.*.com", "quota key 'a.*.com' is malformed"),
        ("https://a.com", "quota key 'https://a.com' is malformed"),
        ("a.com:443", "quota key 'a.com:443' is malformed"),
        ("a.com/path", "quota key 'a.com/path' is malformed"),
        ("a b.com", "quota key 'a b.com' is malformed"),
    ],
)
def test_malformed_key_raises_value_error_naming_it(key: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=_literal(fragment)):
        _table({key: 1})


def test_non_str_key_raises_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="quota key 42 must be a str"):
        _table({42: 1})  # type: ignore[dict-item]


@pytest.mark.parametrize("value", ["10", 1.5, None, True, [1]])
def test_bad_value_raises_type_error_naming_the_key(value: object) -> None:
    with pytest.raises(TypeError, match="quota for 'a.com'"):
        _table({"a.com": value})  # type: ignore[dict-item]


def test_zero_int_value_raises_value_error_naming_the_key() -> None:
    with pytest.raises(ValueError, match="quota for 'a.com'"):
        _table({"a.com": 0})


def test_duplicate_keys_after_normalisation_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicates"):
        _table({"A.com": 1, "a.com.": 2})


def test_reservations_must_fit_in_the_budget() -> None:
    quotas: dict[str, int | Quota] = {
        "a.com": Quota(max_connections=5, reserved=5),
        "*.b.com": Quota(max_connections=5, reserved=4),
    }
    with pytest.raises(
        ValueError, match="reserve 9 slots in all, more than limits.max_connections=8"
    ):
        _table(quotas, budget=8)
    assert _table(quotas, budget=9).total_reserved() == 9


# -- partition keys ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("https://API.example.com:8443/x", "api.example.com"),
        ("http://api.example.com./", "api.example.com"),
        ("http://127.0.0.2:9000/", "127.0.0.2"),
        ("http://[::1]:9000/", "::1"),
        ("http://localhost:9000/", "localhost"),
        ("https://bücher.example/", "xn--bcher-kva.example"),
    ],
)
def test_host_partition_ignores_port_and_case(url: str, key: str) -> None:
    assert Partitioner("host")(httpx.URL(url))[0] == key


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("https://API.example.com/x", "https://api.example.com:443"),
        ("http://api.example.com/", "http://api.example.com:80"),
        ("http://api.example.com:8080/", "http://api.example.com:8080"),
        ("http://[::1]:9000/", "http://[::1]:9000"),
    ],
)
def test_origin_partition_uses_scheme_host_and_port(url: str, key: str) -> None:
    assert Partitioner("origin")(httpx.URL(url))[0] == key


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("https://api1.example.co.uk/", "example.co.uk"),
        ("https://api2.example.co.uk/", "example.co.uk"),
        ("https://a.b.example.com/", "example.com"),
        ("http://127.0.0.1:8000/", "127.0.0.1"),
        ("http://127.0.0.2:8000/", "127.0.0.2"),
        ("http://[::1]:8000/", "::1"),
        ("http://localhost:8000/", "localhost"),
        ("http://intranet/", "intranet"),
    ],
)
def test_domain_partition_uses_registrable_domain(url: str, key: str) -> None:
    assert Partitioner("domain")(httpx.URL(url))[0] == key


def test_domain_partition_never_fetches_nor_writes_a_cache(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tldextract tried to use the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("TLDEXTRACT_CACHE", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert Partitioner("domain")(httpx.URL("https://x.y.example.co.uk/"))[0] == "example.co.uk"
    assert os.listdir(str(tmp_path)) == []


def test_callable_partition_by_is_used() -> None:
    router = HostRouter(partition_by=lambda url: "tenant-" + url.path.split("/")[1])
    assert router.partition_key("https://a.com/acme/x") == "tenant-acme"


def test_callable_returning_non_str_is_a_type_error() -> None:
    router = HostRouter(partition_by=lambda url: 42)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="non-empty str"):
        router.partition_key("https://a.com/")


def test_unknown_partition_by_raises_value_error() -> None:
    with pytest.raises(ValueError, match="partition_by must be"):
        HostRouter(partition_by="path")  # type: ignore[arg-type]


def test_domain_mode_rejects_exact_keys_that_are_not_registrable_domains() -> None:
    with pytest.raises(ValueError, match="use 'stripe.com'"):
        HostRouter(partition_by="domain", quotas={"api.stripe.com": 3})
    HostRouter(partition_by="domain", quotas={"stripe.com": 3, "*.co.uk": 2})


def test_partition_key_cache_is_bounded() -> None:
    partitioner = Partitioner("host", cache_size=10)
    for i in range(100):
        partitioner(httpx.URL(f"http://h{i}.example/"))
    assert len(partitioner._cache) <= 10


# -- router construction -----------------------------------------------------


def test_router_rejects_bad_quota_dict_in_the_constructor() -> None:
    with pytest.raises(ValueError, match="quota key 'x:1' is malformed"):
        HostRouter(quotas={"x:1": 2})
    with pytest.raises(TypeError, match="quota for 'a.com'"):
        HostRouter(quotas={"a.com": "many"})  # type: ignore[dict-item]


def test_router_rejects_reservations_beyond_its_limits() -> None:
    with pytest.raises(ValueError, match="limits.max_connections=4"):
        HostRouter(
            quotas={"a.com": Quota(max_connections=5, reserved=5)},
            limits=httpx.Limits(max_connections=4),
        )


def test_router_default_reservation_counts_towards_the_budget() -> None:
    with pytest.raises(ValueError, match="reserve 5 slots"):
        HostRouter(
            quotas={"a.com": Quota(max_connections=3, reserved=3)},
            default_quota=Quota(max_connections=2, reserved=2),
            limits=httpx.Limits(max_connections=4),
        )


def test_router_rejects_bad_idle_timeout() -> None:
    with pytest.raises(ValueError, match="partition_idle_timeout"):
        HostRouter(partition_idle_timeout=0)


def test_router_default_quota_is_half_the_budget() -> None:
    router = HostRouter(limits=httpx.Limits(max_connections=10))
    assert router.quota_for("http://anything.example/") == Quota(max_connections=5)


def test_router_is_an_async_client() -> None:
    assert isinstance(HostRouter(), httpx.AsyncClient)


def _literal(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize(
    ("key", "url", "partition"),
    [
        ("faß.de", "http://faß.de/", "xn--fa-hia.de"),
        ("xn--fa-hia.de", "http://FAß.de./", "xn--fa-hia.de"),
        ("fass.de", "http://fass.de/", "fass.de"),
    ],
)
def test_idna_matches_httpx_so_keys_and_requests_agree(key: str, url: str, partition: str) -> None:
    router = HostRouter(quotas={key: 3})
    assert router.partition_key(url) == partition
    assert router.quota_for(url) == Quota(max_connections=3)


def test_distinct_idna_hosts_are_distinct_partitions() -> None:
    router = HostRouter()
    assert router.partition_key("http://faß.de/") != router.partition_key("http://fass.de/")

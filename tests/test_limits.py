"""The upstream's limits as plain data: Rate/FleetQuota/Quota validation, the GCRA
bucket against a token-bucket model, and Retry-After parsing (no I/O, no clock).

The bucket is property-tested with hypothesis: whatever the rate and the
arrivals, (a) starts come in reservation order, (b) no window holds more
starts than GCRA allows, (c) no request waits longer than a plain token
bucket would make it, (d) a reservation past its patience is refused and
changes nothing, (e) a refunded start is as good as never taken.
"""

from __future__ import annotations

import copy
import datetime
import email.utils
import math
import re
import time
from dataclasses import dataclass

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from hostpool import FleetQuota, HostRouter, Quota, Rate
from hostpool._limits import Bucket, parse_retry_after

# -- Rate, FleetQuota, Quota: validation ----------------------------------------


def _literal(text: str) -> str:
    return re.escape(text)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "fragment"),
    [
        ((0,), {}, ValueError, "Rate requests must be > 0"),
        ((-1,), {}, ValueError, "Rate requests must be > 0"),
        ((float("nan"),), {}, ValueError, "Rate requests must be > 0 and finite"),
        ((float("inf"),), {}, ValueError, "Rate requests must be > 0 and finite"),
        ((10,), {"per": 0}, ValueError, "Rate per must be > 0"),
        ((10,), {"per": -1}, ValueError, "Rate per must be > 0"),
        ((10,), {"per": float("inf")}, ValueError, "Rate per must be > 0 and finite"),
        ((10,), {"burst": 0}, ValueError, "Rate burst must be >= 1"),
        ((10,), {"burst": -3}, ValueError, "Rate burst must be >= 1"),
        (("10",), {}, TypeError, "Rate requests must be a number"),
        ((True,), {}, TypeError, "Rate requests must be a number"),
        ((None,), {}, TypeError, "Rate requests must be a number"),
        ((10,), {"per": "1"}, TypeError, "Rate per must be a number"),
        ((10,), {"burst": 2.5}, TypeError, "Rate burst must be an int"),
        ((10,), {"burst": True}, TypeError, "Rate burst must be an int"),
    ],
)
def test_rate_rejects_bad_values_naming_the_field(
    args: tuple[object, ...], kwargs: dict[str, object], error: type, fragment: str
) -> None:
    with pytest.raises(error, match=_literal(fragment)):
        Rate(*args, **kwargs)  # type: ignore[arg-type]


def test_rate_interval_and_burst_size() -> None:
    """``interval`` is per/requests; ``burst`` defaults to int(requests), at least 1."""
    assert Rate(50, per=1.0, burst=10).interval == pytest.approx(0.02)
    assert Rate(1, per=10).interval == 10.0
    assert Rate(300).burst_size == 300
    assert Rate(2.7).burst_size == 2
    assert Rate(0.5, per=1.0).burst_size == 1
    assert Rate(0.5).interval == 2.0
    assert Rate(10, burst=1).burst_size == 1
    assert str(Rate(20, per=1.0, burst=5)) == "20/1s (burst 5)"
    with pytest.raises(AttributeError):
        Rate(10).requests = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({}, ValueError, "FleetQuota needs max_connections, rate, or both"),
        ({"max_connections": 0}, ValueError, "FleetQuota max_connections must be >= 1"),
        ({"max_connections": 2.0}, TypeError, "FleetQuota max_connections must be an int"),
        ({"rate": 50}, TypeError, "FleetQuota rate must be a hostpool.Rate"),
    ],
)
def test_fleet_quota_rejects_bad_values(
    kwargs: dict[str, object], error: type, fragment: str
) -> None:
    with pytest.raises(error, match=_literal(fragment)):
        FleetQuota(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        (
            {"reserved": 5, "fleet": FleetQuota(max_connections=4)},
            ValueError,
            "fleet max_connections (4) is below reserved (5)",
        ),
        ({"rate": 50}, TypeError, "rate must be a hostpool.Rate"),
        ({"rate": (50, 1.0)}, TypeError, "rate must be a hostpool.Rate"),
        ({"fleet": 10}, TypeError, "fleet must be a hostpool.FleetQuota"),
        ({"max_retry_after": 0}, ValueError, "max_retry_after must be > 0"),
        ({"max_retry_after": -1.0}, ValueError, "max_retry_after must be > 0"),
        ({"max_retry_after": float("inf")}, ValueError, "max_retry_after must be > 0 and finite"),
        ({"max_retry_after": float("nan")}, ValueError, "max_retry_after must be > 0 and finite"),
        ({"max_retry_after": "60"}, TypeError, "max_retry_after must be a number"),
        ({"respect_retry_after": "yes"}, TypeError, "respect_retry_after must be a bool"),
        ({"respect_retry_after": 1}, TypeError, "respect_retry_after must be a bool"),
        ({"respect_retry_after": None}, TypeError, "respect_retry_after must be a bool"),
    ],
)
def test_quota_rejects_bad_upstream_limits(
    kwargs: dict[str, object], error: type, fragment: str
) -> None:
    with pytest.raises(error, match=_literal(fragment)):
        Quota(max_connections=10, **kwargs)  # type: ignore[arg-type]


def test_quota_accepts_the_upstream_limits() -> None:
    """A fleet cap equal to the reservation is fine.

    ``upstream_limited`` says when admission must look past the slot.
    """
    quota = Quota(
        max_connections=10,
        reserved=4,
        rate=Rate(5),
        fleet=FleetQuota(max_connections=4, rate=Rate(20)),
        respect_retry_after=True,
        max_retry_after=0.001,
    )
    assert quota.upstream_limited
    assert not Quota(max_connections=10).upstream_limited
    assert Quota(max_connections=1, rate=Rate(1)).upstream_limited
    assert Quota(max_connections=1, respect_retry_after=True).upstream_limited
    assert Quota(max_connections=1).max_retry_after == 60.0
    assert Quota(max_connections=1).respect_retry_after is False


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (
            {"quotas": {"a.com": Quota(max_connections=5, fleet=FleetQuota(max_connections=10))}},
            "a.com",
        ),
        (
            {"quotas": {"*.b.com": Quota(max_connections=5, fleet=FleetQuota(rate=Rate(1)))}},
            "*.b.com",
        ),
        (
            {"default_quota": Quota(max_connections=5, fleet=FleetQuota(max_connections=3))},
            "<default>",
        ),
    ],
)
def test_a_fleet_quota_without_a_fleet_fails_in_the_constructor_naming_the_key(
    kwargs: dict[str, object], named: str
) -> None:
    with pytest.raises(ValueError, match=_literal(f"quota {named!r} has a FleetQuota")):
        HostRouter(**kwargs)  # type: ignore[arg-type]


# -- the GCRA bucket, against a token-bucket model ------------------------------


class TokenBucket:
    """The reference: ``burst`` tokens, one back every ``interval``, one per start.

    A request at time ``t`` takes a token if one is there, or else waits
    until one would be, behind every request that reserved before it (the
    balance goes negative: each missing token is a start queued for later).
    Written the obvious way, independently of GCRA's single timestamp.
    """

    def __init__(self, rate: Rate) -> None:
        self.capacity = float(rate.burst_size)
        self.interval = rate.interval
        self.tokens = self.capacity
        self.last: float | None = None

    def _at(self, now: float) -> float:
        if self.last is None:
            return self.tokens
        return min(self.capacity, self.tokens + (now - self.last) / self.interval)

    def delay(self, now: float) -> float:
        """Seconds a request arriving at ``now`` waits for its token (nothing taken)."""
        tokens = self._at(now)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) * self.interval

    def take(self, now: float) -> None:
        self.tokens = self._at(now) - 1.0
        self.last = now


@dataclass(frozen=True)
class Scenario:
    rate: Rate
    #: (arrival time, patience) in arrival order; patience None waits for ever.
    arrivals: tuple[tuple[float, float | None], ...]


@st.composite
def rates(draw: st.DrawFn) -> Rate:
    requests = draw(st.integers(1, 1000) | st.floats(1.0, 1000.0))
    per = draw(st.floats(0.01, 10.0))
    burst = draw(st.integers(1, 50))
    return Rate(requests, per=per, burst=burst)


@st.composite
def scenarios(draw: st.DrawFn, *, max_size: int = 60) -> Scenario:
    """A rate and arrivals: bursts (gap 0), steady trickles, quiet spells, in intervals."""
    rate = draw(rates())
    interval = rate.interval
    now = draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1e4))
    gaps = draw(
        st.lists(
            st.just(0.0) | st.sampled_from([0.5, 1.0, 2.0]) | st.floats(0.0, 3.0 * rate.burst_size),
            min_size=1,
            max_size=max_size,
        )
    )
    patiences = draw(
        st.lists(
            st.none() | st.just(0.0) | st.floats(0.0, 2.0 * rate.burst_size),
            min_size=len(gaps),
            max_size=len(gaps),
        )
    )
    arrivals = []
    for gap, patience in zip(gaps, patiences):
        now += gap * interval
        arrivals.append((now, None if patience is None else patience * interval))
    return Scenario(rate, tuple(arrivals))


def _slack(times: list[float]) -> float:
    """Float rounding allowed on a time near ``times`` (a few dozen ulps, no more)."""
    return 64 * math.ulp(max([1.0, *map(abs, times)]))


def assert_gcra_bound(starts: list[float], rate: Rate) -> None:
    """(b) Over any window [a, a + w], at most ``burst + w / interval`` starts.

    The fullest windows begin and end at a start, so checking every pair of
    starts checks every window. The slack is float rounding only: far less
    than one start, so one start too many always fails.
    """
    ordered = sorted(starts)
    eps = _slack(ordered)
    for i, a in enumerate(ordered):
        for j in range(i, len(ordered)):
            w = ordered[j] - a
            count = j - i + 1
            allowed = rate.burst_size + (w + eps) / rate.interval
            assert count <= allowed, (
                f"{count} starts in [{a}, {a + w}] (w={w:.6g}s), GCRA allows {allowed:.6f} "
                f"for {rate}"
            )


@given(scenarios())
@example(Scenario(Rate(10, per=1.0, burst=3), tuple((0.0, None) for _ in range(8))))
@example(Scenario(Rate(1000, per=0.01, burst=1), ((5.0, 0.0), (5.0, 0.0), (5.0, None))))
def test_bucket_is_a_token_bucket_with_fifo_starts(scenario: Scenario) -> None:
    """(a)-(d) for every arrival, against :class:`TokenBucket`.

    (a) What holds is FIFO: with arrivals in clock order (the loop's clock
    never goes back), the starts granted are non-decreasing in reservation
    order, so a later request never starts before an earlier one. They are
    *not* spaced one interval apart: a burst starts at the same instant.
    (c) Each start is the reference's to 1e-9 relative: never later (no
    request waits while a token is there) and never earlier.
    (d) ``reserve`` refuses (None) exactly when the delay it would have
    given exceeds ``patience``, and a refusal changes nothing.
    """
    rate = scenario.rate
    bucket = Bucket(rate)
    reference = TokenBucket(rate)
    starts: list[float] = []
    for now, patience in scenario.arrivals:
        unlimited = copy.copy(bucket).reserve(now)  # what it would give with no patience
        assert unlimited is not None and unlimited >= 0.0
        before = bucket.tat
        delay = bucket.reserve(now, patience)
        expected = reference.delay(now)
        eps = 1e-9 * max(1.0, abs(now))
        if delay is None:
            # (d) refused exactly when the delay is past the patience; nothing reserved.
            assert patience is not None and unlimited > patience
            assert bucket.tat == before
            assert expected > patience - eps  # the reference would not have had a start either
            continue
        assert patience is None or unlimited <= patience
        assert delay == unlimited
        if patience is not None:
            assert delay <= patience
        # (c) the start is the reference's start.
        assert math.isclose(now + delay, now + expected, rel_tol=1e-9, abs_tol=eps), (
            f"start {now + delay!r}, the token bucket says {now + expected!r}"
        )
        reference.take(now)
        start = now + delay
        # (a) FIFO: never before an earlier reservation's start.
        if starts:
            assert start >= starts[-1]
        starts.append(start)
    assert_gcra_bound(starts, rate)


gaps = st.lists(st.just(0.0) | st.floats(0.0, 5.0), min_size=1, max_size=20)


@given(scenarios(), st.floats(0.0, 1.0), gaps)
def test_a_refunded_start_is_as_good_as_never_taken(
    scenario: Scenario, when: float, later_gaps: list[float]
) -> None:
    """(e) Refund the latest reservation: every later arrival fares as if it was never made.

    As :meth:`Admission._take_start` uses it: ``mark`` is the ``tat`` the
    reservation left, the refund happens while the request sleeps toward
    its start (``now <= cancelled_at <= start``), and the requests after it
    arrive later still.
    """
    rate = scenario.rate
    bucket = Bucket(rate)
    for now, patience in scenario.arrivals:
        bucket.reserve(now, patience)
    now = scenario.arrivals[-1][0]
    never = copy.copy(bucket)
    delay = bucket.reserve(now)
    assert delay is not None
    mark = bucket.tat
    cancelled_at = now + when * delay
    bucket.refund(mark, cancelled_at)
    assert bucket.ready_in(cancelled_at) == pytest.approx(never.ready_in(cancelled_at), abs=1e-9)
    later = cancelled_at
    for gap in later_gaps:
        later += gap * rate.interval
        got, want = bucket.reserve(later), never.reserve(later)
        assert got is not None and want is not None
        assert math.isclose(later + got, later + want, rel_tol=1e-9, abs_tol=_slack([later]))


@given(scenarios())
def test_a_refund_with_a_stale_mark_changes_nothing(scenario: Scenario) -> None:
    """Only the latest reservation can be given back; an earlier one's start is simply lost."""
    bucket = Bucket(scenario.rate)
    for now, patience in scenario.arrivals:
        bucket.reserve(now, patience)
    now = scenario.arrivals[-1][0]
    bucket.reserve(now)
    first = bucket.tat
    bucket.reserve(now)
    second = bucket.tat
    bucket.refund(first, now)
    assert bucket.tat == second


@given(
    scenarios(max_size=40),
    st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=40),
)
def test_the_gcra_bound_holds_over_the_starts_used_when_some_are_cancelled(
    scenario: Scenario, cancels: list[tuple[bool, int]]
) -> None:
    """(a) and (b) again, with requests cancelled while they wait and their starts refunded.

    After each arrival, one of the requests still sleeping toward its start
    (the latest, or one a few reservations back) may be cancelled at that
    instant and refund its start with its own mark: exact if it is still the
    latest, a no-op otherwise. The starts actually used still never exceed
    ``burst + w / interval`` in any window, and still come in reservation order.
    """
    rate = scenario.rate
    bucket = Bucket(rate)
    used: list[float] = []
    sleeping: list[tuple[float, float]] = []  # (start, mark) of delayed requests, in order
    plan = iter(cancels)
    for now, patience in scenario.arrivals:
        # Requests whose start has come are sent: too late to cancel them.
        while sleeping and sleeping[0][0] <= now:
            used.append(sleeping.pop(0)[0])
        delay = bucket.reserve(now, patience)
        if delay is None:
            continue
        if delay == 0.0:
            assert not sleeping  # FIFO: nobody reserved earlier is still waiting
            used.append(now)
        else:
            sleeping.append((now + delay, bucket.tat))
        cancel, back = next(plan, (False, 0))
        if cancel and sleeping:
            _, mark = sleeping.pop(max(0, len(sleeping) - 1 - back))
            bucket.refund(mark, now)
    used.extend(start for start, _ in sleeping)
    assert used == sorted(used)
    assert_gcra_bound(used, rate)


def test_bucket_after_a_quiet_spell_allows_a_full_burst_then_one_per_interval() -> None:
    """The doc's promise in numbers: ``burst`` at once, then one every ``interval``."""
    bucket = Bucket(Rate(10, per=1.0, burst=3))
    delays = [bucket.reserve(100.0) for _ in range(6)]
    assert delays == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2, 0.3])
    assert bucket.ready_in(100.0) == pytest.approx(0.4)
    assert bucket.reserve(100.0, patience=0.39) is None
    assert bucket.reserve(100.0, patience=0.41) == pytest.approx(0.4)
    # After a quiet spell of burst * interval the bucket is full again.
    assert bucket.ready_in(100.8) == 0.0
    assert [bucket.reserve(100.8) for _ in range(4)] == pytest.approx([0.0, 0.0, 0.0, 0.1])


def test_a_zero_delay_is_granted_even_with_zero_patience() -> None:
    bucket = Bucket(Rate(1, per=10.0, burst=1))
    assert bucket.reserve(0.0, patience=0.0) == 0.0
    assert bucket.reserve(0.0, patience=0.0) is None
    assert bucket.reserve(0.0, patience=9.999) is None
    assert bucket.reserve(0.0, patience=10.0) == 10.0


# -- Retry-After ---------------------------------------------------------------

#: Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example date.
EXAMPLE_DATE = 784111777.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("120", 120.0),
        (" 5 ", 5.0),
        ("\t7\r\n", 7.0),
        ("007", 7.0),
        # Not in the RFC, tolerated and kept: waiting less than asked is the risk.
        ("1.5", 1.5),
        ("1.9", 1.9),
        ("1.", 1.0),
        ("999999999999", 999999999999.0),
    ],
)
def test_delay_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value) == seconds
    assert parse_retry_after(value, now=0.0) == seconds  # ``now`` plays no part


@pytest.mark.parametrize(
    "value",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",  # IMF-fixdate
        "Sunday, 06-Nov-94 08:49:37 GMT",  # obsolete RFC 850 format
        "Sun Nov  6 08:49:37 1994",  # ANSI C asctime() format (no zone: GMT)
    ],
)
def test_the_three_http_date_formats(value: str) -> None:
    assert parse_retry_after(value, now=EXAMPLE_DATE - 30.0) == 30.0
    assert parse_retry_after(value, now=EXAMPLE_DATE - 0.25) == 0.25
    # A date in the past asks for no pause at all.
    assert parse_retry_after(value, now=EXAMPLE_DATE) == 0.0
    assert parse_retry_after(value, now=EXAMPLE_DATE + 3600.0) == 0.0


def test_an_http_date_is_measured_against_the_wall_clock_by_default() -> None:
    when = email.utils.formatdate(time.time() + 100.0, usegmt=True)
    seconds = parse_retry_after(when)
    assert seconds is not None and 98.0 <= seconds <= 100.0


@pytest.mark.parametrize(
    "value",
    [
        "soon",
        "",
        " ",
        "-5",
        "+5",
        "1e3",
        ".5",
        "5 5",
        "0x10",
        "Wed, 99 Foo",
        "Sun, 06 Nov 1994 25:49:37 GMT",
        "Sun, 31 Feb 1994 08:49:37 GMT",
    ],
)
def test_malformed_values_give_none(value: str) -> None:
    assert parse_retry_after(value, now=EXAMPLE_DATE) is None


@given(st.integers(0, 10**15))
def test_any_delay_seconds_parses_to_itself(n: int) -> None:
    assert parse_retry_after(str(n)) == n


def test_a_huge_delay_seconds_is_a_long_pause_not_a_malformed_header() -> None:
    assert parse_retry_after("1" + "0" * 12) == 1e12
    assert parse_retry_after("9" * 400) == float("inf")  # the caller caps it


def test_only_ascii_digits_count() -> None:
    assert parse_retry_after("\u0661\u0662") is None  # Arabic-Indic "12"


_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_UTC = datetime.timezone.utc


def _rfc850(d: datetime.datetime) -> str:
    return (
        f"{_DAYS[d.weekday()]}, {d.day:02d}-{_MONTHS[d.month - 1]}-{d.year % 100:02d} "
        f"{d:%H:%M:%S} GMT"
    )


def _asctime(d: datetime.datetime) -> str:
    return f"{_DAYS[d.weekday()][:3]} {_MONTHS[d.month - 1]} {d.day:2d} {d:%H:%M:%S} {d.year}"


@given(
    st.datetimes(
        min_value=datetime.datetime(1970, 1, 1),
        max_value=datetime.datetime(9999, 12, 31),
        timezones=st.just(_UTC),
    ).map(lambda d: d.replace(microsecond=0)),
    st.floats(0.0, 4e9) | st.integers(0, 4 * 10**9).map(float),
)
def test_any_imf_fixdate_parses_to_its_distance_from_now(
    when: datetime.datetime, now: float
) -> None:
    header = email.utils.format_datetime(when, usegmt=True)
    assert parse_retry_after(header, now=now) == max(0.0, when.timestamp() - now)


@given(
    st.datetimes(
        # Two-digit years: 69..99 are 19xx, 00..68 are 20xx (email.utils' pivot; RFC 9110
        # says "more than 50 years in the future is the past", the same for this century).
        min_value=datetime.datetime(1970, 1, 1),
        max_value=datetime.datetime(2068, 12, 31),
        timezones=st.just(_UTC),
    ).map(lambda d: d.replace(microsecond=0)),
    st.floats(0.0, 4e9),
)
def test_the_obsolete_formats_parse_to_the_same_instant(
    when: datetime.datetime, now: float
) -> None:
    expected = max(0.0, when.timestamp() - now)
    assert parse_retry_after(_rfc850(when), now=now) == expected
    assert parse_retry_after(_asctime(when), now=now) == expected


@given(st.text(max_size=40) | st.from_regex(r"[ \d.,:A-Za-z+-]{0,40}", fullmatch=True))
def test_any_header_value_gives_none_or_a_finite_pause(value: str) -> None:
    """Never raises: whatever an upstream sends, the answer is a pause >= 0 or None."""
    seconds = parse_retry_after(value, now=EXAMPLE_DATE)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0.0)

"""``python -m hostpool demo --fleet``: run in-process with a small fleet, check its numbers.

The demo starts its own redis-server (``$HOSTPOOL_REDIS_SERVER`` or the
PATH's) and worker processes; without redis-server these tests skip, unless
``HOSTPOOL_REQUIRE_REDIS=1`` (then they fail).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from hostpool.__main__ import main
from hostpool.demo.fleet import REDIS_SERVER_ENV, redis_server_binary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
LIMIT = 6

# 2 workers keep 6 requests each going against a vendor that serves 6 at a
# time, 50 ms per answer: once both run, 12 arrive for 6 places in every
# 50 ms round, so without a fleet quota the vendor sees up to 12 at once and
# refuses about half (the demo starts both workers at the same instant, and
# each has ~7 rounds to go). With the fleet quota, at most 6 hold a lease at
# once, and a lease is given back only after its answer left the vendor.
SMALL = [
    "demo",
    "--fleet",
    "--workers=2",
    "--requests=40",
    f"--vendor-limit={LIMIT}",
    "--service-time=0.05",
    "--max-duration=20",
]


def _require_redis_server() -> None:
    if redis_server_binary() is not None:
        return
    message = "redis-server is not installed (apt-get install redis-server)"
    if os.environ.get("HOSTPOOL_REQUIRE_REDIS", "") not in ("", "0"):
        pytest.fail(f"{message}, and HOSTPOOL_REQUIRE_REDIS is set")
    pytest.skip(message)


def _row(out: str, name: str) -> tuple[str, str]:
    """The two cells (local quotas only, FleetQuota) of one row of the results table."""
    match = re.search(rf"^  {re.escape(name)}\s+(\S+(?: \S+)?)\s{{2,}}(\S+(?: \S+)?)$", out, re.M)
    assert match is not None, f"no row {name!r} in:\n{out}"
    return match[1], match[2]


def _ints(out: str, name: str) -> tuple[int, int]:
    local, fleet = _row(out, name)
    return int(local), int(fleet)


def test_fleet_demo_caps_the_vendor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _require_redis_server()
    chart = tmp_path / "fleet.png"
    assert main([*SMALL, "--chart", str(chart)]) == 0
    out, err = capsys.readouterr()

    assert "local quotas only" in out
    assert f"FleetQuota(max_connections={LIMIT}) on Redis" in out
    peak = _ints(out, f"vendor peak in flight (limit {LIMIT})")
    ok = _ints(out, "vendor 200 OK")
    refused = _ints(out, "vendor 429 Too Many Requests")
    waits = _row(out, "fleet waits")
    # Every request got an answer from the vendor in both runs.
    assert ok[0] + refused[0] == 80, out
    assert ok[1] + refused[1] == 80, out
    # Local quotas only: the two processes together went past the vendor's limit.
    assert peak[0] > LIMIT, out
    assert refused[0] > 0, out
    # FleetQuota: never past the limit, nothing refused, and requests did wait.
    assert peak[1] <= LIMIT, out
    assert refused[1] == 0, out
    assert ok[1] == 80, out
    assert waits[0] == "-"
    assert int(waits[1]) > 0, out
    assert "fleet store unavailable" not in out  # shown only when Redis failed to answer
    for name in ("total time", "requests/s (all answers)", "200 OK/s"):
        _row(out, name)
    for name in ("worker latency p50", "worker latency p99"):
        local, fleet = _row(out, name)
        assert re.fullmatch(r"[0-9.]+ m?s", local), out
        assert re.fullmatch(r"[0-9.]+ m?s", fleet), out
    assert "[1/2]" in err
    assert "[2/2]" in err

    if HAVE_MATPLOTLIB:
        assert f"Chart: {chart.resolve()}" in out
        assert chart.read_bytes()[:8] == PNG_MAGIC
    else:
        assert "pip install 'hostpool[demo]'" in out
        assert not chart.exists()


def test_fleet_demo_default_chart_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --chart, the fleet demo writes its own file, not the other demo's."""
    _require_redis_server()
    if not HAVE_MATPLOTLIB:
        pytest.skip("matplotlib is not installed")
    monkeypatch.chdir(tmp_path)
    tiny = ["demo", "--fleet", "--workers=1", "--requests=4", "--vendor-limit=2"]
    assert main([*tiny, "--service-time=0.01"]) == 0
    assert "Chart: " in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["hostpool-fleet-demo.png"]


@pytest.mark.parametrize("how", ["env", "path"])
def test_fleet_demo_without_redis_server(
    how: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if how == "env":
        monkeypatch.setenv(REDIS_SERVER_ENV, "/nonexistent/redis-server")
    else:
        monkeypatch.delenv(REDIS_SERVER_ENV, raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no redis-server
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--fleet"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "apt-get install redis-server" in err
    assert "brew install redis" in err
    assert "--redis" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--workers=3"],  # a fleet option without --fleet
        ["demo", "--fleet", "--workers=0"],
        ["demo", "--fleet", "--vendor-limit=x"],
        ["demo", "--fleet", "--redis=http://127.0.0.1/"],
        ["demo", "--fleet", "--chart=/nonexistent-dir/x.png"],
    ],
)
def test_fleet_demo_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_fleet_demo_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--fleet",
        "--workers",
        "--requests",
        "--concurrency",
        "--vendor-limit",
        "--service-time",
        "--redis",
    ):
        assert option in out


def test_fleet_demo_without_matplotlib(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _require_redis_server()
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    chart = tmp_path / "fleet.png"
    tiny = ["demo", "--fleet", "--workers=1", "--requests=4", "--vendor-limit=2"]
    assert main([*tiny, "--service-time=0.01", "--chart", str(chart)]) == 0
    assert "Chart skipped: matplotlib is not installed (pip install 'hostpool[demo]')" in (
        capsys.readouterr().out
    )
    assert not chart.exists()

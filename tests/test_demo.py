"""``python -m hostpool demo`` (and ``stats``): run in-process with tiny workloads.

The demo runs its own event loop, so these are plain synchronous tests.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hostpool.__main__ import main
from hostpool.demo.server import LoopbackUpstreams, _bind, _Listener

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# Small, but the point stays robust: a budget of 4 with 0.2 s responses serves
# 20 slow requests a second, and the flood arrives at 160 a second, so the
# shared pool stays full for ~0.6 s and healthy requests wait up to a slow
# response (~200 ms) each; through the router they take a few milliseconds.
SMALL = [
    "--slow=0.2",
    "--slow-after=0.02",
    "--flood=16",
    "--flood-rate=160",
    "--healthy=25",
    "--pace=0.02",
    "--budget=4",
    "--quota=2",
    "--max-duration=20",
]
# Just enough to go through every step.
TINY = [
    "--slow=0.05",
    "--slow-after=0",
    "--flood=4",
    "--flood-rate=1000",
    "--healthy=4",
    "--pace=0.01",
    "--budget=4",
]

_DURATION = r"([0-9.]+) (ms|s)"


def _seconds(value: str, unit: str) -> float:
    return float(value) / 1000 if unit == "ms" else float(value)


def _p99s(out: str) -> tuple[float, float]:
    """The healthy host's p99 for (shared client, HostRouter) from the results table."""
    match = re.search(rf"latency p99\s+{_DURATION}\s+{_DURATION}", out)
    assert match is not None, out
    shared = _seconds(match[1], match[2])
    routed = _seconds(match[3], match[4])
    return shared, routed


def test_demo_shows_isolation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chart = tmp_path / "demo.png"
    assert main(["demo", *SMALL, "--chart", str(chart)]) == 0
    out, err = capsys.readouterr()

    assert "shared AsyncClient" in out
    assert "HostRouter" in out
    for row in ("latency p50", "latency p95", "latency p99", "latency max", "throughput"):
        assert row in out
    assert "router.stats()" in out
    assert "127.0.0.1" in out
    shared_p99, routed_p99 = _p99s(out)
    assert routed_p99 < shared_p99, out
    # stderr is not a terminal here: plain progress lines, no control codes.
    assert "[1/2]" in err
    assert "[2/2]" in err
    assert "\r" not in err
    assert "\x1b" not in err
    assert "\x1b" not in out

    if HAVE_MATPLOTLIB:
        assert f"Chart: {chart.resolve()}" in out
        assert chart.read_bytes()[:8] == PNG_MAGIC
    else:
        assert "pip install 'hostpool[demo]'" in out
        assert not chart.exists()


def test_demo_no_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", *TINY, "--no-chart"]) == 0
    out, _ = capsys.readouterr()
    assert "latency p99" in out
    assert "Chart" not in out
    assert list(tmp_path.iterdir()) == []


def test_demo_without_matplotlib(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    chart = tmp_path / "demo.png"
    assert main(["demo", *TINY, "--chart", str(chart)]) == 0
    out, _ = capsys.readouterr()
    assert "pip install 'hostpool[demo]'" in out
    assert not chart.exists()


def test_demo_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--slow",
        "--slow-after",
        "--flood",
        "--flood-rate",
        "--healthy",
        "--pace",
        "--budget",
        "--quota",
        "--max-duration",
        "--chart",
        "--no-chart",
        "--seed",
    ):
        assert option in out


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--budget=4", "--quota=5"],
        ["demo", "--slow=0"],
        ["demo", "--flood=-3"],
        ["demo", "--chart=/nonexistent-dir/x.png"],
        ["demo", "--chart=x.png", "--no-chart"],
        ["stats", "ftp://example.com/"],
    ],
)
def test_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_stats_command(capsys: pytest.CaptureFixture[str]) -> None:
    with LoopbackUpstreams(slow_delay=0.0) as upstreams:
        urls = [upstreams.url("healthy"), upstreams.url("slow")]
        assert main(["stats", *urls, "-n", "6", "--budget", "4", "--quota", "2"]) == 0
    out = capsys.readouterr().out
    assert "6 x 200" in out
    assert "peak in flight" in out
    for kind in ("healthy", "slow"):
        assert re.search(rf"^  {re.escape(upstreams.host(kind))}\s+2\s+6\s", out, re.M), out


def test_python_dash_m_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hostpool", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout
    assert "stats" in result.stdout


def test_slow_host_falls_back_to_localhost() -> None:
    # Where 127.0.0.2 is not configured (macOS), the slow host is "localhost".
    listener = _Listener("slow", "192.0.2.1", "192.0.2.1")  # TEST-NET-1: never local
    sock = _bind(listener)
    try:
        assert (listener.host, listener.address) == ("localhost", "127.0.0.1")
        assert listener.port == sock.getsockname()[1]
    finally:
        sock.close()

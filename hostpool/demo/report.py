"""The demo's text report: the header, the results table and the conclusion in plain words."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

from .._format import fmt_seconds, format_router_stats, quantile, table
from .config import DemoConfig
from .server import LoopbackUpstreams
from .workload import RunResult, Summary, summarize

__all__ = ["conclusion", "header", "report"]


def _times(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def _ratio(shared: float, routed: float, *, lower_is_better: bool = True) -> str:
    """Plain words: how HostRouter's figure compares to the shared client's."""
    if math.isnan(shared) or math.isnan(routed) or shared <= 0 or routed <= 0:
        return "-"
    ratio = shared / routed
    if 1 / 1.1 < ratio < 1.1:
        return "about the same"
    if lower_is_better:
        return f"{_times(ratio)} lower" if ratio > 1 else f"{_times(1 / ratio)} higher"
    return f"{_times(1 / ratio)} higher" if ratio < 1 else f"{_times(ratio)} lower"


def _baseline(runs: Sequence[RunResult], before: float) -> float:
    """Healthy-host p50 over requests sent before the slow host turned slow."""
    latencies = [
        s.latency
        for run in runs
        for s in run.of("healthy")
        if s.at + (s.latency or 0.0) < before and s.latency is not None
    ]
    return quantile(latencies, 0.5)


def conclusion(
    config: DemoConfig,
    upstreams: LoopbackUpstreams,
    shared: RunResult,
    routed: RunResult,
) -> str:
    """A few plain words on what the numbers show (computed, never canned)."""
    healthy, slow = upstreams.host("healthy"), upstreams.host("slow")
    hs, hr = summarize(shared.of("healthy")), summarize(routed.of("healthy"))
    ss, sr = summarize(shared.of("slow")), summarize(routed.of("slow"))
    base = _baseline([shared, routed], config.slow_after)
    base_text = (
        f" (before {slow} turned slow it answered in {fmt_seconds(base)})"
        if not (math.isnan(base))
        else ""
    )
    peak = shared.upstream["slow"].peak_in_flight
    took = (
        "every connection of the pool"
        if peak >= config.budget
        else f"{peak} of the pool's {config.budget} connections"
    )
    if shared.cut_off or routed.cut_off:
        return textwrap.fill(
            f"A run hit --max-duration ({config.max_duration:g} s), so these figures only "
            "cover the requests that finished; raise it or shrink the workload.",
            width=78,
        )
    words: list[str] = []
    if hs.errors + hr.errors:
        words.append(
            f"Errors on {healthy}: {hs.errors} with the shared client, {hr.errors} with "
            f"HostRouter ({_error_text(hs, hr)})."
        )
    if math.isnan(hs.p99) or math.isnan(hr.p99):
        words.append(f"Too few requests to {healthy} succeeded to compare latencies.")
    elif _clearly_above(hs.p99, hr.p99, config):
        words.append(
            f"With one shared pool, {slow}'s backlog held {took}, and requests to the "
            f"healthy {healthy} waited for connections: p50 {fmt_seconds(hs.p50)}, p99 "
            f"{fmt_seconds(hs.p99)}{base_text}. With HostRouter, {slow} could hold at "
            f"most {config.quota} connections and {healthy} kept its own: p99 "
            f"{fmt_seconds(hr.p99)}, {_times(hs.p99 / hr.p99)} lower."
        )
    elif _clearly_above(hr.p99, hs.p99, config):
        words.append(
            f"HostRouter did worse for {healthy} in this run: p99 {fmt_seconds(hr.p99)} "
            f"against {fmt_seconds(hs.p99)} for the shared client. Its quota of "
            f"{config.quota} may be too small for {healthy}'s own load (see --quota)."
        )
    else:
        words.append(
            f"No clear difference for {healthy} this time: p99 {fmt_seconds(hs.p99)} with "
            f"the shared client, {fmt_seconds(hr.p99)} with HostRouter; {slow}'s backlog "
            f"held {took}. To fill the shared pool, raise --flood or --flood-rate, lower "
            f"--budget, or keep the flood going past --slow-after."
        )
    if sr.finished_at > ss.finished_at * 1.1:  # False when either is nan
        words.append(
            f"The price: {slow}'s flood, held to its quota, was answered by "
            f"t={sr.finished_at:.1f} s instead of t={ss.finished_at:.1f} s; set a quota "
            f"(and pool_timeout or max_pending) to choose how much a slow host may take."
        )
    return "\n".join(textwrap.fill(w, width=78) for w in words)


def _clearly_above(worse: float, better: float, config: DemoConfig) -> bool:
    """``worse`` is well above ``better``: 3 times, and by a quarter of the slow latency."""
    return worse >= 3 * better and worse - better >= max(0.02, config.slow / 4)


def _error_text(*summaries: Summary) -> str:
    kinds: dict[str, int] = {}
    for summary in summaries:
        for kind, n in summary.error_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + n
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))


def report(
    config: DemoConfig, upstreams: LoopbackUpstreams, shared: RunResult, routed: RunResult
) -> list[str]:
    """The results table, ``router.stats()`` lines and the conclusion."""
    healthy, slow = upstreams.host("healthy"), upstreams.host("slow")
    hs, hr = summarize(shared.of("healthy")), summarize(routed.of("healthy"))
    ss, sr = summarize(shared.of("slow")), summarize(routed.of("slow"))
    rows: list[list[str]] = [
        [f"healthy host {healthy}", "shared AsyncClient", "HostRouter", "HostRouter vs shared"],
    ]
    for name in ("p50", "p95", "p99", "max"):
        a, b = getattr(hs, name), getattr(hr, name)
        rows.append([f"  latency {name}", fmt_seconds(a), fmt_seconds(b), _ratio(a, b)])
    rows.append(
        [
            "  throughput",
            f"{hs.throughput:.1f} req/s",
            f"{hr.throughput:.1f} req/s",
            _ratio(hs.throughput, hr.throughput, lower_is_better=False),
        ]
    )
    rows.append([f"  errors (of {hs.requests})", str(hs.errors), str(hr.errors), ""])
    rows.append([f"slow host {slow}", "", "", ""])
    rows.append(
        [
            "  last answer at",
            _at(ss.finished_at),
            _at(sr.finished_at),
            "",
        ]
    )
    rows.append(
        [
            "  most in flight (server side)",
            str(shared.upstream["slow"].peak_in_flight),
            str(routed.upstream["slow"].peak_in_flight),
            "",
        ]
    )
    rows.append([f"  errors (of {ss.requests})", str(ss.errors), str(sr.errors), ""])
    lines = ["Results (latency from the scheduled send time to the full response):", ""]
    lines += table(rows)
    if hs.errors + hr.errors + ss.errors + sr.errors:
        lines.append(
            f"  errors: shared {_error_text(hs, ss) or 'none'}; HostRouter "
            f"{_error_text(hr, sr) or 'none'}"
        )
    if routed.router_stats is not None:
        lines += ["", "router.stats() after the HostRouter run:", ""]
        lines += format_router_stats(routed.router_stats, [healthy, slow])
        lines.append(
            "  (waited: requests that queued more than 1 ms for a slot of their partition)"
        )
    lines += ["", conclusion(config, upstreams, shared, routed)]
    return lines


def _at(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"t={seconds:.1f} s"


def header(config: DemoConfig, upstreams: LoopbackUpstreams) -> list[str]:
    """What the demo is about to do: the two upstreams, the workload, the two clients."""
    healthy, slow = upstreams.host("healthy"), upstreams.host("slow")
    budget = f"httpx.Limits(max_connections={config.budget})"
    lines = [
        "hostpool demo: one upstream turns slow and is flooded; does the other one suffer?",
        "",
        f"  healthy  {upstreams.url('healthy'):<28} answers at once; {config.healthy} "
        f"requests, one every {config.pace * 1000:g} ms",
        f"  slow     {upstreams.url('slow'):<28} {config.flood} requests at "
        f"{config.flood_rate:g}/s; from t={config.slow_after:g} s it takes "
        f"{fmt_seconds(config.slow)} per response",
        "",
        "  The same schedule runs through two clients with the same budget:",
        f"    [1/2] httpx.AsyncClient(limits={budget})",
        f"    [2/2] hostpool.HostRouter(limits={budget},",
        f'              quotas={{"{healthy}": {config.quota}, "{slow}": {config.quota}}})',
    ]
    if slow == "localhost":
        lines.append(
            "  (127.0.0.2 is not configured here, so the slow host is 'localhost' on "
            "127.0.0.1;\n   on macOS: sudo ifconfig lo0 alias 127.0.0.2 up)"
        )
    return [*lines, ""]

"""Turn ``<out>/*.json`` into ``RESULTS.md`` and PNG charts. Every number comes from the run."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._common import DEFAULT_OUT, Settings, read_results

__all__ = ["write_report"]

_CLIENT_ORDER = ["bare", "aiohttp", "httpx", "hostpool", "hostpool-h11"]
_CLIENT_LABEL = {
    "bare": "bare asyncio (ceiling)",
    "aiohttp": "aiohttp",
    "httpx": "httpx.AsyncClient",
    "hostpool": "hostpool.HostRouter",
    "hostpool-h11": "HostRouter, fast path off (h11: before)",
}
_LOOP_ORDER = ["asyncio", "uvloop"]


# -- formatting ----------------------------------------------------------------------


def _num(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def _ratio(value: Any) -> str:
    return _num(value, 2, "x")


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.0%}"


def _mib(value: Any) -> str:
    return _num(None if value is None else value / 2**20, 1, " MiB")


def _met(flag: Any) -> str:
    if flag is None:
        return "n/a"
    return "**met**" if flag else "**not met**"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return [*out, ""]


def _clients(names: Sequence[str]) -> list[str]:
    return [n for n in _CLIENT_ORDER if n in names]


def _loops(data: dict[str, Any]) -> list[str]:
    """The loops of a multi-loop result, default first (``asyncio`` alone for older files)."""
    names = data.get("loop_names") or ["asyncio"]
    return [n for n in _LOOP_ORDER if n in names] + [n for n in names if n not in _LOOP_ORDER]


def _by_loop(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{loop: {"medians", "ratios"}}`` of a throughput result, old (one loop) or new."""
    if "loops" in data:
        return {loop: data["loops"][loop] for loop in _loops(data)}
    return {"asyncio": {"medians": data["medians"], "ratios": data["ratios"]}}


# -- charts ----------------------------------------------------------------------------


def _charts(results: dict[str, dict[str, Any]], out: Path) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    made: dict[str, Path] = {}
    painters: dict[str, Callable[[Any, dict[str, Any]], None]] = {
        "throughput": _chart_throughput,
        "large_body": _chart_large_body,
        "isolation": _chart_isolation,
        "many_hosts": _chart_many_hosts,
        "scheduler": _chart_scheduler,
        "footprint": _chart_footprint,
    }
    for name, paint in painters.items():
        if name not in results:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
        try:
            paint(ax, results[name])
            fig.tight_layout()
            path = out / f"{name}.png"
            fig.savefig(path)
            made[name] = path
        finally:
            plt.close(fig)
    return made


def _chart_throughput(ax: Any, data: dict[str, Any]) -> None:
    levels = sorted(data["medians"], key=int)
    xs = [int(c) for c in levels]
    styles = {"asyncio": "-", "uvloop": "--"}
    by_loop = _by_loop(data)
    colours: dict[str, Any] = {}
    for loop, loop_data in by_loop.items():
        medians = loop_data["medians"]
        for name in _clients(next(iter(medians.values()))):
            ys = [medians[c][name]["rps"] for c in levels]
            (line,) = ax.plot(
                xs,
                ys,
                marker="o",
                linestyle=styles.get(loop, ":"),
                color=colours.get(name),
                label=None if name in colours else _CLIENT_LABEL[name],
            )
            colours[name] = line.get_color()
    if len(by_loop) > 1:
        for loop in by_loop:
            ax.plot([], [], color="black", linestyle=styles.get(loop, ":"), label=loop)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrency (one host)")
    ax.set_ylabel("requests/s (median)")
    ax.set_title("Throughput vs concurrency (solid: asyncio, dashed: uvloop)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def _chart_large_body(ax: Any, data: dict[str, Any]) -> None:
    loops = _loops(data)
    names = _clients(data["clients"])
    width = 0.8 / max(len(loops), 1)
    for i, loop in enumerate(loops):
        ys = [data["medians"][loop][n]["mb_per_s"] for n in names]
        xs = [j + (i - (len(loops) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, ys, width, label=loop)
    ax.set_xticks(range(len(names)), [n for n in names], fontsize=8)
    ax.set_ylabel("MB/s (median)")
    ax.set_title(f"{data['body_bytes'] / 2**20:g} MiB body, streamed")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()


def _chart_isolation(ax: Any, data: dict[str, Any]) -> None:
    names = _clients(data["medians"])
    width = 0.2
    bars = [("alone", "p50_ms"), ("alone", "p99_ms"), ("flood", "p50_ms"), ("flood", "p99_ms")]
    for i, (mode, key) in enumerate(bars):
        ys = [data["medians"][n][mode][key] for n in names]
        xs = [j + (i - 1.5) * width for j in range(len(names))]
        ax.bar(xs, ys, width, label=f"{key[:3]} {mode}")
    ax.set_xticks(range(len(names)), [_CLIENT_LABEL[n] for n in names])
    ax.set_yscale("log")
    ax.set_ylabel("fast host latency, ms (median of runs)")
    ax.set_title("Isolation: fast host alone vs while a slow host is flooded")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend()


def _chart_many_hosts(ax: Any, data: dict[str, Any]) -> None:
    levels = sorted(data["medians"], key=int)
    xs = [int(p) for p in levels]
    for name in _clients(next(iter(data["medians"].values()))):
        ys = [data["medians"][p][name]["cpu_us_per_request"] for p in levels]
        ax.plot(xs, ys, marker="o", label=_CLIENT_LABEL[name])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("partitions (distinct origins)")
    ax.set_ylabel("client CPU per request, µs (median)")
    ax.set_title("Per-request cost vs number of hosts")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _chart_scheduler(ax: Any, data: dict[str, Any]) -> None:
    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for cell in data["cells"]:
        series.setdefault((cell["shape"], cell["waiters"]), []).append(
            (cell["partitions"], cell["median_ns"] / 1000)
        )
    for (shape, waiters), points in series.items():
        points.sort()
        ax.plot(
            [p for p, _ in points],
            [v for _, v in points],
            marker="o",
            label=f"{shape}, {waiters:,} waiters",
        )
    ax.axhline(5.0, color="red", linestyle="--", linewidth=1, label="target 5 µs")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("partitions")
    ax.set_ylabel("admit + release, µs (median)")
    ax.set_title("Scheduler cost")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _chart_footprint(ax: Any, data: dict[str, Any]) -> None:
    runs = data["runs"]
    phases = ["start", "peak", "idle", "after"]
    width = 0.8 / max(len(runs), 1)
    for i, (name, run) in enumerate(runs.items()):
        ys = [run["points"][p]["rss"] / 2**20 for p in phases]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(phases))]
        ax.bar(xs, ys, width, label=f"{name} ({run['partitions']:,} partitions)")
    ax.set_xticks(range(len(phases)), phases)
    ax.set_ylabel("RSS, MiB")
    ax.set_title("Footprint: RSS before, during, and after the idle sweep")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


# -- markdown --------------------------------------------------------------------------


def _image(lines: list[str], charts: dict[str, Path], name: str, report: Path) -> None:
    if name in charts:
        rel = os.path.relpath(charts[name], report.parent)
        lines += [f"![{name}]({rel})", ""]


def _targets_table(results: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    labels = {
        ("isolation", "hostpool_flood_vs_alone"): "1 · hostpool p99 under flood / alone",
        ("isolation", "httpx_vs_hostpool_under_flood"): "1 · httpx p99 / hostpool p99, flood",
        ("throughput", "hostpool_vs_httpx_at_50"): "2 · hostpool / httpx req/s at c=50",
        ("throughput", "hostpool_flat"): "2 · hostpool flat from c=1 to c=200",
        ("throughput", "upstream_not_bottleneck"): "2 · upstream is not the bottleneck",
        ("throughput", "hostpool_vs_aiohttp_at_50"): "fast path · hostpool / aiohttp req/s, c=50",
        ("throughput", "hostpool_vs_aiohttp_at_1"): "fast path · hostpool / aiohttp req/s, c=1",
        ("throughput", "hostpool_vs_aiohttp_at_200"): "fast path · hostpool / aiohttp req/s, c=200",
        ("throughput", "hostpool_cpu_vs_aiohttp_at_50"): "fast path · client CPU per request "
        "/ aiohttp's, c=50",
        ("large_body", "hostpool_vs_aiohttp_mb_per_s"): "fast path · 10 MiB streamed, "
        "hostpool / aiohttp MB/s",
        ("large_body", "hostpool_read_peak"): "fast path · hostpool heap peak while "
        "streaming 10 MiB",
        ("many_hosts", "hostpool_cost_flat"): "3 · hostpool cost flat, 1 → 1,000 partitions",
        ("scheduler", "max_cost"): "4 · scheduler admit + release cost",
        ("scheduler", "independent_of_counts"): "4 · independent of partitions and waiters",
        ("footprint", "mock_rss_back_within_10pct"): "5 · RSS back after sweep (100k, mock)",
        ("footprint", "real_rss_back_within_10pct"): "5 · RSS back after sweep (real sockets)",
        ("footprint", "mock_heap_back_within_10pct"): "5 · Python heap back (100k, mock)",
        ("footprint", "real_heap_back_within_10pct"): "5 · Python heap back (real sockets)",
        ("footprint", "partitions_dropped"): "5 · idle partitions dropped",
        ("overhead", "stats_overhead"): "stats cost per request (issue 4)",
        ("fleet", "fleet_acquire_round_trips"): "fleet · Redis calls per request, acquire",
        ("fleet", "fleet_release_round_trips"): "fleet · Redis round trips per request, release",
    }
    for (scenario, key), label in labels.items():
        target = results.get(scenario, {}).get("targets", {}).get(key)
        if target is None:
            continue
        rows.append(
            [label, str(target["target"]), _target_value(key, target["value"]), _met(target["met"])]
        )
    return _table(["target", "wanted", "measured", "status"], rows)


def _target_value(key: str, value: Any) -> str:
    if key.startswith("fleet_") and isinstance(value, dict):
        return ", ".join(f"{k}: {v:.2f} per request" for k, v in value.items())
    if key == "hostpool_read_peak" and isinstance(value, dict):
        return ", ".join(f"{k} {v / 2**10:,.0f} KiB" for k, v in value.items())
    if isinstance(value, dict):
        if all(isinstance(v, bool) for v in value.values()):
            return ", ".join(
                f"{k if '=' in k else 'c=' + k}: {'yes' if v else 'no'}" for k, v in value.items()
            )
        return ", ".join(f"{k} {v:.2f}x" for k, v in value.items())
    if key in ("hostpool_flat", "hostpool_cost_flat"):
        return f"max/min = {1 + value:.2f}"
    if key == "stats_overhead":
        return f"{value:.2%} of a request"
    if key == "max_cost":
        return f"worst median {value:.2f} µs"
    if key == "partitions_dropped":
        return f"{value} live after"
    return _ratio(value)


def _header_result(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The first result of the machine and tree most scenarios ran on.

    The header describes that machine; a scenario run elsewhere (``fleet``, run
    later on its own) says so in its own section.
    """

    def machine(data: dict[str, Any]) -> tuple[Any, ...]:
        m = data.get("machine", {})
        return m.get("cpu_model"), m.get("platform"), m.get("git")

    keys = [machine(d) for d in results.values()]
    common = max(keys, key=keys.count)
    return next(d for d in results.values() if machine(d) == common)


def _machine(results: dict[str, dict[str, Any]]) -> list[str]:
    first = _header_result(results)
    m = first["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [
        f"- machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['cpu_model']}, "
        f"{m['platform']}",
        f"- Python {m['python']} ({m['implementation']}); {versions}",
    ]
    git = m.get("git")
    if git:
        lines.append(f"- hostpool tree: {git}")
    changed = sorted(
        {
            str(d["machine"]["git_at_write"])
            for d in results.values()
            if d["machine"].get("git_at_write")
        }
    )
    if changed:
        lines.append(
            "- hostpool/ changed while the run went on (later: "
            + ", ".join(changed)
            + "); every scenario measured the code imported when the run began, the tree above"
        )
    loads: dict[str, dict[str, Any]] = {
        name: data["background"] for name, data in results.items() if data.get("background")
    }
    if loads:
        parts = [f"{name} {_pct(b.get('other_cpu_util'))}" for name, b in loads.items()]
        lines.append(
            "- CPU used by *other* processes while each scenario ran (of one core): "
            + ", ".join(parts)
        )
        if any((b.get("other_cpu_util") or 0) > 0.25 for b in loads.values()):
            lines.append(
                "- **the machine was not quiet**: other processes used a noticeable share "
                "of the CPUs; interleaving spreads that noise over every client, but "
                "absolute figures are lower than on a quiet machine"
            )
    dates = sorted({d["machine"]["date"] for d in results.values()})
    lines.append(f"- run: {dates[0]} … {dates[-1]}" if len(dates) > 1 else f"- run: {dates[0]}")
    if any(d.get("quick") for d in results.values()):
        lines.append("- **quick smoke run: a few requests each, the figures mean nothing**")
    return [*lines, ""]


def _section_isolation(data: dict[str, Any], lines: list[str]) -> None:
    s = data["settings"]
    lines += [
        "## 1. Isolation",
        "",
        f"A slow host ({data['slow_url']}, {s['flood_delay_ms']} ms per answer) gets "
        f"{s['flood']} requests at once; the fast host ({data['fast_url']}) gets "
        f"{s['fast_requests']} requests, one every {s['fast_interval_ms']} ms. Budget: "
        f"{data['limits']['total']} sockets in all for every client; hostpool and aiohttp cap "
        f"each host at {data['limits']['per_host']}. Fast-host latency, medians over "
        f"{s['isolation_repeats']} interleaved runs:",
        "",
    ]
    rows = []
    for name in _clients(data["medians"]):
        m = data["medians"][name]
        rows.append(
            [
                _CLIENT_LABEL[name],
                _num(m["alone"]["p50_ms"], 2),
                _num(m["alone"]["p99_ms"], 2),
                _num(m["flood"]["p50_ms"], 2),
                _num(m["flood"]["p99_ms"], 2),
                _ratio(m["flood"]["p99_ms"] / m["alone"]["p99_ms"]),
                f"{_num(m['alone'].get('p99_pooled_ms'), 2)} / "
                f"{_num(m['flood'].get('p99_pooled_ms'), 2)}",
            ]
        )
    lines += _table(
        [
            "client",
            "p50 alone, ms",
            "p99 alone, ms",
            "p50 flood, ms",
            "p99 flood, ms",
            "p99 flood / alone",
            "p99 of all runs' samples, alone / flood, ms",
        ],
        rows,
    )
    lines += [", ".join(f"{k}: {_ratio(v)}" for k, v in data["ratios"].items()), ""]


def _loop_header(c: str, loop: str, loops: Sequence[str]) -> str:
    return f"c={c} {loop}" if len(loops) > 1 else f"c={c}"


def _section_throughput(data: dict[str, Any], lines: list[str]) -> None:
    s = data["settings"]
    by_loop = _by_loop(data)
    loops = list(by_loop)
    levels = sorted(data["medians"], key=int)
    names = _clients(next(iter(data["medians"].values())))
    cols = [(c, loop) for c in levels for loop in loops]
    uv = (data.get("machine", {}).get("versions") or {}).get("uvloop")
    loop_text = (
        f" Every client ran on asyncio's default event loop and on uvloop {uv or ''}: each "
        "trial in an event loop of its own, all (loop, client) pairs interleaved, ratios "
        "paired within a loop."
        if len(loops) > 1
        else ""
    )
    lines += [
        "## 2. Throughput vs concurrency",
        "",
        f"One host, {s['trial_seconds']} s per trial with a fresh client, "
        f"{s['repeats']} interleaved repeats, medians. Limits for every client: "
        f"{data['limits']['total']} sockets ({data['limits']['per_host']} per host). "
        "The bare asyncio client has no limit (one connection per worker)." + loop_text,
        "",
        "requests/s:",
        "",
    ]
    header = ["client", *[_loop_header(c, loop, loops) for c, loop in cols]]

    def cell(loop: str, c: str, name: str, key: str, digits: int) -> str:
        return _num(by_loop[loop]["medians"][c].get(name, {}).get(key), digits)

    rows = [[_CLIENT_LABEL[n], *[cell(loop, c, n, "rps", 0) for c, loop in cols]] for n in names]
    ratio_names: list[str] = []
    for loop_data in by_loop.values():
        for by_c in loop_data["ratios"].values():
            ratio_names += [r for r in by_c if r not in ratio_names]
    rows += [
        [f"*{r}*", *[_ratio(by_loop[loop]["ratios"][c].get(r)) for c, loop in cols]]
        for r in ratio_names
        if not r.startswith("cpu ")
    ]
    lines += _table(header, rows)
    lines += ["client CPU per request, µs (the upstream runs in its own process):", ""]
    rows = [
        [_CLIENT_LABEL[n], *[cell(loop, c, n, "cpu_us_per_request", 1) for c, loop in cols]]
        for n in names
    ]
    rows += [
        [f"*{r}*", *[_ratio(by_loop[loop]["ratios"][c].get(r)) for c, loop in cols]]
        for r in ratio_names
        if r.startswith("cpu ")
    ]
    lines += _table(header, rows)
    lines += [
        "upstream CPU use while serving each client (one core = 100%): the upstream is "
        "not the bottleneck while it has CPU to spare and serves some client faster.",
        "",
    ]
    rows = [
        [
            _CLIENT_LABEL[n],
            *[
                _pct(by_loop[loop]["medians"][c].get(n, {}).get("upstream_cpu_util"))
                for c, loop in cols
            ],
        ]
        for n in names
    ]
    lines += _table(header, rows)


def _section_large_body(data: dict[str, Any], lines: list[str]) -> None:
    s = data["settings"]
    loops = _loops(data)
    names = _clients(data["clients"])
    size = data["body_bytes"]
    lines += [
        f"## Large body ({size / 2**20:g} MiB, streamed)",
        "",
        f"`{data['url']}`: one {size / 2**20:g} MiB body per request on one keep-alive "
        "connection, read chunk by chunk as it comes and dropped: httpx and hostpool through "
        '`client.stream("GET", url)` + `aiter_bytes()`, aiohttp through '
        f"`resp.content.iter_chunked({data['chunk_bytes'] // 1024} KiB)`, the bare client by "
        f"counting what its protocol receives. {s['large_trial_seconds']} s of reads per "
        f"trial after one warm-up read, fresh client and event loop per trial, "
        f"{s['repeats']} interleaved repeats, medians; MB = 10^6 bytes. *Heap peak*: "
        "tracemalloc's peak during one more read (after a warm-up read, in a separate "
        "traced run), above what was allocated before it: what a client holds at once "
        "while streaming (a client that buffered the body would show its whole size).",
        "",
    ]
    header = [
        "client",
        *[f"MB/s {loop}" for loop in loops],
        *[f"CPU ms / read {loop}" for loop in loops],
        *[f"upstream CPU {loop}" for loop in loops],
        *[f"heap peak {loop}" for loop in loops],
    ]
    rows = []
    for n in names:
        rows.append(
            [
                _CLIENT_LABEL[n],
                *[_num(data["medians"][loop][n]["mb_per_s"]) for loop in loops],
                *[_num(data["medians"][loop][n]["cpu_ms_per_read"], 1) for loop in loops],
                *[_pct(data["medians"][loop][n].get("upstream_cpu_util")) for loop in loops],
                *[_num(data["memory"][loop][n]["peak_bytes"] / 2**10, 0, " KiB") for loop in loops],
            ]
        )
    ratios = _large_ratios(data)
    ratio_names: list[str] = []
    for by_r in ratios.values():
        ratio_names += [r for r in by_r if r not in ratio_names]
    for r in ratio_names:
        cells = [_ratio(ratios[loop].get(r)) for loop in loops]
        blank = [""] * len(loops)
        if r.startswith("cpu "):
            rows.append([f"*{r}*", *blank, *cells, *blank, *blank])
        else:
            rows.append([f"*{r}*", *cells, *blank, *blank, *blank])
    lines += _table(header, rows)
    bound = _upstream_bound(data)
    if bound:
        lines += [
            "The upstream (one process, one core) used 80% of a core or more while serving "
            + ", ".join(bound)
            + ": there the MB/s are bounded by the upstream as much as by the client; the "
            "client CPU per read (and *cpu hostpool/aiohttp*) is the client's own cost.",
            "",
        ]


def _large_ratios(data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The large-body ratios, with the CPU-per-read ratio computed from the samples
    when the result file predates it."""
    from .large_body import cpu_ratios

    out: dict[str, dict[str, float]] = {}
    for loop, by_r in data["ratios"].items():
        out[loop] = dict(by_r)
        if "cpu hostpool/aiohttp" not in by_r:
            out[loop].update(cpu_ratios(data["samples"][loop]))
    return out


def _upstream_bound(data: dict[str, Any]) -> list[str]:
    """Clients (per loop) during whose large-body reads the upstream used >= 80% of a core."""
    return [
        f"{name} ({loop}, {_pct(m.get('upstream_cpu_util'))})"
        for loop in _loops(data)
        for name, m in data["medians"][loop].items()
        if (m.get("upstream_cpu_util") or 0) >= 0.8
    ]


def _large_cpu_note(lb: dict[str, Any]) -> str:
    cpu = _large_ratios(lb)
    text = "; ".join(
        f"{loop} {_ratio(cpu[loop]['cpu hostpool/aiohttp'])}"
        for loop in _loops(lb)
        if cpu[loop].get("cpu hostpool/aiohttp")
    )
    if not text:
        return ""
    bound = [b for b in _upstream_bound(lb) if b.startswith(("aiohttp", "hostpool ", "bare"))]
    return (
        f" hostpool's client CPU per read over aiohttp's: {text}"
        + (
            " (the upstream used 80% of its core or more for "
            + ", ".join(bound)
            + ": the MB/s ratio is partly the upstream's, the CPU ratio is the clients' own)"
            if bound
            else ""
        )
        + "."
    )


def _before_data(settings: Settings) -> dict[str, Any] | None:
    """The throughput result recorded before the fast path (``<out>/before/throughput.json``)."""
    import json

    for folder in (settings.out / "before", DEFAULT_OUT / "before"):
        path = folder / "throughput.json"
        if path.exists():
            try:
                data: dict[str, Any] = json.loads(path.read_text())
            except (OSError, ValueError):
                return None
            return data
    return None


def _profile_buckets(profile: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    return profile.get("buckets", []), profile.get("breakdown", {})


def _section_fast_path(
    results: dict[str, dict[str, Any]],
    lines: list[str],
    before: dict[str, Any] | None,
    link: Callable[[str], str],
) -> None:
    """The issue's targets for the fast HTTP/1.1 path: verdict, before/after, breakdown, floor."""
    tp = results.get("throughput")
    if tp is None or "loops" not in tp:
        return
    by_loop = _by_loop(tp)
    loops = list(by_loop)
    lines += [
        "## Fast HTTP/1.1 path: the issue's targets",
        "",
        "hostpool's own HTTP/1.1 connection (`hostpool/_http11.py`, llhttp through httptools) "
        "against aiohttp, through the unchanged httpx API. Figures from this run's "
        "*Throughput*, *Large body* and *Profile* scenarios: req/s and MB/s are medians "
        "over repeats, each ratio the median of the per-repeat ratios (trials of the same "
        "repeat and loop paired), so a ratio need not equal the quotient of the medians.",
        "",
    ]
    verdict: list[str] = []
    tt = tp.get("targets", {})
    for c in ("50", "1", "200"):
        t = tt.get(f"hostpool_vs_aiohttp_at_{c}")
        if t is None:
            continue
        figures = "; ".join(
            f"{loop}: {_num(by_loop[loop]['medians'][c]['hostpool']['rps'])} vs "
            f"{_num(by_loop[loop]['medians'][c]['aiohttp']['rps'])} req/s = "
            f"{_ratio(t['value'][loop])}"
            for loop in loops
        )
        verdict.append(
            f"- {_met(t['met'])}: hostpool / aiohttp req/s at c={c}, wanted {t['target']} — "
            f"{figures}."
        )
    t = tt.get("hostpool_cpu_vs_aiohttp_at_50")
    if t is not None:
        figures = "; ".join(
            f"{loop}: {_num(by_loop[loop]['medians']['50']['hostpool']['cpu_us_per_request'], 1)}"
            f" vs {_num(by_loop[loop]['medians']['50']['aiohttp']['cpu_us_per_request'], 1)} µs"
            f" = {_ratio(t['value'][loop])}"
            for loop in loops
        )
        verdict.append(
            f"- {_met(t['met'])}: client CPU per request at c=50, wanted {t['target']} — {figures}."
        )
    lb = results.get("large_body")
    if lb is not None:
        lt = lb.get("targets", {})
        t = lt.get("hostpool_vs_aiohttp_mb_per_s")
        if t is not None:
            figures = "; ".join(
                f"{loop}: {_num(lb['medians'][loop]['hostpool']['mb_per_s'])} vs "
                f"{_num(lb['medians'][loop]['aiohttp']['mb_per_s'])} MB/s = "
                f"{_ratio(t['value'][loop])}"
                for loop in _loops(lb)
            )
            verdict.append(
                f"- {_met(t['met'])}: {lb['body_bytes'] / 2**20:g} MiB streamed, hostpool / "
                f"aiohttp MB/s, wanted {t['target']} — {figures}." + _large_cpu_note(lb)
            )
        t = lt.get("hostpool_read_peak")
        if t is not None:
            verdict.append(
                f"- {_met(t['met'])}: memory bounded by the read buffer, wanted {t['target']} — "
                + _target_value("hostpool_read_peak", t["value"])
                + " (aiohttp: "
                + ", ".join(
                    f"{loop} {lb['memory'][loop]['aiohttp']['peak_bytes'] / 2**10:,.0f} KiB"
                    for loop in _loops(lb)
                    if "aiohttp" in lb["memory"][loop]
                )
                + ")."
            )
    lines += [*verdict, ""]

    # Before / after.
    if any("hostpool-h11" in m for m in by_loop[loops[0]]["medians"].values()):
        lines += [
            "Before / after, measured in this run: *before* is `hostpool-h11`, a HostRouter "
            "with the fast path turned off (`hostpool._pool.FastHTTP11Connection = None` "
            "while it lives: httpcore's h11 connection, as before the fast path; the rest "
            "of the tree as now), interleaved with the others.",
            "",
        ]
        recorded = None
        if before is not None:
            bm = before.get("machine", {})
            recorded = (
                f"hostpool / aiohttp recorded before (tree {bm.get('git')}, {bm.get('cpu_model')}, "
                f"{bm.get('date', '')[:10]})"
            )
        header = [
            "",
            "aiohttp req/s",
            "before req/s",
            "after req/s",
            "after / before",
            "before / aiohttp",
            "after / aiohttp",
        ]
        if recorded:
            header.append(recorded)
        rows = []
        for loop in loops:
            med = by_loop[loop]["medians"]
            rat = by_loop[loop]["ratios"]
            for c in sorted(med, key=int):
                row = [
                    f"c={c} {loop}",
                    _num(med[c].get("aiohttp", {}).get("rps")),
                    _num(med[c].get("hostpool-h11", {}).get("rps")),
                    _num(med[c]["hostpool"]["rps"]),
                    _ratio(rat[c].get("hostpool/hostpool-h11")),
                    _ratio(rat[c].get("hostpool-h11/aiohttp")),
                    _ratio(rat[c].get("hostpool/aiohttp")),
                ]
                if recorded:
                    old = (
                        before.get("ratios", {}).get(c, {}) if before and loop == "asyncio" else {}
                    )
                    row.append(_ratio(old.get("hostpool/aiohttp")) if old else "")
                rows.append(row)
        lines += _table(header, rows)
        if recorded:
            lines += [
                "The last column comes from `results/before/throughput.json`, the throughput "
                "run of the results committed before the fast path (asyncio only, on "
                "another machine: compare its ratios, not its req/s).",
                "",
            ]
        if lb is not None and "hostpool-h11" in lb["clients"]:
            lines += [
                "Large body, before / after: "
                + "; ".join(
                    f"{loop}: {_num(lb['medians'][loop]['hostpool-h11']['mb_per_s'])} → "
                    f"{_num(lb['medians'][loop]['hostpool']['mb_per_s'])} MB/s "
                    f"({_ratio(lb['ratios'][loop].get('hostpool/hostpool-h11'))})"
                    for loop in _loops(lb)
                )
                + ".",
                "",
            ]

    prof = results.get("profile")
    if prof is not None and prof.get("breakdown"):
        _breakdown(prof, results, tp, lines, link)


def _breakdown(
    prof: dict[str, Any],
    results: dict[str, dict[str, Any]],
    tp: dict[str, Any],
    lines: list[str],
    link: Callable[[str], str],
) -> None:
    buckets, bd = _profile_buckets(prof)
    hp = bd.get("hostpool")
    aio = bd.get("aiohttp")
    if hp is None:
        return
    files = prof.get("bucket_files", {})
    lines += [
        f"Where a request's CPU goes at c={prof['concurrency']} on asyncio (cProfile over "
        f"{prof['requests']:,} requests per client; every function's own time in one bucket "
        "by its file; C builtins and other standard-library helpers go to their callers' "
        "buckets; see `profiling.py`). *profiled* is µs/request under cProfile, which "
        "slows Python calls more than C; *≈ real* scales each bucket's share to the client "
        "CPU per request measured without the profiler in the same scenario "
        f"(interleaved runs: hostpool {_num(hp.get('real_cpu_us_per_request'), 1)} µs, "
        f"aiohttp {_num(aio.get('real_cpu_us_per_request') if aio else None, 1)} µs). "
        "The largest functions of each bucket close "
        + " and ".join(
            f"[{f}]({link(f)})"
            for key, f in prof.get("files", {}).items()
            if key in ("hostrouter_cprofile", "aiohttp_cprofile")
        )
        + ".",
        "",
    ]
    header = ["bucket", "what", "hostpool profiled", "share", "≈ real µs/req"]
    if aio:
        header += ["aiohttp profiled", "share", "≈ real µs/req"]
    rows = []
    for b in buckets:
        hp_us = hp["profiled_us_per_request"].get(b, 0.0)
        aio_us = aio["profiled_us_per_request"].get(b, 0.0) if aio else 0.0
        if hp_us < 0.05 and aio_us < 0.05:
            continue
        row = [
            b,
            files.get(b, ""),
            _num(hp_us, 1),
            _pct(hp["share"].get(b)),
            _num(hp["us_per_request"].get(b), 1),
        ]
        if aio:
            row += [
                _num(aio_us, 1),
                _pct(aio["share"].get(b)),
                _num(aio["us_per_request"].get(b), 1),
            ]
        rows.append(row)
    total = [
        "**total**",
        "",
        _num(hp["profiled_total_us_per_request"], 1),
        "100%",
        _num(hp.get("real_cpu_us_per_request"), 1),
    ]
    if aio:
        total += [
            _num(aio["profiled_total_us_per_request"], 1),
            "100%",
            _num(aio.get("real_cpu_us_per_request"), 1),
        ]
    rows.append(total)
    lines += _table(header, rows)
    lines += _floor(prof, results, tp)


def _floor(
    prof: dict[str, Any], results: dict[str, dict[str, Any]], tp: dict[str, Any]
) -> list[str]:
    """What stops hostpool at c=50 short of 0.5x aiohttp, from this run's own figures."""
    from .profiling import ADMISSION, DRIVER, HTTP11, HTTPX, LOOP, OTHER

    bd = prof["breakdown"]
    hp, aio = bd.get("hostpool"), bd.get("aiohttp")
    if hp is None or aio is None:
        return []
    h = hp.get("real_cpu_us_per_request")
    a = aio.get("real_cpu_us_per_request")
    if not h or not a:
        return []
    est = hp["us_per_request"]
    x, loop, adm, p11 = est[HTTPX], est[LOOP], est[ADMISSION], est[HTTP11]
    rest = est.get(DRIVER, 0.0) + est.get(OTHER, 0.0)
    aio_loop = aio["us_per_request"].get(LOOP, 0.0)
    budget = 2 * a
    floor = x + loop + rest
    t50 = tp.get("targets", {}).get("hostpool_vs_aiohttp_at_50")
    met = bool(t50 and t50["met"])
    util = tp["medians"].get("50", {})
    cpu_use = ", ".join(
        f"{name} {_pct(util[name].get('client_cpu_util'))}"
        for name in ("hostpool", "aiohttp")
        if name in util and util[name].get("client_cpu_util") is not None
    )
    out = [
        f"At c=50 the client process is the bottleneck (client CPU use on asyncio: "
        f"{cpu_use or 'n/a'} of a core; the upstream has CPU to spare, *Throughput*), so "
        "req/s goes as 1 / (CPU per request): 0.5x aiohttp's req/s means hostpool's CPU per "
        f"request at most 2 x aiohttp's = {_num(budget, 1)} µs here (aiohttp: {_num(a, 1)} µs). "
        f"hostpool's is {_num(h, 1)} µs ({_ratio(h / a)}).",
    ]
    if met:
        out.append("The target is met.")
        return [" ".join(out), ""]
    parts = [
        f"Of those {_num(h, 1)} µs, httpx's client layer is ≈ {_num(x, 1)} µs"
        + (
            f", more than aiohttp's whole request ({_num(a, 1)} µs)"
            if x > a
            else f" ({_ratio(x / a)} of aiohttp's whole request)"
        ),
        f"the event loop ≈ {_num(loop, 1)} µs (aiohttp's requests cost it "
        f"≈ {_num(aio_loop, 1)} µs)",
        f"hostpool's admission ≈ {_num(adm, 1)} µs and its HTTP/1.1 connection, pool and "
        f"stream ≈ {_num(p11, 1)} µs",
    ]
    out.append("; ".join(parts) + ".")
    overhead = results.get("overhead", {}).get("medians_us", {}).get("httpx")
    if overhead:
        out.append(
            f"(httpx.AsyncClient alone over a canned MockTransport — no socket, no pool, "
            f"no event-loop I/O, one request at a time — costs {_num(overhead, 1)} µs per "
            "request: *Layer costs*.)"
        )
    out.append(
        f"httpx's client layer and the event loop alone (plus {_num(rest, 1)} µs of the "
        f"benchmark's own workers) come to {_num(floor, 1)} µs"
        + (
            f", already over the {_num(budget, 1)} µs budget"
            if floor > budget
            else f", leaving {_num(budget - floor, 1)} µs of the {_num(budget, 1)} µs budget "
            f"for hostpool's own layers, which take {_num(adm + p11, 1)} µs now"
        )
        + f": with hostpool's own layers at zero, hostpool would reach at most "
        f"≈ {_ratio(a / floor)} of aiohttp's req/s at c=50 through the httpx API on asyncio."
    )
    return [" ".join(out), ""]


def _section_many(data: dict[str, Any], lines: list[str]) -> None:
    s = data["settings"]
    levels = sorted(data["medians"], key=int)
    names = _clients(next(iter(data["medians"].values())))
    lines += [
        "## 3. Many hosts",
        "",
        f"{s['many_concurrency']} workers going round P origins (one upstream process, one "
        f'port per origin; hostpool with `partition_by="origin"`). Budget '
        f"{data['limits']['total']} sockets, {data['limits']['per_host']} per host, for every "
        f"client. {s['many_trial_seconds']} s per trial, {s['many_repeats']} interleaved "
        "repeats, medians.",
        "",
        "client CPU per request, µs:",
        "",
    ]
    header = ["client", *[f"P={p}" for p in levels]]
    rows = [
        [_CLIENT_LABEL[n], *[_num(data["medians"][p][n]["cpu_us_per_request"], 1) for p in levels]]
        for n in names
    ]
    lines += _table(header, rows)
    single = [
        f"{_CLIENT_LABEL[n]} at P={p}"
        for p in levels
        for n in names
        if len(data["samples"][p][n]) < s["many_repeats"]
    ]
    if single:
        lines += [
            "Ran once rather than every repeat (one trial, warm-up included, took over "
            "30 s): " + ", ".join(single) + ".",
            "",
        ]
    lines += ["requests/s:", ""]
    rows = [
        [_CLIENT_LABEL[n], *[_num(data["medians"][p][n]["rps"]) for p in levels]] for n in names
    ]
    ratio_names = list(next(iter(data["ratios"].values())))
    rows += [[f"*{r}*", *[_ratio(data["ratios"][p][r]) for p in levels]] for r in ratio_names]
    lines += _table(header, rows)
    memory = data.get("memory", {})
    if memory:
        lines += [
            "Memory held per idle origin (tracemalloc, after touching each origin once, "
            "one idle keep-alive socket each):",
            "",
        ]
        rows = [
            [
                _CLIENT_LABEL[n],
                _num(memory[n]["origins"]),
                _num(memory[n]["traced_bytes_per_origin"] / 1024, 1, " KiB"),
                _num(memory[n]["rss_bytes_per_origin"] / 1024, 1, " KiB"),
                _num(memory[n].get("idle_sockets")),
            ]
            for n in _clients(memory)
        ]
        lines += _table(
            ["client", "origins", "Python heap per origin", "RSS per origin", "idle sockets kept"],
            rows,
        )


def _section_scheduler(data: dict[str, Any], lines: list[str]) -> None:
    s = data["settings"]
    lines += [
        "## 4. Scheduler",
        "",
        "`hostpool._scheduler.Scheduler` driven directly: one admit + one release per cycle, "
        f"{s['sched_cycles']:,} cycles per batch, {s['sched_batches']} batches interleaved "
        "across cells. *grant*: admitted at once, nobody woken; *budget*: budget used up, "
        "waiters in the round-robin ring, each release hands its slot on; *cap*: every "
        "partition at its cap, waiters in its own queue. ns per cycle, median (best batch); "
        f"the bare loop costs {data['loop_overhead_ns']:.0f} ns.",
        "",
    ]
    parts = sorted({c["partitions"] for c in data["cells"]})
    rows = []
    keys = sorted(
        {(c["shape"], c["waiters"]) for c in data["cells"]},
        key=lambda k: (["grant", "budget", "cap"].index(k[0]), k[1]),
    )
    for shape, waiters in keys:
        row = [shape, f"{waiters:,}"]
        for p in parts:
            cell = next(
                (
                    c
                    for c in data["cells"]
                    if c["shape"] == shape and c["waiters"] == waiters and c["partitions"] == p
                ),
                None,
            )
            row.append(
                "n/a" if cell is None else f"{cell['median_ns']:,.0f} ({cell['min_ns']:,.0f})"
            )
        rows.append(row)
    lines += _table(["shape", "waiters", *[f"P={p:,}" for p in parts]], rows)


def _arenas(points: dict[str, Any]) -> str:
    counts = [points.get(name, {}).get("arenas") for name in ("start", "after", "after2")]
    return " → ".join(f"{c:,}" for c in counts if c is not None) or "n/a"


def _section_footprint(data: dict[str, Any], lines: list[str]) -> None:
    s = data["settings"]
    lines += [
        "## 5. Footprint",
        "",
        f"Each run in a fresh process. `mock`: {s['footprint_partitions']:,} distinct hostnames "
        "through a HostRouter over `httpx.MockTransport` — **no sockets**: 100,000 real "
        "sockets are not feasible here, so this covers partition creation, admission, the "
        "idle sweep and the key/quota caches, not the connection pools. `real`: "
        f'{s["footprint_real"]:,} origins on real loopback sockets (`partition_by="origin"`). '
        "`mock_traced`: a smaller mock run under tracemalloc, to show what stays allocated. "
        f"`partition_idle_timeout={s['footprint_idle']}`; every partition holds an open response "
        "while the others are touched (so all are live at once), then all are read; after the "
        "timeout one more request runs the sweep. Then (`mock`, `real`) a second crawl over as "
        "many new partitions, swept the same way. Memory after `gc.collect()`.",
        "",
    ]
    rows = []
    for name, run in data["runs"].items():
        p = run["points"]
        rows.append(
            [
                name,
                _num(run["partitions"]),
                _num(run["touch_seconds"], 1, " s"),
                _mib(p["start"]["rss"]),
                _mib(p["peak"]["rss"]),
                _mib(p["idle"]["rss"]),
                _mib(p["after"]["rss"]),
                _ratio(run["rss_after_vs_start"]),
                _mib(p.get("after2", {}).get("rss")),
                _ratio(run.get("rss_after2_vs_after")),
                _arenas(p),
                _mib(p.get("after_cache_clear", {}).get("rss")),
                _mib(p.get("after_trim", {}).get("rss")),
            ]
        )
    lines += [
        "RSS at each phase. *after 2nd crawl*: after the second crawl's sweep; "
        "*pymalloc arenas*: CPython's 1 MiB small-object arenas allocated at the start, "
        "after the first sweep and after the second. The last two columns are diagnostics, "
        "not targets, taken after the last sweep (the second crawl's, where there is one): "
        "RSS after also clearing the partitioner's host → key cache (a private attribute), "
        "then after glibc's `malloc_trim(0)`.",
        "",
    ]
    lines += _table(
        [
            "run",
            "partitions",
            "touch",
            "start",
            "peak",
            "idle",
            "after sweep",
            "after / start",
            "after 2nd crawl",
            "2nd / 1st",
            "pymalloc arenas",
            "+ key cache cleared",
            "+ malloc_trim",
        ],
        rows,
    )
    lines += [
        "Why RSS stays above the start while the heap is back: CPython hands small objects "
        "out of 1 MiB arenas and returns an arena to the OS only when every block in it is "
        "free. Objects that outlive the crawl (the standard library's and httpx's URL caches, "
        "interned strings, the router's counters) were allocated during it, spread over the "
        "crawl's arenas, and each keeps its arena. The *pymalloc arenas* column shows it; "
        "the heap columns below show nothing of hostpool's is left. The second crawl "
        "measures whether that memory is reused (it mostly is) rather than a target: which "
        "arenas stay pinned varies from run to run.",
        "",
    ]
    rows = []
    for name, run in data["runs"].items():
        p = run["points"]
        traced = None
        if "traced" in p["idle"]:
            traced = (p["idle"]["traced"] - p["start"]["traced"]) / run["partitions"]
        rows.append(
            [
                name,
                _num(run["idle_partition_rss_bytes"] / 1024, 2, " KiB"),
                _num(run["idle_partition_blocks"], 1),
                _num(None if traced is None else traced / 1024, 2, " KiB"),
                f"{p['start']['blocks']:,} → {p['after']['blocks']:,}",
                _num(p["after"].get("key_cache_entries")),
                f"{p['start']['objects']:,} → {p['after']['objects']:,}",
                f"{run['live_partitions_idle']:,} → {run['live_partitions_after']:,}",
            ]
        )
    lines += [
        "Python heap: per idle partition (RSS, allocated blocks, and tracemalloc bytes "
        "where traced), blocks and gc-tracked objects before and after, entries left in the "
        "key cache after the last sweep, live partitions before and after the first sweep.",
        "",
    ]
    lines += _table(
        [
            "run",
            "RSS / idle partition",
            "blocks / idle partition",
            "traced / idle partition",
            "heap blocks",
            "key cache entries after",
            "gc objects",
            "live partitions",
        ],
        rows,
    )
    traced = data["runs"].get("mock_traced")
    if traced and traced.get("top_retained"):
        lines += [
            f"Still allocated after the sweep in `mock_traced` ({traced['partitions']:,} "
            f"partitions; {_num((traced['traced_retained'] or 0) / 1024, 0)} KiB in all), "
            "largest allocation sites (innermost frame first):",
            "",
        ]
        rows = [
            [
                _num(e["size_diff"] / 1024, 1, " KiB"),
                _num(e["count_diff"]),
                " ← ".join(reversed(e["where"])),
            ]
            for e in traced["top_retained"][:8]
        ]
        lines += _table(["size", "blocks", "where (innermost first)"], rows)


def _section_overhead(data: dict[str, Any], lines: list[str]) -> None:
    m = data["medians_us"]
    lines += [
        "## Layer costs (canned transport, no socket)",
        "",
        f"Sequential requests, {data['requests_per_trial']:,} per trial, medians of µs per "
        "request.",
        "",
    ]
    lines += _table(
        ["layer", "µs per request"],
        [
            ["httpx.AsyncClient + MockTransport", _num(m["httpx"], 1)],
            ["HostRouter + MockTransport", _num(m["hostpool"], 1)],
            ["hostpool admission alone (lookup, acquire, release)", _num(m["admission"], 1)],
            ["hostpool's addition over httpx", _num(data["hostpool_added_us"], 1)],
        ],
    )
    stats = data.get("stats")
    if stats:
        lines += [
            "",
            "Stats are always on. The bookkeeping each request does for `stats()` "
            f"costs {_num(stats['bookkeeping_us_per_request'], 2)} µs, "
            f"{stats['share_of_canned_request']:.2%} of a request even with a canned "
            "transport (a real request costs far more, so the real share is lower). "
            f"A `stats()` snapshot (a metrics scrape) costs "
            f"{_num(stats['snapshot_us_per_partition'], 1)} µs per live partition.",
        ]


def _section_profile(
    data: dict[str, Any], lines: list[str], report: Path, out: Path, real_us: float | None
) -> None:
    lines += [
        "## Profile: HostRouter at concurrency 50",
        "",
        f"cProfile over {data['requests']:,} requests; files: "
        + ", ".join(
            f"[{f}]({os.path.relpath(out / f, report.parent)})" for f in data["files"].values()
        )
        + ". hostpool's own functions by cumulative time (callees included). *share* is "
        "the part of all profiled time; the profiler slows everything down, so "
        "*≈ µs/req* scales the share to the unprofiled CPU cost per request at c=50 "
        f"({_num(real_us, 1)} µs, from the throughput run).",
        "",
    ]
    rows = [
        [
            f"`{r['function']}`",
            _pct(r.get("share")),
            _num(r["share"] * real_us if real_us and "share" in r else None, 1),
            _num(r["cum_us_per_request"], 1),
            _num(r["own_us_per_request"], 1),
        ]
        for r in data["hostpool_functions"][:15]
    ]
    lines += _table(
        ["function", "share", "≈ µs/req", "cum µs/req (profiled)", "own µs/req (profiled)"],
        rows,
    )


def _fleet_scale(data: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[str]:
    """How fast this fleet run's machine went, against the other sections' runs (when
    those ran on another machine or tree)."""

    def machine(m: dict[str, Any]) -> tuple[Any, ...]:
        return m.get("cpu_model"), m.get("platform"), m.get("git")

    if machine(data["machine"]) == machine(_header_result(results)["machine"]):
        return []
    parts = []
    slower = []
    local_c1 = data["cost"]["medians"].get("1", {}).get("local", {}).get("us_per_request")
    overhead = results.get("overhead", {}).get("medians_us", {}).get("hostpool")
    if local_c1 and overhead:
        slower.append(local_c1 / overhead)
        parts.append(
            f"HostRouter alone over a canned transport took {_num(local_c1, 1)} µs per request "
            f"here against {_num(overhead, 1)} µs in *Layer costs* "
            f"({_ratio(local_c1 / overhead)} slower here)"
        )
    local_rps = data["load"]["medians"]["local"]["rps"]
    throughput = results.get("throughput", {}).get("medians", {}).get("50", {})
    other_rps = throughput.get("hostpool", {}).get("rps")
    if local_rps and other_rps:
        slower.append(other_rps / local_rps)
        parts.append(
            f"HostRouter (local quotas) served {_num(local_rps)} req/s at c=50 here against "
            f"{_num(other_rps)} in *Throughput* ({_ratio(other_rps / local_rps)} slower here)"
        )
    if not parts:
        return []
    ours = data["machine"].get("cpu_model")
    theirs = _header_result(results)["machine"].get("cpu_model")
    where = f" ({ours} here, {theirs} there)" if ours != theirs else ""
    return [
        "For scale against the sections above: "
        + "; ".join(parts)
        + f". This run's machine went about {_num(sum(slower) / len(slower), 1)}x slower "
        f"than the runs behind them{where}: compare ratios (fleet / local), not absolute "
        "figures, across sections.",
        "",
    ]


def _section_fleet(
    data: dict[str, Any], lines: list[str], results: dict[str, dict[str, Any]]
) -> None:
    lines += ["## Fleet quotas on Redis", ""]
    if "skipped" in data:
        lines += [f"Skipped: {data['skipped']}.", ""]
        return
    s = data["settings"]
    m = data["machine"]
    background = data.get("background") or {}
    lines += [
        f"A `redis-server` on loopback started for the run, without persistence "
        f"({data['redis_server']}); `RedisFleet(url, timeout={data['redis_timeout']:g})`. "
        "Each admission to a partition with a `FleetQuota` is one script call (`EVALSHA`); "
        "each release queues a `ZREM`, sent in batches by the fleet's keeper task. "
        f"Ran {m['date']} on {m['cpu_count']} CPUs ({m['cpu_model']}), hostpool tree "
        f"{m.get('git') or 'unknown'}; other processes used "
        f"{_pct(background.get('other_cpu_util'))} of a CPU meanwhile.",
        "",
    ]
    if data["cost"].get("fleet_unavailable"):
        lines += [
            f"**{data['cost']['fleet_unavailable']} admissions found Redis unavailable and "
            "were admitted on the local quota alone: the fleet figures are too low.**",
            "",
        ]
    cost = data["cost"]
    levels = sorted(cost["medians"], key=int)
    med = cost["medians"]
    added = cost["fleet_added"]

    def cell(c: str, variant: str) -> str:
        v = med[c].get(variant)
        if v is None:
            return "n/a"
        return f"{_num(v['us_per_request'], 1)} ({_num(v['cpu_us_per_request'], 1)})"

    lines += [
        "Cost of a fleet admission: `HostRouter` over a canned `httpx.MockTransport` (no "
        "HTTP socket; a user-supplied transport still gets every quota at admission, the "
        f"fleet's included) with `Quota(max_connections={data['local_cap']})`, alone "
        f"(*local*) and with `fleet=FleetQuota(max_connections={data['mock_fleet_cap']:,})` "
        f"(never binds). {data['requests_per_trial']:,} requests per trial, fresh router, "
        f"{s['repeats']} interleaved repeats, medians. µs per request, wall (client CPU):",
        "",
    ]
    rows = [
        ["local quota only", *[cell(c, "local") for c in levels]],
        ["with a fleet quota", *[cell(c, "fleet") for c in levels]],
        ["with a fleet quota, 64 Redis connections (default 16)"]
        + [cell(c, "fleet_64") for c in levels],
        ["*fleet - local: the fleet admission*"]
        + [
            f"+{_num(added[c]['us_per_request'], 1)} (+{_num(added[c]['cpu_us_per_request'], 1)})"
            for c in levels
        ],
        ["*fleet / local*", *[_ratio(added[c]["fleet/local"]) for c in levels]],
        ["*64 / 16 Redis connections*", *[_ratio(added[c].get("fleet_64/fleet")) for c in levels]],
        ["Redis server CPU per request (fleet)"]
        + [_num(med[c]["fleet"]["redis_cpu_us_per_request"], 1) for c in levels],
    ]
    lines += _table(["", *[f"c={c}" for c in levels]], rows)
    trips = data["round_trips"]
    lines += [
        "Redis calls per request, from `INFO commandstats` before and after "
        f"{s['fleet_count_requests']:,} requests (canned transport, after a warm-up; "
        "`lease_ttl=60` so that no renewal, also an `EVALSHA`, falls inside). *Acquire*: "
        "`EVALSHA` + `EVAL` calls; *release*: `ZREM` calls, one per round trip here (one "
        "partition); leases per release round trip counted in the client; the commands "
        "the acquire script runs inside Redis are not round trips.",
        "",
    ]
    rows = [
        [
            f"c={c}",
            _num(r["acquire_calls_per_request"], 3),
            _num(r["release_calls_per_request"], 3),
            _num(r["client"]["leases_per_release_round_trip"], 1),
            _num(r["in_script_commands_per_request"], 1),
            _num(r["redis_us_per_acquire"], 1),
        ]
        for c, r in sorted(trips.items(), key=lambda item: int(item[0]))
    ]
    lines += _table(
        [
            "concurrency",
            "acquire calls / request",
            "release round trips / request",
            "leases per release round trip",
            "commands inside the script / request",
            "Redis time per acquire script, µs",
        ],
        rows,
    )
    load = data["load"]
    lm = load["medians"]
    redis = lm["fleet"].get("redis", {})
    lines += [
        f"Throughput at concurrency {load['concurrency']} against the loopback upstream, "
        f"{s['trial_seconds']} s per trial with a fresh client, {s['repeats']} interleaved "
        f"repeats, medians. Limits: {load['limits']['total']} sockets "
        f"({load['limits']['per_host']} per host); the fleet quota is "
        f"`FleetQuota(max_connections={load['fleet_cap']:,})` (never binds). Redis calls per "
        "request of the fleet trials from `INFO commandstats` (warm-up included).",
        "",
    ]
    labels = {
        "httpx": "httpx.AsyncClient",
        "local": "HostRouter, local quota",
        "fleet": "HostRouter, fleet quota",
    }
    rows = [
        [
            labels[name],
            _num(lm[name]["rps"]),
            _num(lm[name]["cpu_us_per_request"], 1),
            _pct(lm[name]["upstream_cpu_util"]),
            f"{_num(redis.get('acquire_calls_per_request'), 2)} + "
            f"{_num(redis.get('release_calls_per_request'), 2)}"
            if name == "fleet"
            else "",
            _num(redis.get("redis_cpu_us_per_request"), 1) if name == "fleet" else "",
        ]
        for name in ("httpx", "local", "fleet")
        if name in lm
    ]
    lines += _table(
        [
            "client",
            "requests/s",
            "client CPU µs / request",
            "upstream CPU",
            "Redis calls / request (acquire + release)",
            "Redis CPU µs / request",
        ],
        rows,
    )
    lines += [
        ", ".join(f"{k}: {_ratio(v)}" for k, v in load["ratios"].items())
        + f"; the fleet adds {_num(load['fleet_added_cpu_us_per_request'], 1)} µs of client "
        "CPU per request.",
        "",
    ]
    lines += _fleet_scale(data, results)


def write_report(settings: Settings, charts: bool = True) -> Path:
    """Write ``RESULTS.md`` (and the charts) from every result file in ``settings.out``."""
    results = read_results(settings.out)
    report = settings.report
    made = _charts(results, settings.out) if charts and results else {}
    lines = [
        "# hostpool benchmark results",
        "",
        "Generated by `python -m benchmarks` from `"
        + os.path.relpath(settings.out, report.parent)
        + "/*.json`; do not edit by hand. Every comparison ran in one process, interleaved, "
        "repeated; figures are medians, ratios are medians of per-repeat ratios. The "
        "upstream is a separate process on loopback.",
        "",
    ]
    if not results:
        lines.append("No results yet: run `python -m benchmarks`.")
        report.write_text("\n".join(lines) + "\n")
        return report
    lines += _machine(results)
    lines += ["## Targets", ""]
    lines += _targets_table(results)
    _section_fast_path(
        results,
        lines,
        _before_data(settings),
        lambda f: os.path.relpath(settings.out / f, report.parent),
    )
    sections: list[tuple[str, Callable[[dict[str, Any], list[str]], None]]] = [
        ("isolation", _section_isolation),
        ("throughput", _section_throughput),
        ("large_body", _section_large_body),
        ("many_hosts", _section_many),
        ("scheduler", _section_scheduler),
        ("footprint", _section_footprint),
        ("overhead", _section_overhead),
    ]
    for name, section in sections:
        if name in results:
            section(results[name], lines)
            _image(lines, made, name, report)
    if "profile" in results:
        real_us = None
        medians = results.get("throughput", {}).get("medians", {})
        if "50" in medians:
            real_us = medians["50"]["hostpool"]["cpu_us_per_request"]
        _section_profile(results["profile"], lines, report, settings.out, real_us)
    if "fleet" in results:
        _section_fleet(results["fleet"], lines, results)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    return report

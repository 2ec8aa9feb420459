"""Conformance run: httpx's own test suite as the yardstick for ``HostRouter``.

    python tests/conformance/httpx_suite.py [--json PATH] [--keep] [--network]

Downloads the sdist of the installed httpx version with pip (into a temporary
directory; nothing of httpx is committed here), extracts its ``tests/`` and its
pytest configuration, and runs every test module that builds an
``httpx.AsyncClient`` twice with httpx's own conftest (a uvicorn server on
127.0.0.1:8000) and httpx's own pytest configuration:

1. as they are (``httpx.AsyncClient``);
2. with ``httpx.AsyncClient`` rebound to ``hostpool.HostRouter`` by the pytest
   plugin ``hostpool_swap.py`` (the sync ``httpx.Client`` is untouched).

A test that passes in run 1 and fails, errors or hangs in run 2 is a
*regression*, unless its node id is in ``allowlist.txt`` (tests that read
httpx's private attributes only). Each candidate is re-run ``--confirm`` times
in both modes: if it fails with ``AsyncClient`` on any re-run it is reported as
*flaky* and not counted; otherwise it is a regression (marked *intermittent*
if it passed with ``HostRouter`` on a re-run). An allow-list entry that no
longer regresses is reported, so that the list stays short.

A test that makes no progress for ``--stall`` seconds is killed, recorded as a
``timeout`` with the await chains of its async tasks, and the run resumes
after it; each run is bounded by ``--timeout``.

Node ids are those of the ``AsyncClient`` run: in the ``HostRouter`` run,
parametrize ids built from the class name (``[HostRouter-...]``) are mapped
back to ``[AsyncClient-...]``.

Exit status: 0 no regression, 1 regressions, 2 the harness itself failed
(download, a pytest usage or internal error, port 8000 busy, a run incomplete).
Runs on one machine take turns (a lock file in the temporary directory).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ALLOWLIST = HERE / "allowlist.txt"

#: Always run; every other test module of httpx's suite that mentions
#: ``AsyncClient`` is added.
CORE = ("tests/client", "tests/test_timeouts.py", "tests/test_asgi.py")

BASELINE = "AsyncClient"
ROUTER = "HostRouter"
FAILING = ("failed", "error", "timeout")
#: httpx's conftest serves its test app on uvicorn's default port.
PORT = 8000
_LOCKS: list[Any] = []


class HarnessError(Exception):
    """The conformance run itself failed (not a hostpool regression)."""


# --------------------------------------------------------------------------
# Fetching httpx's test suite
# --------------------------------------------------------------------------


def download_sdist(version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"httpx=={version}",
        "-d",
        str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired as exc:
        raise HarnessError("pip download of the httpx sdist timed out") from exc
    if proc.returncode != 0:
        raise HarnessError(f"pip download failed:\n{proc.stdout}{proc.stderr}")
    found = sorted(dest.glob(f"httpx-{version}.tar.gz"))
    if not found:
        raise HarnessError(f"pip download left no httpx-{version}.tar.gz in {dest}")
    return found[0]


def extract_suite(sdist: Path, dest: Path) -> Path:
    """Extract ``tests/`` and the pytest config only: the installed httpx is the one tested."""
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.name.startswith("/") or ".." in parts or len(parts) < 2:
                continue
            if not (member.isfile() or member.isdir()):
                continue
            if parts[1] == "tests" or (
                len(parts) == 2 and parts[1] in ("pyproject.toml", "setup.cfg")
            ):
                members.append(member)
        if not members:
            raise HarnessError(f"{sdist.name} has no tests/ directory")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # Python without the PEP 706 backport: members vetted above
            tar.extractall(dest, members=members)
    roots = [p for p in dest.iterdir() if p.is_dir()]
    if len(roots) != 1:
        raise HarnessError(f"unexpected layout of {sdist.name}")
    return roots[0]


def pytest_config(root: Path) -> Path:
    for name, marker in (("pyproject.toml", "[tool.pytest.ini_options]"), ("setup.cfg", "[tool:")):
        path = root / name
        if path.is_file() and marker in path.read_text(encoding="utf-8"):
            return path
    raise HarnessError(f"no pytest configuration found in {root}")


def select_files(root: Path) -> list[str]:
    files: set[str] = set()
    for entry in CORE:
        path = root / entry
        if path.is_dir():
            files.update(p.relative_to(root).as_posix() for p in path.rglob("test_*.py"))
        elif path.is_file():
            files.add(entry)
        else:
            print(f"warning: httpx's suite has no {entry}", file=sys.stderr)
    for path in (root / "tests").rglob("test_*.py"):
        if re.search(r"\bAsyncClient\b", path.read_text(encoding="utf-8")):
            files.add(path.relative_to(root).as_posix())
    return sorted(files)


# --------------------------------------------------------------------------
# Running pytest
# --------------------------------------------------------------------------


@dataclass
class Run:
    mode: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    collected: list[str] = field(default_factory=list)
    collect_errors: list[dict[str, Any]] = field(default_factory=list)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    complete: bool = False
    note: str = ""
    logs: list[Path] = field(default_factory=list)


def normalise(nodeid: str, old: str = ROUTER, new: str = BASELINE) -> str:
    """Map a HostRouter-run node id to the AsyncClient run's (parametrize ids)."""
    head, bracket, params = nodeid.partition("[")
    return head + bracket + re.sub(rf"\b{old}\b", new, params)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # pragma: no cover - Windows
            proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def _read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill
    return events


@dataclass
class Suite:
    root: Path
    config: Path
    files: list[str]
    network: bool
    work: Path
    timeout: float
    stall: float
    _count: int = 0

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
        )
        # Only the plugins named on the command line: nothing that happens to
        # be installed (pytest-httpx, respx, ...) joins the run.
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONHASHSEED"] = "0"
        return env

    def _command(
        self, mode: str, out: Path, select: Path | None, deselect: Path | None
    ) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "anyio.pytest_plugin",
            "-p",
            "conformance_outcomes",
            "--rootdir",
            str(self.root),
            "-c",
            str(self.config),
            "-o",
            f"faulthandler_timeout={max(1, int(self.stall / 2))}",
            "--conformance-hang-dump",
            str(self.stall / 2),
            "--conformance-out",
            str(out),
        ]
        if mode == ROUTER:
            cmd += ["-p", "hostpool_swap"]
        if not self.network:
            cmd += ["-m", "not network"]
        if select is not None:
            cmd += ["--conformance-select", str(select)]
        if deselect is not None:
            cmd += ["--conformance-deselect", str(deselect)]
        return [*cmd, *self.files]

    def run(self, mode: str, only: list[str] | None = None) -> Run:
        """One full run in ``mode``; a stalled test is killed and the run resumed past it."""
        run = Run(mode)
        started = time.monotonic()
        skip: set[str] = set()
        while True:
            self._count += 1
            tag = f"{self._count:02d}-{mode}"
            out = self.work / f"{tag}.jsonl"
            log = self.work / f"{tag}.log"
            run.logs.append(log)
            select = deselect = None
            if only is not None:
                select = self.work / f"{tag}.select"
                ids = {*only, *(normalise(n, BASELINE, ROUTER) for n in only)}
                select.write_text("".join(f"{n}\n" for n in sorted(ids)))
            if skip:
                deselect = self.work / f"{tag}.deselect"
                deselect.write_text("".join(f"{n}\n" for n in sorted(skip)))
            cmd = self._command(mode, out, select, deselect)
            stalled = self._attempt(cmd, out, log, started)
            events = _read_events(out)
            current = None
            finished = None
            dumps: dict[str, list[str]] = {}
            for event in events:
                kind = event["event"]
                if kind == "collected":
                    run.collected += [n for n in event["nodeids"] if n not in run.collected]
                elif kind == "start":
                    current = event["nodeid"]
                elif kind == "result":
                    run.results[event["nodeid"]] = event
                    skip.add(event["nodeid"])
                    current = None
                elif kind == "warning":
                    run.warnings.setdefault(event["nodeid"], []).append(event["text"])
                elif kind == "hang-dump":
                    dumps[event["nodeid"]] = event["lines"]
                elif kind == "collect-error":
                    run.collect_errors.append(event)
                elif kind == "finish":
                    finished = event["exitstatus"]
            if finished is not None:
                # 5, no tests: nothing left after a resume, or none selected.
                partial = bool(skip) or only is not None
                if finished not in (0, 1) and not (finished == 5 and partial):
                    raise HarnessError(
                        f"pytest ({mode}) exited with status {finished}; see {log}\n" + _tail(log)
                    )
                run.complete = True
                break
            if stalled == "stall" and current is not None:
                # The test that hung: record it and resume after it.
                run.results[current] = {
                    "nodeid": current,
                    "outcome": "timeout",
                    "crash": f"no progress for {self.stall:.0f} s: killed",
                    "lines": [*dumps.get(current, []), "", *_hang_dump(log)],
                    "frames": [],
                }
                skip.add(current)
                continue
            if stalled is None:
                raise HarnessError(
                    f"pytest ({mode}) died without finishing; see {log}\n" + _tail(log)
                )
            run.note = f"{stalled} outside a test" if stalled == "stall" else "out of time"
            break  # incomplete
        run.seconds = time.monotonic() - started
        if mode == ROUTER:
            run.results = {normalise(k): v for k, v in run.results.items()}
            run.collected = [normalise(n) for n in run.collected]
            run.warnings = {normalise(k): v for k, v in run.warnings.items()}
        return run

    def _attempt(self, cmd: list[str], out: Path, log: Path, started: float) -> str | None:
        """Run pytest; return None if it ended, "stall" or "timeout" if it was killed."""
        if not port_free(PORT):
            raise HarnessError(f"127.0.0.1:{PORT} is in use: httpx's test server needs it")
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=self._env(),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=hasattr(os, "killpg"),
            )
            try:
                size, progress = -1, time.monotonic()
                while proc.poll() is None:
                    time.sleep(0.2)
                    now = time.monotonic()
                    current = out.stat().st_size if out.exists() else 0
                    if current != size:
                        size, progress = current, now
                    if now - started > self.timeout:
                        _kill(proc)
                        return "timeout"
                    if now - progress > self.stall:
                        _kill(proc)
                        return "stall"
            finally:
                _kill(proc)
        return None


def _tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _hang_dump(log: Path, lines: int = 40) -> list[str]:
    """The test thread's traceback from faulthandler's last dump (else the log's tail)."""
    text = log.read_text(encoding="utf-8", errors="replace").splitlines()
    starts = [i for i, line in enumerate(text) if "Timeout (" in line]
    if not starts:
        return text[-lines:]
    blocks: list[list[str]] = [[]]
    for line in text[starts[-1] + 1 :]:
        if not line.strip():
            blocks.append([])
        else:
            blocks[-1].append(line)
    test = [b for b in blocks if any("_pytest" in line for line in b)]
    return (test[0] if test else text[starts[-1] :])[:lines]


def _exclusive(patience: float) -> None:
    """Wait for any other conformance run on this machine: they share port 8000."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the port check still applies
        return
    lock = open(Path(tempfile.gettempdir()) / "hostpool-conformance.lock", "w")  # noqa: SIM115
    _LOCKS.append(lock)  # held until the process exits
    deadline = time.monotonic() + patience
    announced = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise HarnessError("another conformance run holds the lock") from None
            if not announced:
                print("waiting for another conformance run to finish ...", flush=True)
                announced = True
            time.sleep(1)


def port_free(port: int = PORT) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------


def read_allowlist(path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    if not path.exists():
        return entries
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        nodeid, _, reason = line.partition("  #")
        nodeid, reason = nodeid.strip(), reason.strip()
        if not reason:
            print(f"warning: {path.name}:{number}: no '  # reason' for {nodeid}", file=sys.stderr)
        entries[nodeid] = reason
    return entries


def outcome(run: Run, nodeid: str) -> str:
    result = run.results.get(nodeid)
    return "not run" if result is None else result["outcome"]


def counts(run: Run) -> dict[str, Any]:
    tally: dict[str, Any] = {}
    for result in run.results.values():
        tally[result["outcome"]] = tally.get(result["outcome"], 0) + 1
    tally["collection errors"] = len(run.collect_errors)
    tally["seconds"] = round(run.seconds, 1)
    tally["complete"] = run.complete
    return tally


def describe(run: Run, nodeid: str) -> dict[str, Any]:
    result = run.results.get(nodeid, {})
    return {
        "nodeid": nodeid,
        "outcome": outcome(run, nodeid),
        "when": result.get("when"),
        "crash": result.get("crash"),
        "lines": result.get("lines", []),
        "frames": result.get("frames", []),
    }


def _strip_addresses(text: str) -> str:
    return re.sub(r"0x[0-9a-f]+", "0x…", text)


def compare(suite: Suite, base: Run, router: Run, allow: dict[str, str], confirm: int) -> dict:
    candidates = [
        n
        for n in base.collected
        if outcome(base, n) == "passed" and outcome(router, n) in (*FAILING, "not run")
    ]
    allowlisted = [n for n in candidates if n in allow]
    to_confirm = [n for n in candidates if n not in allow]

    reruns: dict[str, dict[str, list[str]]] = {n: {BASELINE: [], ROUTER: []} for n in to_confirm}
    for _ in range(confirm if to_confirm else 0):
        for mode in (BASELINE, ROUTER):
            rerun = suite.run(mode, only=to_confirm)
            for n in to_confirm:
                reruns[n][mode].append(outcome(rerun, n))

    regressions, flaky = [], []
    for n in to_confirm:
        entry = describe(router, n)
        entry["reruns"] = reruns[n]
        if any(o != "passed" for o in reruns[n][BASELINE]):
            flaky.append(entry)
        else:
            entry["intermittent"] = any(o == "passed" for o in reruns[n][ROUTER])
            regressions.append(entry)

    stale = [
        {"nodeid": n, "reason": r, "outcome": outcome(router, n), "baseline": outcome(base, n)}
        for n, r in allow.items()
        if n not in allowlisted
    ]
    fixed = [
        n for n in base.collected if outcome(base, n) in FAILING and outcome(router, n) == "passed"
    ]
    failing_both = [
        n for n in base.collected if outcome(base, n) in FAILING and outcome(router, n) in FAILING
    ]
    base_warnings = {_strip_addresses(t) for ts in base.warnings.values() for t in ts}
    new_warnings = [
        {"nodeid": n, "warning": t}
        for n, ts in sorted(router.warnings.items())
        for t in ts
        if _strip_addresses(t) not in base_warnings
    ]
    return {
        "regressions": regressions,
        "allowlisted": [{**describe(router, n), "reason": allow[n]} for n in allowlisted],
        "stale_allowlist": stale,
        "flaky": flaky,
        "fixed": fixed,
        "failing_both": failing_both,
        "new_warnings": new_warnings,
        "collect_errors": {
            BASELINE: base.collect_errors,
            ROUTER: router.collect_errors,
        },
    }


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def _failing(tally: dict[str, Any]) -> int:
    return sum(tally.get(k, 0) for k in FAILING)


def print_report(summary: dict[str, Any]) -> None:
    base, router = summary["runs"][BASELINE], summary["runs"][ROUTER]
    print()
    print(
        f"httpx {summary['httpx_version']} test suite vs hostpool {summary['hostpool_version']}: "
        f"{summary['tests']} tests from {len(summary['files'])} files"
        + ("" if summary["network"] else " (network tests deselected)")
    )
    rows = [
        ("passed", base.get("passed", 0), router.get("passed", 0)),
        ("failed/errors", _failing(base), _failing(router)),
        ("skipped", base.get("skipped", 0), router.get("skipped", 0)),
    ]
    for extra in ("xfailed", "xpassed", "collection errors"):
        if base.get(extra) or router.get(extra):
            rows.append((extra, base.get(extra, 0), router.get(extra, 0)))
    rows.append(("wall time", f"{base['seconds']:.1f} s", f"{router['seconds']:.1f} s"))
    print(f"  {'':<16}{BASELINE:>12}{ROUTER:>12}")
    for label, a, b in rows:
        print(f"  {label:<16}{a!s:>12}{b!s:>12}")
    print(
        f"  regressions: {len(summary['regressions'])}   "
        f"allow-listed: {len(summary['allowlisted'])}   "
        f"flaky: {len(summary['flaky'])}   "
        f"fixed by HostRouter: {len(summary['fixed'])}"
    )
    for entry in summary["regressions"]:
        tag = " (intermittent)" if entry.get("intermittent") else ""
        print(f"\nREGRESSION{tag}: {entry['nodeid']}  [{entry['outcome']}]")
        if entry["crash"]:
            print(f"    {entry['crash'].splitlines()[0]}")
        for line in entry["lines"][: 40 if entry["outcome"] == "timeout" else 8]:
            print(f"    {line}")
        print(f"    re-runs: {entry['reruns']}")
    if summary["allowlisted"]:
        print("\nallow-listed (read httpx private attributes):")
        for entry in summary["allowlisted"]:
            print(f"  {entry['nodeid']}  # {entry['reason']}")
    for entry in summary["flaky"]:
        print(f"\nflaky (fails with AsyncClient too on a re-run), not counted: {entry['nodeid']}")
        print(f"    re-runs: {entry['reruns']}")
    for entry in summary["stale_allowlist"]:
        print(
            f"\nwarning: allow-list entry no longer regresses (HostRouter: {entry['outcome']}, "
            f"AsyncClient: {entry['baseline']}); remove it: {entry['nodeid']}"
        )
    for mode, errors in summary["collect_errors"].items():
        for error in errors:
            print(f"\ncollection error ({mode}): {error['nodeid']}: {error.get('crash')}")
    if summary["new_warnings"]:
        print("\nwarnings seen with HostRouter only:")
        for entry in summary["new_warnings"]:
            print(f"  {entry['nodeid']}: {entry['warning']}")
    if summary["failing_both"]:
        print("\nfail with both (not counted):")
        for nodeid in summary["failing_both"]:
            print(f"  {nodeid}")
    if summary["fixed"]:
        print("\nfail with AsyncClient, pass with HostRouter:")
        for nodeid in summary["fixed"]:
            print(f"  {nodeid}")


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--sdist", type=Path, help="use this httpx sdist instead of downloading")
    parser.add_argument("--allowlist", type=Path, default=ALLOWLIST)
    parser.add_argument("--network", action="store_true", help="include tests marked network")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds allowed per run (default 600)"
    )
    parser.add_argument(
        "--stall",
        type=float,
        default=120.0,
        help="kill a test making no progress for this long, then resume (default 120)",
    )
    parser.add_argument(
        "--confirm",
        type=int,
        default=3,
        help="re-runs of each regression candidate in both modes (default 3)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)

    version = importlib.metadata.version("httpx")
    import hostpool  # the working tree's, if installed with pip install -e

    work = Path(tempfile.mkdtemp(prefix="hostpool-conformance-"))
    try:
        _exclusive(args.timeout)
        if args.sdist is not None:
            sdist = args.sdist.resolve()
        else:
            print(f"downloading the httpx {version} sdist ...", flush=True)
            sdist = download_sdist(version, work / "sdist")
        root = extract_suite(sdist, work / "src")
        files = select_files(root)
        suite = Suite(
            root=root,
            config=pytest_config(root),
            files=files,
            network=args.network,
            work=work,
            timeout=args.timeout,
            stall=args.stall,
        )
        print(f"hostpool from {Path(hostpool.__file__).parent}")
        if REPO not in Path(hostpool.__file__).resolve().parents:
            print("warning: that hostpool is not this working tree's", file=sys.stderr)
        print(f"running {len(files)} test files of httpx {version}: {' '.join(files)}")
        runs = {}
        for mode in (BASELINE, ROUTER):
            print(f"run with {mode} ...", flush=True)
            runs[mode] = suite.run(mode)
        incomplete = [f"{m}: {r.note}" for m, r in runs.items() if not r.complete]
        if incomplete:
            raise HarnessError(f"incomplete run (--timeout {args.timeout:.0f}): {incomplete}")
        allow = read_allowlist(args.allowlist)
        result = compare(suite, runs[BASELINE], runs[ROUTER], allow, args.confirm)
        exit_code = 1 if result["regressions"] else 0
        summary = {
            "httpx_version": version,
            "hostpool_version": hostpool.__version__,
            "hostpool_path": str(Path(hostpool.__file__).parent),
            "python": platform.python_version(),
            "files": files,
            "network": args.network,
            "tests": len(runs[BASELINE].collected),
            "runs": {mode: counts(run) for mode, run in runs.items()},
            **result,
            "exit_code": exit_code,
        }
        print_report(summary)
        if args.json is not None:
            args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return exit_code
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.json is not None:
            args.json.write_text(json.dumps({"error": str(exc), "exit_code": 2}) + "\n")
        return 2
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""pytest plugin (``-p conformance_outcomes``): record every test's outcome as JSON lines.

``--conformance-out PATH`` receives one JSON object per line, flushed as the
run goes, so a run killed on a timeout still tells which tests finished and
which one was running::

    {"event": "collected", "nodeids": [...]}
    {"event": "start", "nodeid": ...}
    {"event": "result", "nodeid": ..., "outcome": "passed" | "failed" | "error"
     | "skipped" | "xfailed" | "xpassed", "duration": s, "crash": ..., "lines": [...],
     "frames": [...]}
    {"event": "warning", "nodeid": ..., "text": ...}
    {"event": "hang-dump", "nodeid": ..., "lines": [...]}  (--conformance-hang-dump)
    {"event": "collect-error", "nodeid": ..., "crash": ..., "lines": [...]}
    {"event": "finish", "exitstatus": n}

``--conformance-select FILE`` keeps only the node ids listed in FILE (one a
line); ``--conformance-deselect FILE`` drops them.

Loaded only by ``tests/conformance/httpx_suite.py``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import pytest

_MAX_LINES = 25
_MAX_FRAMES = 40


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance")
    group.addoption("--conformance-out", default=None, help="write outcomes as JSON lines here")
    group.addoption("--conformance-select", default=None, help="run only these node ids")
    group.addoption("--conformance-deselect", default=None, help="skip these node ids")
    group.addoption(
        "--conformance-hang-dump",
        type=float,
        default=None,
        help="after this many seconds in one test, record the stacks of its async tasks",
    )


def _read_ids(path: str | None) -> set[str] | None:
    if path is None:
        return None
    return {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}


def _describe(report: Any) -> dict[str, Any]:
    """The key lines of a failure: the crash, the ``E`` lines, the frames."""
    longrepr = report.longrepr
    out: dict[str, Any] = {"crash": None, "lines": [], "frames": []}
    if longrepr is None:
        return out
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        out["crash"] = f"{crash.path}:{crash.lineno}: {crash.message}"
    text = str(longrepr)
    elines = [line.rstrip() for line in text.splitlines() if re.match(r"^E\s", line)]
    out["lines"] = (elines or text.splitlines()[-_MAX_LINES:])[:_MAX_LINES]
    frames: list[str] = []
    for element in getattr(longrepr, "chain", []) or []:
        entries = getattr(element[0], "reprentries", [])
        for entry in entries:
            loc = getattr(entry, "reprfileloc", None)
            if loc is not None:
                frames.append(f"{loc.path}:{loc.lineno}: {loc.message}")
        if element[2]:
            frames.append(f"-- {element[2]}")
    out["frames"] = frames[-_MAX_FRAMES:]
    return out


def _coroutine_chain(coro: Any) -> list[Any]:
    """The frames of a suspended coroutine, outermost first, down its ``await`` chain."""
    frames = []
    while coro is not None:
        frame = next(
            (getattr(coro, a) for a in ("cr_frame", "ag_frame", "gi_frame") if hasattr(coro, a)),
            None,
        )
        if frame is not None:
            frames.append(frame)
        coro = next(
            (
                getattr(coro, a)
                for a in ("cr_await", "ag_await", "gi_yieldfrom")
                if hasattr(coro, a)
            ),
            None,
        )
    return frames


def _task_stacks() -> list[str]:
    """Where every pending asyncio and trio task is suspended (read from another thread).

    faulthandler shows only an event loop waiting in select(); the await chain
    of each task says what a hung test waits for.
    """
    trio = sys.modules.get("trio")
    trio_task = getattr(getattr(trio, "lowlevel", None), "Task", None)
    lines: list[str] = []
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.Task) and not obj.done():
            name, coro = f"asyncio task {obj.get_name()}", obj.get_coro()
        elif trio_task is not None and isinstance(obj, trio_task):
            name, coro = f"trio task {obj.name}", obj.coro
        else:
            continue
        frames = _coroutine_chain(coro)
        if not frames:
            continue  # finished: only a leftover object
        summary = traceback.StackSummary.extract((f, f.f_lineno) for f in frames)
        lines.append(f"{name}:")
        lines += [line.rstrip() for entry in summary.format() for line in entry.splitlines()]
    return lines


class _Recorder:
    def __init__(
        self,
        path: str,
        select: set[str] | None,
        deselect: set[str] | None,
        hang_dump: float | None,
    ) -> None:
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - open for the session
        self._lock = threading.Lock()
        self._select = select
        self._deselect = deselect
        self._hang_dump = hang_dump
        self._timer: threading.Timer | None = None
        self._results: dict[str, dict[str, Any]] = {}

    def _write(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self._file.closed:
                return
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def _dump(self, nodeid: str) -> None:
        try:
            stacks = _task_stacks()
        except Exception as exc:  # diagnostics only: never fail the run
            stacks = [f"(could not read the tasks: {exc!r})"]
        self._write({"event": "hang-dump", "nodeid": nodeid, "lines": stacks})

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        keep: list[pytest.Item] = []
        dropped: list[pytest.Item] = []
        for item in items:
            wanted = self._select is None or item.nodeid in self._select
            if self._deselect is not None and item.nodeid in self._deselect:
                wanted = False
            (keep if wanted else dropped).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
        self._write({"event": "collected", "nodeids": [item.nodeid for item in items]})

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._write({"event": "collect-error", "nodeid": report.nodeid, **_describe(report)})

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        self._results[nodeid] = {"outcome": "passed", "duration": 0.0}
        self._write({"event": "start", "nodeid": nodeid})
        if self._hang_dump is not None:
            self._timer = threading.Timer(self._hang_dump, self._dump, (nodeid,))
            self._timer.daemon = True
            self._timer.start()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        result = self._results.setdefault(report.nodeid, {"outcome": "passed", "duration": 0.0})
        result["duration"] += report.duration
        xfail = hasattr(report, "wasxfail")
        if report.failed:
            if result["outcome"] in ("failed", "error"):
                return  # keep the first failure (a teardown error after a failed call)
            result["outcome"] = "failed" if report.when == "call" else "error"
            result["when"] = report.when
            result.update(_describe(report))
        elif report.skipped and result["outcome"] == "passed":
            result["outcome"] = "xfailed" if xfail else "skipped"
            crash = getattr(report.longrepr, "reprcrash", None)
            if isinstance(report.longrepr, tuple):
                result["reason"] = str(report.longrepr[2])
            elif crash is not None:
                result["reason"] = crash.message
        elif report.passed and xfail and report.when == "call":
            result["outcome"] = "xpassed"

    def pytest_warning_recorded(
        self, warning_message: Any, when: str, nodeid: str, location: Any
    ) -> None:
        message = str(warning_message.message).splitlines()[0] if warning_message else ""
        text = (
            f"{warning_message.category.__name__}: {message} "
            f"({warning_message.filename}:{warning_message.lineno})"
        )
        # Called after the test's logfinish: a record of its own.
        self._write({"event": "warning", "nodeid": nodeid or f"<{when}>", "text": text})

    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        result = self._results.pop(nodeid, {"outcome": "error", "duration": 0.0})
        self._write({"event": "result", "nodeid": nodeid, **result})

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self._write({"event": "finish", "exitstatus": int(exitstatus)})
        self._file.close()


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("conformance_out")
    if path is None:
        return
    recorder = _Recorder(
        path,
        _read_ids(config.getoption("conformance_select")),
        _read_ids(config.getoption("conformance_deselect")),
        config.getoption("conformance_hang_dump"),
    )
    config.pluginmanager.register(recorder, "conformance-recorder")

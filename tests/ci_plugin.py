"""How the suite runs: every test bounded, a hang read from its stacks; two at a time.

- `pytest` runs two tests at a time (pyproject's addopts: pytest-xdist, `-n 2 --dist loadgroup`),
  the longest first (tests/durations.json), with libgomp's threads waiting without spinning
  (tests/conftest.py): two spinning runs side by side had taken longer than one after the other
  (the suite 101 minutes against 65, 2026-12-03). A test marked `alone` (real multi-node clusters
  on this machine, whose node kills and timings another test's load would disturb) runs its call
  with no other test running (its fixtures, e.g. a one-node reference run, beside another test): a
  reader-writer lock across the workers, with a turnstile so that a waiting `alone` test is not
  starved. `-n 0` runs one at a time.
- Every test has a limit: tests/durations.json holds each test's measured call time (written by
  `CASCADE_RECORD_DURATIONS=tests/durations.json pytest`), the limit is LIMIT(measured); a test not
  measured gets UNMEASURED_S; a `timeout` marker overrides. pytest-timeout times the test's call
  (timeout_func_only: shared fixtures bound their own waits).
- When a limit passes: py-spy dumps of every process the test started (drivers, Ray's workers) and
  faulthandler's dump of this process go to the test's output, and the test fails. If the test does
  not stop within GRACE_S, the processes it started are killed; if it still does not stop, this
  worker exits (pytest-timeout's `thread` method does the same).
- The suite as a whole has a budget when CASCADE_SUITE_BUDGET_S is set (.ci/run: what is left of
  CI's 90 minutes after set-up, less a margin): each test's limit is cut to what is left of it, and
  once it is spent every test not yet run fails at once, named, instead of the CI job being killed
  with no report.
- After a test that failed, the processes it started and left running are killed: only those
  (descendants of this worker that were not there when the test began), never another test's.
"""

from __future__ import annotations

import faulthandler
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

DURATIONS = Path(__file__).with_name("durations.json")
UNMEASURED_S = 1200
UNORDERED_S = 30.0  # a test not measured, where the longest go first
GRACE_S = 30
DUMPS_S = 45  # all of a hung test's py-spy dumps (.ci/run keeps 150 s of CI's 90 minutes back)
KEEP = ("moto.server",)  # session fixtures' servers: shared by later tests, never reaped


_BUDGET = float(os.environ.get("CASCADE_SUITE_BUDGET_S") or "inf")
_T0 = time.monotonic()


def _budget_left() -> float:
    return _BUDGET - (time.monotonic() - _T0)


def LIMIT(measured_s: float) -> int:  # noqa: N802 - a rule, named as one
    """3x the measured call time (this machine is shared and noisy, two tests run at once) plus two
    minutes."""
    return int(math.ceil(3 * measured_s + 120))


# -- two at a time, `alone` by itself --------------------------------------------------------------
class _Gate:
    """flock-based reader-writer lock shared by the xdist workers of one run."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.turn = open(folder / "turnstile", "a+")
        self.room = open(folder / "room", "a+")

    def enter(self, alone: bool) -> None:
        fcntl.flock(self.turn, fcntl.LOCK_EX)
        fcntl.flock(self.room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(self.turn, fcntl.LOCK_UN)

    def leave(self) -> None:
        fcntl.flock(self.room, fcntl.LOCK_UN)
        fcntl.flock(self.turn, fcntl.LOCK_UN)


_gate: _Gate | None = None


def pytest_configure(config) -> None:
    global _gate
    config.addinivalue_line("markers",
                            "alone: runs with no other test running (multi-node clusters, node "
                            "kills)")
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run and hasattr(config, "workerinput"):
        _gate = _Gate(Path(tempfile.gettempdir()) / f"cascade-tests-{run}")


def pytest_collection_modifyitems(config, items) -> None:
    data = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    measured = {item: data.get(item.nodeid.split("@")[0])  # xdist's loadgroup adds "@<group>"
                for item in items}
    for item, t in measured.items():
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UNMEASURED_S if t is None else LIMIT(t)))
    _longest_first(items, measured)


def _longest_first(items, measured: dict) -> None:
    """The longest work units first (a test, or an xdist_group's tests together, kept in their
    order), so that two workers end close together instead of one running a long test alone at
    the end; a test not measured counts as UNORDERED_S. xdist's scheduler hands out its
    groups (units of more than one test) first, most tests first: this order holds for the rest."""
    def unit(item) -> str:
        group = item.get_closest_marker("xdist_group")
        return f"@{group.args[0]}" if group and group.args else item.nodeid

    total: dict[str, float] = {}
    for item in items:
        t = measured[item]
        total[unit(item)] = total.get(unit(item), 0.0) + (UNORDERED_S if t is None else t)
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (-total[unit(item)], order[id(item)]))


def _descendants() -> dict[int, psutil.Process]:
    try:
        return {p.pid: p for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return {}


def _started_since(before: set[int]) -> list[psutil.Process]:
    out = []
    for pid, p in _descendants().items():
        try:
            if pid not in before and not any(k in " ".join(p.cmdline()) for k in KEEP):
                out.append(p)
        except psutil.Error:
            pass
    return out


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if _gate is not None:
        _gate.enter(alone=False)
    item._cascade_before = set(_descendants())
    try:
        yield
    finally:
        if getattr(item, "_cascade_failed", False):
            kill_all(_started_since(item._cascade_before))
        if _gate is not None:
            _gate.leave()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item):
    """An `alone` test's call (not its fixtures, which are runs like any other) has the machine to
    itself; waiting for it is outside the test's limit (pytest-timeout times inside this)."""
    alone = _gate is not None and item.get_closest_marker("alone") is not None
    if alone:
        t0 = time.monotonic()
        _gate.leave()
        _gate.enter(alone=True)
        item._cascade_waited = time.monotonic() - t0  # not the test's time: taken off its report
    try:
        yield
    finally:
        if alone:
            _gate.leave()
            _gate.enter(alone=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when == "call":
        report.duration = max(0.0, report.duration - getattr(item, "_cascade_waited", 0.0))
    if report.failed:
        item._cascade_failed = True


# -- a hang fails within its limit, with the stacks of what it started -----------------------------
def _dump(item, before: set[int]) -> str:
    """py-spy's dump of every Python process the test started, and this process's threads
    (faulthandler): the drivers first, then Ray's workers (where a hang usually is), Ray's own
    daemons last; threads that py-spy sees idle are left out but for each process's main thread (CI
    keeps only the head and the tail of a long output)."""
    spy = Path(sys.executable).with_name("py-spy")
    parts = [f"==== {item.nodeid}: over its limit; stacks of the processes it started ===="]
    procs = []
    for p in _started_since(before):
        try:
            what = " ".join(p.cmdline())[:200]
        except psutil.Error:
            continue
        if p.name() in ("raylet", "gcs_server") or not what:
            continue
        order = 0 if " -m cascade" in what else 1 if what.startswith("ray::") else 2
        procs.append((order, p.pid, what))
    end = time.monotonic() + DUMPS_S
    for _, pid, what in sorted(procs):
        if time.monotonic() > end - 1:
            parts.append(f"---- {len(procs)} processes in all: the rest not dumped ({DUMPS_S} s)")
            break
        try:
            out = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True,
                                 text=True, timeout=min(30.0, end - time.monotonic()))
            text = _busy(out.stdout) if out.stdout else out.stderr
        except (OSError, subprocess.TimeoutExpired) as e:
            text = f"py-spy failed: {e!r}"
        parts.append(f"---- pid {pid}: {what}\n{text[-6000:]}")
    return "\n".join(parts)


def _busy(dump: str) -> str:
    """A py-spy dump without its idle threads (a thread's block starts at a line `Thread <id>
    (<state>): ...`), the main thread kept whatever its state."""
    keep, out = True, []
    for line in dump.splitlines():
        if line.startswith("Thread "):
            keep = "(idle)" not in line or '"MainThread"' in line
        elif line.startswith(("Process ", "Python ")):
            keep = True
        if keep:
            out.append(line)
    return "\n".join(out)


def pytest_runtest_setup(item) -> None:
    if _budget_left() <= 0:
        pytest.fail(f"not run: the suite's budget (CASCADE_SUITE_BUDGET_S={_BUDGET:.0f}) is spent",
                    pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    if settings.timeout <= 0:
        return True
    settings = settings._replace(timeout=max(1.0, min(settings.timeout, _budget_left())))
    done, main = threading.Event(), threading.main_thread().ident
    before = getattr(item, "_cascade_before", set())

    def fail(signum, frame):
        pytest.fail(f"Timeout: over its limit of {settings.timeout:.0f} s (stacks above)",
                    pytrace=False)

    def fire():
        if done.is_set():
            return
        sys.stderr.write(_dump(item, before) + f"\n---- this test process (pid {os.getpid()})\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(all_threads=True)
        signal.pthread_kill(main, signal.SIGALRM)
        if done.wait(GRACE_S):
            return
        kill_all(_started_since(before))  # a main thread blocked on what it started
        if done.wait(GRACE_S):
            return
        sys.__stderr__.write(f"{item.nodeid}: still running {2 * GRACE_S} s past its limit: this "
                             "worker exits\n")
        sys.__stderr__.flush()
        os._exit(1)

    item._cascade_timer = (done, signal.signal(signal.SIGALRM, fail))
    threading.Thread(target=lambda: done.wait(settings.timeout) or fire(), daemon=True).start()
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item):
    timer = getattr(item, "_cascade_timer", None)
    if timer is not None:
        timer[0].set()
        signal.signal(signal.SIGALRM, timer[1])
        del item._cascade_timer
    return True


# -- measured call times, for the limits above -----------------------------------------------------
_calls: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    if report.when == "call":
        _calls[report.nodeid.split("@")[0]] = round(report.duration, 1)


def pytest_sessionfinish(session) -> None:
    out = os.environ.get("CASCADE_RECORD_DURATIONS")
    if out and not hasattr(session.config, "workerinput") and _calls:
        old = json.loads(Path(out).read_text()) if Path(out).exists() else {}
        Path(out).write_text(json.dumps({**old, **_calls}, indent=0, sort_keys=True) + "\n")
    slow = sorted(_calls.items(), key=lambda kv: -kv[1])[:10]
    if slow and not hasattr(session.config, "workerinput"):
        print("\nslowest ten tests (call, s): " + ", ".join(f"{k} {v}" for k, v in slow),
              file=sys.stderr)

"""One writer per run directory, provably (cascade/lease.py): simultaneous starts, a paused driver,
a store that goes away, a stepped clock, another host with this host's name. The lease's own code,
real processes, real S3 API (moto's server); the whole CLI's refusal and takeover:
tests/test_faults.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, StoreProxy, s3_bucket, wait_for

pytestmark = [pytest.mark.faults]
HOLDER = [sys.executable, str(ROOT / "tests" / "lease_holder.py")]


def _holder(*args: str, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """A lease holder started as a shell starts a background job (`nohup python -m cascade ... &`):
    SIGINT ignored, so the lease cannot count on it to stop the driver."""
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([*HOLDER, *args], stdout=out, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


def _ticks(rd) -> list[float]:
    return [s["at"] for n, s in rd.manifest()["steps"].items() if n.startswith("tick-")]


def test_twenty_threads_starting_at_once_one_holds(tmp_path):
    from cascade.lease import Lease, RunDirBusy
    from cascade.rundir import RunDir

    for attempt in range(3):
        url = str(tmp_path / f"run{attempt}")
        barrier, won, busy = threading.Barrier(20), [], []

        def start() -> None:
            lease = Lease(RunDir(url), 30)
            barrier.wait()
            try:
                lease.acquire()
                won.append(lease)
            except RunDirBusy as e:
                busy.append(str(e))

        threads = [threading.Thread(target=start) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(won) == 1 and len(busy) == 19, (len(won), busy[:3])
        won[0].release()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_twenty_processes_starting_at_once_one_holds(s3, tmp_path, where):
    url = str(tmp_path / "run") if where == "local" else s3_bucket("lease")
    if where == "s3":
        import fsspec

        fsspec.filesystem("s3").mkdir(url.removeprefix("s3://").split("/")[0])
    go = tmp_path / "go"
    procs = [_holder(url, "30", "--go", str(go), "--hold", "8", env=s3) for _ in range(20)]
    for p in procs:
        # every process imported and waiting, however loaded the machine: then all start at once
        assert p.stdout.readline().strip() == "READY"
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    held = [o for o in outs if o.startswith("HELD")]
    assert len(held) == 1 and sum(o.startswith("BUSY") for o in outs) == 19, outs
    assert held[0].split()[1] == "1"


def test_a_paused_driver_commits_nothing_after_the_takeover(tmp_path):
    """A driver on another host (to this one, only its heartbeat says it lives) is SIGSTOPped past
    the ttl; another driver takes over; resumed, the first one stops before its next commit, saying
    why."""
    from cascade.lease import Lease, current
    from cascade.rundir import RunDir

    url, ttl = str(tmp_path / "run"), 3.0
    rd = RunDir(url)
    proc = _holder(url, str(ttl), "--ticks", "--other-host", log=tmp_path / "a.log")
    wait_for(lambda: len(_ticks(rd)) >= 5, 60, proc, "five commits of the first driver")
    proc.send_signal(signal.SIGSTOP)
    try:
        paused = time.time()
        taker = Lease(RunDir(url), ttl)
        taker.acquire()  # waits out a ttl of no heartbeat
        took = time.time()
        assert took - paused >= ttl and current(rd)[0] == 2
        before = len(_ticks(rd))
    finally:
        proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=60) == 3, (tmp_path / "a.log").read_text()
    log = (tmp_path / "a.log").read_text()
    assert "LOST" in log and "generation 2 is held by" in log, log
    assert len(_ticks(rd)) == before and max(_ticks(rd)) < took  # nothing after the takeover
    taker.check()  # the new holder commits on
    taker.release()


def test_a_driver_that_found_its_lease_lost_is_not_interrupted_again(tmp_path):
    """The main thread learns of the takeover at a commit and stops; the heartbeat, finding the same
    loss a moment later, must not interrupt it inside its clean-up (a KeyboardInterrupt in the
    middle of release)."""
    from cascade.lease import Lease, LeaseLost, _gen_path
    from cascade.rundir import RunDir

    rd = RunDir(str(tmp_path / "run"))
    lease = Lease(rd, 30.0)
    lease.acquire()
    rd.write_json(_gen_path(rd, 2),
                  {"id": "rival", "host": "h", "node": "n", "pid": 1, "start": 0, "beat": 0,
                                     "heartbeat": time.time()})
    with pytest.raises(LeaseLost, match="generation 2 is held by h pid 1"):
        rd.mark("after", "done")
    lease._lose("found by the heartbeat too")  # no interrupt: the main thread already knows
    time.sleep(0.2)  # a pending interrupt would be raised here
    lease.release()
    assert "after" not in rd.manifest()["steps"]


def test_a_store_outage_longer_than_the_ttl_stops_the_driver_before_a_takeover(s3, tmp_path):
    """The store cannot be reached for twice the ttl: the holder, unable to renew, stops within the
    ttl (before any rival could take over) and commits nothing while cut off; once the store is
    back, a new driver takes over."""
    import fsspec

    from cascade.lease import Lease, current
    from cascade.rundir import RunDir

    proxy = StoreProxy(int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    env = {**s3, "AWS_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "2"}
    url, ttl = s3_bucket("outage"), 4.0
    fsspec.filesystem("s3").mkdir(url.removeprefix("s3://").split("/")[0])
    rd = RunDir(url)
    proc = _holder(url, str(ttl), "--ticks", "--other-host", env=env, log=tmp_path / "a.log")
    wait_for(lambda: len(_ticks(rd)) >= 5, 60, proc, "five commits through the proxy")
    cut_at = time.time()
    proxy.set("refuse")
    try:
        assert proc.wait(timeout=ttl * 2 + 30) == 3, (tmp_path / "a.log").read_text()
        stopped = time.time()
        time.sleep(max(0.0, cut_at + 2 * ttl - time.time()))
    finally:
        proxy.set("ok")
    log = (tmp_path / "a.log").read_text()
    assert "could not be renewed" in log, log
    assert max(_ticks(rd)) < cut_at + ttl / 2 + 1 and stopped - cut_at < ttl + 20, stopped - cut_at
    taker = Lease(RunDir(url), ttl)  # its heartbeat no longer moves: taken over after a ttl
    taker.acquire()
    assert current(rd)[0] == 2
    taker.release()


def test_a_live_holder_on_this_host_survives_a_clock_step(tmp_path, monkeypatch):
    """The wall clock stepped an hour forward (psutil's process start times move with it): a live
    holder on this host still reads as alive, by its start in clock ticks since boot."""
    import psutil

    from cascade.lease import Lease, RunDirBusy, holder
    from cascade.rundir import RunDir

    url = str(tmp_path / "run")
    proc = _holder(url, "30", "--hold", "60")
    assert proc.stdout.readline().startswith("HELD")
    try:
        real_time, real_boot = time.time, psutil.boot_time
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
        monkeypatch.setattr(psutil, "boot_time", lambda: real_boot() + 3600)
        rd = RunDir(url)
        assert holder(rd, 30)["pid"] == proc.pid
        with pytest.raises(RunDirBusy, match=f"pid {proc.pid}"):
            Lease(rd, 30).acquire()
    finally:
        proc.kill()
        proc.wait()
    assert holder(RunDir(url), 30) is None  # gone: taken over at once on this host


def test_another_host_with_this_hostname_is_not_taken_for_a_dead_local_holder(tmp_path):
    """A lease held on another machine or container that has this host's name, its heartbeat moving:
    refused (the old check compared hostnames and saw pid 1 here... alive, or a dead pid, and took
    over)."""
    from cascade.lease import Lease, RunDirBusy, node_id
    from cascade.rundir import RunDir

    rd = RunDir(str(tmp_path / "run"))
    rec = {"id": "x", "host": socket.gethostname(), "node": "another-boot/pid:[9]", "pid": 999999,
           "pid_ticks": 1, "start": 0, "beat": 0, "heartbeat": 0}
    assert rec["node"] != node_id()
    path = rd.path("lease", "00000001.json")
    rd.write_json(path, rec)
    done = threading.Event()

    def beat() -> None:
        n = 0
        while not done.wait(0.3):
            n += 1
            rd.write_json(path, {**rec, "beat": n})

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    try:
        with pytest.raises(RunDirBusy, match="pid 999999"):
            Lease(rd, 3).acquire()
    finally:
        done.set()
        th.join()
    assert json.loads(Path(path).read_text())["id"] == "x"

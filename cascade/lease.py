"""One writer per run directory: the driver holds a lease (run_dir/lease.json) while it runs steps.

    python -m cascade +stage=4b models=tiny      # a second driver on the same run_dir is refused, naming the holder

The lease names its holder (host, pid, start) and carries a heartbeat counter that a thread bumps every ttl/4
seconds. A second driver is refused while the holder lives: on the same host, while its process exists; on another
host, while its heartbeat moves. A dead holder's lease is taken over: at once when it was on this host and its
process is gone, else once its heartbeat has not moved for lease_ttl_s seconds of this driver's own monotonic
clock (no two hosts' clocks are compared, so a clock jump or skew neither steals a live lease nor keeps a dead
one). Works on any fsspec filesystem: the lease is written atomically and read back to see who won a race.
"""

from __future__ import annotations

import _thread
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from cascade.config import ConfigError
from cascade.rundir import RunDir

log = logging.getLogger(__name__)


class RunDirBusy(ConfigError):
    """Another live driver holds the run directory."""


def _started(pid: int) -> float | None:
    """When process pid started (None: no such process)."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _runs_here(held: dict) -> bool:
    """Whether the lease's holder process (on this host) still runs: its pid, started when the lease says."""
    started = _started(int(held.get("pid", -1)))
    return started is not None and abs(started - (held.get("pid_started") or started)) < 1.0


def holder(rd: RunDir, ttl: float) -> dict | None:
    """The lease of the live driver holding the run directory, or None; read-only (`cascade status`). On the
    holder's host: its process is alive; elsewhere: its heartbeat was written within ttl (wall clocks compared)."""
    held = rd.read_json(rd.lease())
    if not held:
        return None
    if held.get("host") == socket.gethostname():
        return held if _runs_here(held) else None
    return held if time.time() - held.get("heartbeat", 0) < ttl else None


class Lease:
    def __init__(self, rd: RunDir, ttl: float) -> None:
        self.rd, self.ttl, self.path = rd, ttl, rd.lease()
        self.me = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                   "pid_started": _started(os.getpid()), "start": time.time(), "beat": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease, or raise RunDirBusy naming the live holder."""
        held = self.rd.read_json(self.path)
        if held is not None and held.get("id") != self.me["id"]:
            self._wait_out(held)
        self._write()
        time.sleep(min(0.5, self.ttl / 10))  # a rival that wrote at the same time: the last write wins
        now = self.rd.read_json(self.path)
        if now is None or now.get("id") != self.me["id"]:
            raise RunDirBusy(f"run directory {self.rd.url} was taken by {self._who(now)} at the same moment")
        self._thread = threading.Thread(target=self._beat, name="cascade-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self.rd.read_json(self.path)
        if held is not None and held.get("id") == self.me["id"]:
            self.rd.fs.rm(self.path)

    # -- internals ---------------------------------------------------------------------------------------------
    @staticmethod
    def _who(held: dict | None) -> str:
        if not held:
            return "another driver"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("start", 0)))
        return f"{held.get('host')} pid {held.get('pid')} (since {since})"

    def _wait_out(self, held: dict) -> None:
        """Return once `held` is a dead holder's lease; raise RunDirBusy while it lives."""
        busy = RunDirBusy(f"run directory {self.rd.url} is in use by {self._who(held)}; run one driver per run "
                          f"directory (its lease expires {self.ttl:.0f} s after its holder stops)")
        if held.get("host") == self.me["host"]:
            if _runs_here(held):
                raise busy
            log.warning("taking over the lease of %s: that process is gone", self._who(held))
            return
        t0, beat = time.monotonic(), held.get("beat")
        while time.monotonic() - t0 < self.ttl:  # a live holder's heartbeat moves within ttl / 4
            time.sleep(min(1.0, self.ttl / 10))
            now = self.rd.read_json(self.path)
            if now is None:
                return
            if now.get("id") != held.get("id") or now.get("beat") != beat:
                raise busy
        log.warning("taking over the lease of %s: no heartbeat for %.0f s", self._who(held), self.ttl)

    def _write(self) -> None:
        self.me["heartbeat"] = time.time()
        self.rd.write_json(self.path, self.me)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                held = self.rd.read_json(self.path)
                if held is not None and held.get("id") != self.me["id"]:
                    log.error("the lease of %s was taken by %s: stopping", self.rd.url, self._who(held))
                    _thread.interrupt_main()
                    return
                self.me["beat"] += 1
                self._write()
            except OSError as e:  # a full disk or a storage hiccup: the next beat tries again
                log.warning("lease heartbeat not written: %s", e)

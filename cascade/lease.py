"""One writer per run directory: the driver holds a lease while it runs steps, and every commit is
fenced by it.

    # a second driver on the same run_dir is refused, naming the holder
    python -m cascade +stage=4b models=tiny

The lease is a sequence of generations, `<run_dir>/lease/<NNNNNNNN>.json`, the highest one current.
A driver takes generation g+1 by creating that file with an atomic create-if-absent (a filesystem: a
hard link of a written temporary file, which fails if the name exists, on NFS too; S3: a PUT with
`If-None-Match: *`), so of any number of drivers starting at once exactly one gets it; it does so
only when generation g is released, or its holder is dead: on the same host (same boot id and pid
namespace), its process is gone (pid and start time in clock ticks since boot, so a stepped clock
does not matter); elsewhere, its heartbeat counter has not moved for lease_ttl_s of this driver's
own monotonic clock (no two hosts' clocks are compared).

The holder renews its generation every ttl/4 (a heartbeat that survives any exception). Every commit
(a step record, a checkpoint's marker, a manifest update: RunDir.fence) first checks the fencing
token: the current generation is still this driver's, and - on the driver - its last renewal is
younger than ttl/2 (else it renews first). A driver that lost its lease, or cannot renew (the store
unreachable), stops before its next commit with LeaseLost; a rival takes over only after a whole ttl
of silence, by then the old holder has stopped writing. Ray Train workers check the same token
(TrainJob.lease) before committing a phase or a checkpoint. What remains is the moment between a
check and its write, as with any lease on storage without conditional writes on another object.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
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


class LeaseLost(RuntimeError):
    """This driver no longer holds the run directory (taken over, or not renewed in time): it stops
    writing."""


# -- who and where ---------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def node_id() -> str:
    """This host's identity for liveness checks: its boot id and this process's pid namespace (a
    container on the same kernel has another; two machines with one hostname have different boot
    ids)."""
    return f"{_read('/proc/sys/kernel/random/boot_id') or socket.gethostname()}/" \
           f"{os.readlink('/proc/self/ns/pid') if os.path.exists('/proc/self/ns/pid') else ''}"


def _start_ticks(pid: int) -> int | None:
    """When process pid started, in clock ticks since boot (not the wall clock); None: no such
    process."""
    stat = _read(f"/proc/{pid}/stat")
    if stat:
        return int(stat.rsplit(")", 1)[1].split()[19])
    import psutil  # not Linux: the wall-clock start time, rounded

    try:
        return int(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _runs_here(held: dict) -> bool:
    """Whether the holder (on this host) still runs: its pid, started at the same tick."""
    ticks = _start_ticks(int(held.get("pid", -1)))
    return ticks is not None and ticks == held.get("pid_ticks")


# -- the generations on storage --------------------------------------------------------------------
def _gen_path(rd: RunDir, gen: int) -> str:
    return rd.path("lease", f"{gen:08d}.json")


def current(rd: RunDir) -> tuple[int, dict | None] | None:
    """(generation, its record) of the highest lease generation, or None when there is none."""
    gens = []
    for f in rd.glob(rd.path("lease", "*.json")):
        stem = f.rsplit("/", 1)[-1].removesuffix(".json")
        if stem.isdigit():
            gens.append(int(stem))
    if not gens:
        return None
    g = max(gens)
    return g, rd.read_json(_gen_path(rd, g))


def check_fence(rd: RunDir, token: tuple[int, str]) -> None:
    """Raise LeaseLost unless generation token[0], held by token[1], is still the current,
    unreleased lease."""
    cur = current(rd)
    if (cur is None or cur[0] != token[0] or not cur[1] or cur[1].get("id") != token[1]
        or cur[1].get("released")):
        who = _who(cur[1]) if cur and cur[1] else "nobody"
        gen = cur[0] if cur else 0
        raise LeaseLost(f"this driver's lease on {rd.url} (generation {token[0]}) is gone: "
                        f"generation {gen} is held by {who}. Stopping before the next commit; "
                        "nothing after the takeover is written")


def holder(rd: RunDir, ttl: float) -> dict | None:
    """The record of the live driver holding the run directory, or None; read-only (`cascade
    status`). On the holder's host: its process is alive; elsewhere: its heartbeat was written
    within ttl (wall clocks compared)."""
    cur = current(rd)
    held = cur[1] if cur else None
    if not held or held.get("released"):
        return None
    if held.get("node") == node_id():
        return held if _runs_here(held) else None
    return held if time.time() - held.get("heartbeat", 0) < ttl else None


def _who(held: dict | None) -> str:
    if not held:
        return "another driver"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("start", 0)))
    return f"{held.get('host')} pid {held.get('pid')} (since {since})"


# The heartbeat stops the main thread with this signal, simulated (_thread.interrupt_main), never
# sent: not SIGINT, which a shell ignores in a background job (`nohup python -m cascade ... &`:
# Python then installs no handler and the interrupt would do nothing) and whose handler Ray Train
# replaces during fit()
STOP_SIGNAL = signal.SIGUSR2


def _stop_main(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("this driver's lease is lost")


class Lease:
    def __init__(self, rd: RunDir, ttl: float) -> None:
        self.rd, self.ttl = rd, ttl
        self.me = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "node": node_id(),
                   "pid": os.getpid(),
                   "pid_ticks": _start_ticks(os.getpid()), "start": time.time(), "beat": 0}
        self.gen = 0
        self.renewed = 0.0  # monotonic time of the last write of our generation that succeeded
        self.lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # the main thread knows of the loss (or is releasing)
        self._told, self._telling = False, threading.Lock()
        self._thread: threading.Thread | None = None
        self._handler: Any = None  # the STOP_SIGNAL handler this lease replaced (main thread only)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @property
    def token(self) -> tuple[int, str]:
        """The fencing token a Ray Train worker checks before it commits (check_fence)."""
        return self.gen, self.me["id"]

    def acquire(self) -> None:
        """Take the next generation, or raise RunDirBusy naming the live holder."""
        cur = current(self.rd)
        if cur is not None and not (cur[1] or {}).get("released"):
            self._wait_out(cur[1] or {})
        nxt = (cur[0] if cur else 0) + 1
        self.me["heartbeat"] = time.time()
        if not self.rd.create_json(_gen_path(self.rd, nxt), self.me):
            won = current(self.rd)
            if won and won[0] == nxt and won[1] and won[1].get("id") == self.me["id"]:
                pass  # our PUT landed, its answer was lost and the retry found our own lease
            else:
                raise RunDirBusy(f"run directory {self.rd.url} was taken by "
                                 f"{_who(won[1] if won else None)} at the "
                                 f"same moment (lease generation {nxt})")
        self.gen, self.renewed = nxt, time.monotonic()
        # retries end when this driver must stop writing
        self.rd.set_deadline(lambda: self.renewed + self.ttl / 2)
        for g in range(max(1, nxt - 8), nxt):
            # older generations: no longer needed to order anything
            try:
                self.rd.remove(_gen_path(self.rd, g))
            except OSError:  # gone already, or the store away: harmless leftovers
                pass
        self.rd.fence = self.check
        if threading.current_thread() is threading.main_thread():
            self._handler = signal.signal(STOP_SIGNAL, _stop_main)
        self._thread = threading.Thread(target=self._beat, name="cascade-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Before a commit: raise LeaseLost unless this driver still holds the run directory."""
        try:
            if self.lost:
                # set by the heartbeat together with its interrupt (one critical section, _lose)
                raise LeaseLost(self.lost)
            if time.monotonic() - self.renewed > self.ttl / 2:
                self._renew()  # raises when the lease is gone or the store cannot be written
            check_fence(self.rd, self.token)
        except LeaseLost as e:
            with self._telling:
                # the main thread knows: the heartbeat must not interrupt it as well
                self.lost = self.lost or str(e)
                self._told |= threading.current_thread() is threading.main_thread()
            raise

    def release(self) -> None:
        with self._telling:  # stopping anyway: no interrupt inside the clean-up
            self._told = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(STOP_SIGNAL, self._handler)
            self._handler = None
        self.rd.fence = None
        self.rd.set_deadline(None)
        if not self.gen or self.lost:
            return
        try:
            check_fence(self.rd, self.token)
            self.rd.write_json(_gen_path(self.rd, self.gen), {**self.me, "released": time.time()})
        except Exception as e:
            # taken over, or the store is away: the next driver waits out the ttl
            log.warning("lease not released (%s): the next driver waits %.0f s", e, self.ttl)

    # -- internals ---------------------------------------------------------------------------------
    def _wait_out(self, held: dict) -> None:
        """Return once `held` is a dead holder's lease; raise RunDirBusy while it lives."""
        busy = RunDirBusy(f"run directory {self.rd.url} is in use by {_who(held)}; run one driver "
                          "per run "
                          f"directory (its lease expires {self.ttl:.0f} s after its holder stops)")
        if held.get("node") == self.me["node"]:
            if _runs_here(held):
                raise busy
            log.warning("taking over the lease of %s: that process is gone", _who(held))
            return
        t0, seen = time.monotonic(), (current(self.rd) or (0, None))
        while time.monotonic() - t0 < self.ttl:  # a live holder's heartbeat moves within ttl / 4
            time.sleep(min(1.0, self.ttl / 10))
            now = current(self.rd) or (0, None)
            if now[0] != seen[0] or (now[1] or {}).get("beat") != (seen[1] or {}).get("beat"):
                if now[1] and now[1].get("released"):
                    return
                raise busy
        log.warning("taking over the lease of %s: no heartbeat for %.0f s", _who(held), self.ttl)

    def _renew(self) -> None:
        with self._lock:
            check_fence(self.rd, self.token)
            self.me["beat"] += 1
            self.me["heartbeat"] = time.time()
            self.rd.write_json(_gen_path(self.rd, self.gen), self.me)
            self.renewed = time.monotonic()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._renew()
            except LeaseLost as e:
                self._lose(str(e))
                return
            except Exception as e:
                # the store away, a full disk: the next beat tries again, until ttl / 2
                late = time.monotonic() - self.renewed
                log.warning("lease heartbeat not written (%s: %s); last renewed %.0f s ago",
                            type(e).__name__, e, late)
                if late > self.ttl / 2:
                    self._lose(f"the lease on {self.rd.url} could not be renewed for {late:.0f} s "
                               f"(ttl {self.ttl:.0f} s; last error {type(e).__name__}: {e}): "
                               "stopping, nothing more is committed; the same command resumes "
                               "once the run directory is reachable")
                    return

    def _lose(self, why: str) -> None:
        log.error("%s", why)
        with self._telling:
            # interrupt the main thread unless it learned it by itself (then it is stopping)
            self.lost = self.lost or why
            if not self._told:
                self._told = True
                _thread.interrupt_main(STOP_SIGNAL if self._handler is not None else signal.SIGINT)

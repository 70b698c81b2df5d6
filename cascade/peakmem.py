"""Peak resident memory of a process and everything it starts, by kind of process (the benchmarks
print it).

    with PeakMemory() as peak:
        ...  # a run: this process, a `python -m cascade` child, Ray's processes, vLLM's engine
    # {"RayTrainWorker": 1139.3, "GenerationWorker": 820.8, "driver": 565.3, ...}
    print(peak.megabytes())

A thread samples this process's descendants every `every` seconds and keeps, per kind, the largest
peak resident set any one process of that kind reached (the kernel's own high-water mark,
/proc/<pid>/status VmHWM, so a peak between two samples is not missed; only a process that lives
less than one interval can be). Kinds: "driver" (this process, or a `python -m cascade` it started),
a Ray actor's class or a task's function or name's first part ("GenerationWorker", "RayTrainWorker",
"TrainController", "eval"), vLLM's processes by their title ("VLLM::EngineCore"), Ray's own daemons
together ("ray_system": raylet, GCS, dashboard, log monitor), anything else by its name.
"""

from __future__ import annotations

import os
import threading

import psutil

# Ray's daemons and helpers, by a piece of their title or command line (lower case)
RAY_SYSTEM = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env",
              "runtimeenvagent")


def peak_rss(pid: int) -> int:
    """The process's peak resident set in bytes (VmHWM), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def kind(p: psutil.Process, driver: int) -> tuple[str | None, bool]:
    """(the process's kind or None, whether it keeps that kind for life: a Ray worker that ran an
    actor or task)"""
    try:
        cmd = p.cmdline()
        name = p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None, False
    title = cmd[0] if cmd else name
    if p.pid == driver or ("-m" in cmd and "cascade" in cmd):
        return "driver", False
    if any(s in (" ".join(cmd[:3]) or name).lower() for s in RAY_SYSTEM):
        # (an exiting process has no cmdline)
        return "ray_system", False
    if title.startswith("ray::"):
        if title.startswith("ray::IDLE"):
            # a pooled worker between tasks (its peak is its last task's, already counted)
            return None, False
        # "ray::<class>.<method>", or "ray::<actor name>:<class>" for a named actor
        # ("gen/4b/1b/0:GenerationWorker"), or a task's name ("eval/4b/before"): grouped by class,
        # or by the name's first part
        k = title[len("ray::"):].split()[0].split(".")[0].rsplit(":", 1)[-1].split("/")[0]
        return k.lstrip("_"), True
    if title.startswith("VLLM") or name.startswith("VLLM"):
        # vLLM's engine core (its name can be cut at 15)
        return (title if title.startswith("VLLM") else name).split()[0], False
    if any(a.endswith("default_worker.py") for a in cmd[:3]):
        return None, False  # a Ray worker process not yet running anything
    return name, False


class PeakMemory:
    def __init__(self, every: float = 0.25) -> None:
        self.every, self.peaks = every, {}  # kind -> bytes
        # pid -> an actor's class or a task's function, kept when it turns IDLE
        self._seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peakmem", daemon=True)

    def __enter__(self) -> "PeakMemory":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "PeakMemory":
        try:  # this process's high-water mark starts again from its present size (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        me = psutil.Process(os.getpid())
        try:
            procs = [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            k, sticky = (self._seen[p.pid], False) if p.pid in self._seen else kind(p, me.pid)
            if k is None:
                continue
            if sticky:
                self._seen[p.pid] = k
            rss = peak_rss(p.pid)
            if rss and rss > self.peaks.get(k, 0):
                self.peaks[k] = rss

    def megabytes(self) -> dict[str, float]:
        """Per kind, the largest peak of one process (MB), the biggest first."""
        return {k: round(v / 2**20, 1) for k,
                v in sorted(self.peaks.items(), key=lambda kv: -kv[1])}

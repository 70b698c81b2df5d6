"""A real two-node Ray cluster on this machine, no shared disk: `ray start --head` and a second `ray
start --address` (its own temp dir and node cache, token auth on both), the tiny cascade submitted
with `ray job submit`, its run directory on the local S3 server. The worker node's raylet is killed
-9 mid-generation and again mid-training (the node is started again each time, as an autoscaler
would); the job still ends, and its outputs are byte for byte those of a one-node run. Before the
second kill, Ray's own pre-emption notice (the node drained with reason PREEMPTION, as an autoscaler
announces a spot reclaim) makes the training workers save a checkpoint at their next step, and the
phase resumes from it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import (FAST, free_port, ray_logs, ray_start_ports, stop_nodes, run_cli, s3_bucket,
                      wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.alone]  # two nodes, raylets killed
RAY = str(Path(sys.executable).with_name("ray"))
# one generation replica and one training worker per node; one prompt per engine call, so that a
# re-queued shard's answers are computed exactly as in an undisturbed run
ARGS = [*FAST, "+stage=4b", "models=tiny", "generation.replicas=2", "generation.shard_size=4",
        "backend.hf.batch_size=1", "train.num_workers=2", "curriculum.1.iters=60",
        "generation.restart_timeout_s=60"]


def _ray_start(env: dict, *args: str) -> None:
    r = subprocess.run([RAY, "start", "--num-cpus=1", "--disable-usage-stats", *ray_start_ports(),
                        *args], env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _wait_cpus(env: dict, port: int, cpus: int) -> None:
    """Until the cluster has every node's CPU (a node whose raylet failed to come up would leave the
    job pending)."""
    out = ""
    for _ in range(120):
        r = subprocess.run([RAY, "status", f"--address=127.0.0.1:{port}"], env=env,
                           capture_output=True, text=True, timeout=60)
        out = r.stdout + r.stderr
        if f"/{cpus}.0 CPU" in out:
            return
        time.sleep(1)
    raise AssertionError(f"the cluster never reached {cpus} CPUs:\n{out[-3000:]}")


def _raylet(temp_dir: str) -> psutil.Process | None:
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "raylet" and any(temp_dir in a for a in p.info["cmdline"] or []):
            return p
    return None


def _node_id(temp_dir: str) -> str:
    p = _raylet(temp_dir)
    assert p is not None, "no raylet for the worker node"
    return next(a.split("=", 1)[1] for a in p.cmdline() if a.startswith("--node_id="))


def _kill_raylet(temp_dir: str) -> None:
    p = _raylet(temp_dir)
    assert p is not None, "no raylet for the worker node"
    p.kill()
    p.wait(30)


@pytest.fixture(scope="module")
def one_node(tiny_preset, tmp_path_factory) -> Path:
    """The same job on one node (a local Ray, a local run directory): the bytes the two-node run
    must end with. A fixture, so that it runs beside another test (`alone` holds only the call)."""
    local = tmp_path_factory.mktemp("one-node") / "run"
    r = run_cli(*ARGS, "cluster.num_cpus=2", f"run_dir={local}")
    assert r.returncode == 0, r.stdout[-3000:]
    return local


def test_two_nodes_no_shared_disk_raylet_killed_twice(s3, tiny_4b_run, one_node, tmp_path):
    import fsspec

    token = secrets.token_hex(16)
    cache = os.environ.get("CASCADE_CACHE") or str(Path("~/.cache/cascade/models").expanduser())
    env = {**os.environ, **s3, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    head_tmp, worker_tmp = (tempfile.mkdtemp(dir="/tmp", prefix=p) for p in ("rh", "rw"))
    head_env = {**env, "CASCADE_CACHE": str(tmp_path / "head-cache")}
    worker_env = {**env, "CASCADE_CACHE": str(tmp_path / "worker-cache")}
    port, dash = free_port(), free_port()
    url = s3_bucket("multinode")
    fs = fsspec.filesystem("s3", use_listings_cache=False)
    root = url.removeprefix("s3://")
    fs.mkdir(root.split("/")[0])
    job = f"cascade-{secrets.token_hex(4)}"

    def status() -> str:
        r = subprocess.run([RAY, "job", "status", f"--address=http://127.0.0.1:{dash}", job],
                           env=env, capture_output=True, text=True, timeout=60)
        out = (r.stdout + r.stderr).lower()  # "Job '<id>' succeeded" once it has ended
        return next((s.upper() for s in ("succeeded", "failed", "stopped") if f"{job}' {s}" in out),
                    "RUNNING")

    def logs() -> str:
        return subprocess.run([RAY, "job", "logs", f"--address=http://127.0.0.1:{dash}", job],
                              env=env, capture_output=True, text=True, timeout=60).stdout

    def alive(what: str):
        def check():
            assert status() == "RUNNING", f"job ended before {what}:\n{logs()[-4000:]}"
            return True
        return check

    join = ("--address", f"127.0.0.1:{port}", f"--temp-dir={worker_tmp}")
    try:
        _ray_start(head_env, "--head", f"--port={port}", f"--temp-dir={head_tmp}",
                   "--include-dashboard=true",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}")
        _ray_start(worker_env, *join)
        _wait_cpus(env, port, 2)
        # the preset's models live on the head node only; models.cache_dir names where they were
        # built
        entry = [sys.executable, "-m", "cascade", *ARGS, "cluster=multinode", f"run_dir={url}",
                 f"models.cache_dir={cache}"]
        r = subprocess.run([RAY, "job", "submit", f"--address=http://127.0.0.1:{dash}",
                            f"--submission-id={job}",
                            "--no-wait", "--",
                            *entry], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

        # 1. mid-generation: a shard committed, the set not yet
        wait_for(lambda: alive("generation")()
                 and bool(fs.glob(f"{root}/generations/1b/*/*/shards/shard-?????.jsonl")),
                 300, what="a committed shard")
        assert not fs.glob(f"{root}/generations/1b/composure/*/step.json")
        _kill_raylet(worker_tmp)
        _ray_start(worker_env, *join)
        _wait_cpus(env, port, 2)

        # 2. mid-training: a P1 checkpoint on the store, P1 not committed. Ray's pre-emption notice
        #    first (the node is drained, as a spot reclaim announces itself): the workers save a
        #    checkpoint at their next step
        wait_for(lambda: alive("training")()
                 and bool(fs.glob(f"{root}/4b/train/_ckpt/01-*/step-*/meta.json")),
                 900, what="a P1 checkpoint")
        assert not fs.exists(f"{root}/4b/train/01-p1_composure/step.json")
        r = subprocess.run(
            [RAY, "drain-node", f"--address=127.0.0.1:{port}", f"--node-id={_node_id(worker_tmp)}",
             "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim",
             "--deadline-remaining-seconds=120"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

        noticed: list[int] = []

        def notice_checkpoint() -> bool:
            for m in fs.glob(f"{root}/4b/train/_ckpt/01-*/step-*/meta.json"):
                try:
                    meta = json.loads(fs.cat_file(m))
                except FileNotFoundError:  # rotated away (train.keep_checkpoints) since the listing
                    continue
                noticed.extend([meta["step"]] if meta.get("reason") == "preemption-notice" else [])
            return bool(noticed)

        wait_for(lambda: alive("the notice's checkpoint")() and notice_checkpoint(), 300,
                 what="a checkpoint saved on the pre-emption notice")
        # the node goes at once: whatever was trained after the notice is lost
        _kill_raylet(worker_tmp)
        _ray_start(worker_env, *join)
        _wait_cpus(env, port, 2)

        wait_for(lambda: status() != "RUNNING", 900, what="the job's end")
        out = logs()
        assert status() == "SUCCEEDED", out[-6000:]
    except AssertionError as e:
        try:
            tail = logs()[-6000:]
        except Exception as why:  # noqa: BLE001 - the cluster may be the thing that failed
            tail = f"(no job logs: {why})"
        raise AssertionError(f"{e}\n--- job logs ---\n{tail}\n--- nodes "
                             f"---\n{ray_logs(head_tmp, worker_tmp)}") from e
    finally:
        stop_nodes(head_tmp, worker_tmp)

    steps = json.loads(fs.cat_file(f"{root}/manifest.json"))["steps"]
    assert all(s["state"] == "done" for s in steps.values()), steps
    assert any("models/" in n for n in steps), "the preset's models went through the store"
    assert (tmp_path / "worker-cache" / "runs" / "models").is_dir(), (
        "the worker node pulled models into its cache"
    )

    # the same job on one node (the fixture): the same bytes
    local = one_node
    for gen in ("ethics", "composure"):
        mine = sorted(local.glob(f"generations/1b/{gen}/*/shards/shard-?????.jsonl"))
        theirs = sorted(fs.glob(f"{root}/generations/1b/{gen}/*/shards/shard-?????.jsonl"))
        assert [p.name for p in mine] == [t.rsplit("/", 1)[1] for t in theirs]
        assert all(p.read_bytes() == fs.cat_file(t) for p, t in zip(mine, theirs)), gen
    for phase in ("00-p0_ethics", "01-p1_composure", "02-p2_ethics"):
        theirs = json.loads(fs.cat_file(f"{root}/4b/train/{phase}/step.json"))
        assert (
            theirs["files"]
            == json.loads((local / f"4b/train/{phase}/step.json").read_text())["files"]
        ), phase
    assert theirs["summary"]["workers"] == 2
    p1 = json.loads(fs.cat_file(f"{root}/4b/train/01-p1_composure/step.json"))["summary"]
    # nothing before it redone
    assert p1["resumed_from_step"] >= min(noticed), (p1["resumed_from_step"], noticed)
    # checkpointed every step since the notice
    assert p1["resumed_from_reason"] == "preemption-notice", p1

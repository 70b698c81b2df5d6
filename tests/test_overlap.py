"""A stage's first phases train while its teachers answer the later phases' prompt sets, when the
cluster holds both (cascade/overlap.py): the plan's order, the planner's wall time, and a real
overlapped run - SIGTERMed while the teacher answers beside the first phase, then resumed - that
commits the bytes of the run that did one step after another.

A local Ray declares two custom resources standing for two pools (`inference`, `training`) and 4
logical CPUs; the replicas and the training worker each take one pool and one CPU (one torch thread:
the sequential run the same, so that the bytes can be compared)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from conftest import FAST, compose, manifest, open_partials, run_cli, start_cli, wait_for

POOLS = ["cluster.num_cpus=4", "+cluster.resources.inference=1", "+cluster.resources.training=1",
         "+backend.resources.inference=1", "+train.resources.training=1",
         "train.cpus_per_worker=1"]
# answers one at a time in shards of four, saved as partial shards every 0.2 s: the composure set
# takes seconds to answer, beside P0
ARGS = [*FAST, "+stage=4b", "models=tiny", *POOLS, "generation.shard_size=4",
        "backend.hf.batch_size=1", "generation.partial_every_s=0.2", "train.save_every=2",
        "curriculum.0.iters=8", "curriculum.1.iters=8", "curriculum.2.iters=4"]


def test_a_stage_overlaps_only_where_the_cluster_holds_both():
    from cascade import overlap
    from cascade.graph import build_graph
    from cascade.plan import make

    cfg = compose([*ARGS, "run_dir=/tmp/cascade-overlap-plan"])
    p = build_graph(cfg, weights=False)
    sp = p.stages[-1]
    assert overlap.split(sp) == (1, ["composure"])  # P0 on ethics; composure beside it
    table = [(w.kind, [s.name for s in w.steps], w.beside) for w in p.work({"4b"})]
    assert table[:7] == [
        ("generate", ["generate/1b/ethics"], False),
        ("curate", ["4b/dataset/p0_ethics"], False), ("curate", ["4b/dataset/p2_ethics"], False),
        ("train", ["4b/train/p0_ethics"], False),
        ("generate", ["generate/1b/composure"], True),
        ("curate", ["4b/dataset/p1_composure"], True),
        ("train", ["4b/train/p1_composure", "4b/train/p2_ethics"], False)]
    # the teacher's replicas kept up from ethics for composure
    assert [w.keep for w in p.work({"4b"})][:5] == [True, False, False, False, False]
    # up to 27b: each stage's new teacher (its others answered in earlier stages) keeps its replicas
    p27 = build_graph(compose(["+stage=27b", "models=tiny", "run_dir=/tmp/cascade-overlap-plan"]),
                      weights=False)
    kept = [(w.stage.name, w.steps[0].name) for w in p27.work({"12b", "27b"}) if w.keep]
    assert kept == [("12b", "generate/4b/ethics"), ("27b", "generate/12b/ethics")], kept
    side = [w.steps[0].name for w in p27.work({"27b"}) if w.beside and w.kind == "generate"]
    assert side == ["generate/12b/composure"]  # the 1b's and 4b's answered by lower stages
    # the same steps, the same keys, whichever the order
    assert ({s.name: s.key for w in p.work({"4b"}) for s in w.steps}
            == {s.name: s.key for s in p.steps()})
    pools = {"CPU": 4.0, "inference": 1.0, "training": 1.0}
    assert overlap.stages(cfg, p.stages, pools, 1, True) == {"4b"}
    # one pool missing, too few CPUs, or the setting off: one step after another
    assert not overlap.stages(cfg, p.stages, {"CPU": 4.0, "inference": 1.0}, 1, True)
    assert not overlap.stages(cfg, p.stages, {**pools, "CPU": 2.0}, 1, True)
    off = compose([*ARGS, "run_dir=/tmp/cascade-overlap-plan", "train.overlap=false"])
    assert not overlap.stages(off, p.stages, pools, 1, True)
    # the planner counts it: the wall time less the shorter side
    b = make(cfg)
    t = b.totals()
    assert set(b.overlapped()) == {"4b"} and t["wall_hours"] < t["hours"]
    assert t["hours"] - t["wall_hours"] == pytest.approx(b.overlapped()["4b"])
    # this machine's defaults: training takes every CPU, nothing overlaps
    d = make(compose(["+stage=4b", "models=tiny", "run_dir=/tmp/cascade-overlap-plan"]))
    assert not d.overlapped() and d.totals()["wall_hours"] == d.totals()["hours"]


def _sums(run: Path) -> dict[str, bytes]:
    """Every committed file a step made (answers, datasets, fused models), by path."""
    skip = ("progress/", "/_ckpt/", "/_work/", "logs/", "report/", "lease/", "tmp/")
    return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*"))
            if f.is_file() and f.suffix in (".jsonl", ".safetensors", ".npz")
            and not any(s in str(f.relative_to(run)) for s in skip)}


@pytest.mark.slow
@pytest.mark.faults
def test_overlapped_run_sigtermed_beside_training_resumes_to_the_sequential_bytes(tmp_path):
    seq, lap = tmp_path / "seq", tmp_path / "lap"
    r = run_cli(*ARGS, "train.overlap=false", f"run_dir={seq}")
    assert r.returncode == 0, r.stdout[-4000:]
    assert "trains beside" not in r.stdout
    # the teacher answering composure beside P0, some answers in: SIGTERM
    proc = start_cli(*ARGS, f"run_dir={lap}", log=tmp_path / "a.log")
    wait_for(lambda: open_partials(lap / "generations/1b/composure"), 600, proc,
             "composure's answers streaming in beside P0")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 143
    log = (tmp_path / "a.log").read_text()
    assert "4b/train/p0_ethics trains beside generate/1b/composure, 4b/dataset/p1_composure" in log
    # the teacher's replicas kept up from ethics for composure: one load of the teacher
    assert "replicas ['gen/4b/1b/0']: kept up from the teacher's last prompt sets" in log
    assert "pre-empted (SIGTERM): what the run had is saved" in log
    steps = manifest(lap)["steps"]
    assert steps["4b/train/p0_ethics"]["state"] != "done", "the signal must land beside P0"
    assert open_partials(lap / "generations/1b/composure"), "the answers beside P0 were not kept"
    r = run_cli(*ARGS, f"run_dir={lap}")
    assert r.returncode == 0, r.stdout[-4000:]
    # P0 started before composure's answers were all in, and went on after they had begun
    steps = manifest(lap)["steps"]
    p0, comp = steps["4b/train/p0_ethics"], steps["generate/1b/composure"]
    assert p0["started"] < comp["time"] and comp["started"] < p0["time"], (p0, comp)
    assert all(s["state"] == "done" for s in steps.values())
    # the phases in curriculum order, each from the one before
    assert (steps["4b/train/p0_ethics"]["time"] < steps["4b/train/p1_composure"]["started"]
            <= steps["4b/train/p1_composure"]["time"] < steps["4b/train/p2_ethics"]["time"])
    a, b = _sums(seq), _sums(lap)
    assert a.keys() == b.keys() and any(k.endswith(".safetensors") for k in a)
    assert [k for k in a if a[k] != b[k]] == []
    ma, mb = (json.loads((d / "4b/eval/metrics.json").read_text()) for d in (seq, lap))
    for k in ("agreement", "text_agreement", "conditioning"):
        assert ma[k] == mb[k], k


def test_a_failure_beside_training_is_raised_once_training_has_ended(monkeypatch, caplog):
    """The driver's thread logic alone (cascade/driver.py `_beside`; the steps replaced by stand-
    ins; the real run: the test above): the work beside fails at once, the training goes on to its
    end (what it trains is kept), then the failure is raised; a failure of the training halts the
    work beside at its next answer and is raised after it stopped."""
    import threading
    import time
    from types import SimpleNamespace

    from cascade import driver
    from cascade.preemption import Preemption

    def work(kind: str, name: str) -> SimpleNamespace:
        return SimpleNamespace(kind=kind, steps=[SimpleNamespace(name=name)])

    done: list[str] = []

    def execute(ctx, w, step):
        if w.kind == "generate":
            raise RuntimeError("shard 3 failed 3 times")
        time.sleep(0.5)
        done.append(w.steps[0].name)

    monkeypatch.setattr(driver, "execute", execute)
    ctx = SimpleNamespace(stop=Preemption(None))
    train = work("train", "4b/train/p0_ethics")
    with pytest.raises(RuntimeError, match="shard 3 failed"):
        driver._beside(ctx, train, [work("generate", "generate/1b/composure")])
    assert done == ["4b/train/p0_ethics"]
    assert "generate/1b/composure failed beside training" in caplog.text

    def execute2(ctx, w, step):
        if w.kind == "train":
            raise ValueError("fusion check failed")
        while not ctx.stop.stopping():  # an answer at a time, until told to stop
            time.sleep(0.01)
        done.append("saved")

    monkeypatch.setattr(driver, "execute", execute2)
    ctx = SimpleNamespace(stop=Preemption(None))
    with pytest.raises(ValueError, match="fusion check failed"):
        driver._beside(ctx, train, [work("generate", "generate/1b/composure")])
    assert done[-1] == "saved" and ctx.stop.halted
    assert not any(t.name == "beside" for t in threading.enumerate())  # joined

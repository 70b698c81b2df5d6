"""Every weight load recorded (cascade/loads.py): which model, bytes, seconds, process kind, where
from; in the step records of a real run, summed per stage by `cascade status` and the report."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import FAST, run_cli

ARGS = [*FAST, "+stage=4b", "models=tiny"]


def test_a_load_is_recorded_with_its_source(tmp_path: Path):
    from cascade import loads

    m = tmp_path / "run/4b/train/02-p2_ethics"
    m.mkdir(parents=True)
    (m / "model.safetensors").write_bytes(b"x" * 1000)
    (m / "config.json").write_text("{}")
    loads.taken()
    with loads.timed(m, "eval"):
        pass
    copy = tmp_path / "node-cache/abc"
    copy.mkdir(parents=True)
    (copy / "model.safetensors").write_bytes(b"y" * 10)
    loads.pulled(str(copy), "object store", loads.name_of("s3://b/run/4b/train/00-p0_ethics"))
    with loads.timed(copy):
        pass
    got = loads.taken()
    assert loads.taken() == []  # drained
    assert [(r["model"], r["bytes"], r["process"], r["where"]) for r in got] == [
        ("4b/train/02-p2_ethics", 1000, "eval", "local"),
        ("4b/train/00-p0_ethics", 10, loads.process, "object store")]
    pm = loads.per_model(got + got[:1])
    assert pm["4b/train/02-p2_ethics"]["loads"] == 2
    assert pm["4b/train/02-p2_ethics"]["bytes"] == 2000
    assert "3 of 2 models" in loads.describe(pm)
    assert loads.name_of("/cache/tiny-abc/4b") == "tiny-abc/4b"


def test_every_load_of_a_run_is_in_its_steps_and_status(tiny_4b_run: Path):
    def summary(rel: str) -> dict:
        return json.loads((tiny_4b_run / rel / "step.json").read_text())["summary"]

    base = next(r["model"] for r in summary("4b/train/00-p0_ethics")["loads"])
    assert base.endswith("/4b")  # the student's base, from the model cache
    # each phase: its starting weights and the fusion check's reload of the fused model
    names = [f"4b/train/{i:02d}-{ph}" for i, ph in enumerate(("p0_ethics", "p1_composure",
                                                             "p2_ethics"))]
    for i, name in enumerate(names):
        got = summary(name)["loads"]
        assert {r["process"] for r in got} == {"train"}, got
        assert all(r["bytes"] > 0 and r["seconds"] >= 0 and r["where"] == "local" for r in got)
        # the first phase reads the base; each phase's fusion check reads its fused model back,
        # and the next phase starts from that model in memory: no second read of the same file
        assert [r["model"] for r in got] == ([base] if i == 0 else []) + [name], got
    # the teacher's replica: once, on its first prompt set's step
    gen = [json.loads(f.read_text())["summary"]["loads"]
           for f in sorted(tiny_4b_run.glob("generations/1b/*/*/step.json"))]
    assert sorted(len(g) for g in gen) == [0, 1], gen
    assert [r["process"] for g in gen for r in g] == ["generate"], gen
    # the evaluation loads nothing: training's rank 0 scored the base as the first phase loaded
    # it and the trained student as the last fusion check read it back (cascade/scoring.py), as an
    # evaluation task would have scored them (no CPUs to spare here: the driver does not score the
    # base beside training)
    assert summary("4b/eval")["loads"] == []
    _scored_as_the_evaluation_would(tiny_4b_run)

    r = run_cli("status", *ARGS, f"run_dir={tiny_4b_run}", "--json")
    st = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert st["loads"]["4b"][base]["processes"] == {"train": 1}
    assert st["loads"]["4b"]["4b/train/02-p2_ethics"]["processes"] == {"train": 1}
    r = run_cli("status", *ARGS, f"run_dir={tiny_4b_run}")
    # each model of the stage read once: the teacher, the base and the three fused phases
    assert "4b: weight loads: 5 of 5 models" in r.stdout, r.stdout[-2000:]
    assert "weight loads" in (tiny_4b_run / "report/index.html").read_text()


def _scored_as_the_evaluation_would(run: Path) -> None:
    """The evaluation's figures are the ones training's rank 0 wrote, and an evaluation task
    loading the models gets them too (to float rounding: its threads are not the worker's)."""
    from types import SimpleNamespace

    from cascade.scoring import heldout
    from cascade.rundir import RunDir
    from cascade.scoring import score_records, settings
    from conftest import compose

    cfg = compose(ARGS)
    sp = SimpleNamespace(name="4b", phases=[SimpleNamespace(name=ph.name)
                                            for ph in cfg.curriculum])
    records = heldout(RunDir(str(run)), sp)[: cfg.eval.max_probes or None]
    m = json.loads((run / "4b/eval/metrics.json").read_text())
    final = str(run / "4b/train/02-p2_ethics")
    for which, model in (("before", m["base_model"]), ("after", final)):
        made = json.loads((run / f"4b/train/_work/{which}.json").read_text())["score"]
        assert m["agreement"][which] == made["loglik"], which
        assert m["self_ended"][which] == made["self_ended"], which
        again = score_records(model, None, records, **settings(cfg), trust=False)
        for k in ("loglik", "conditioning", "rouge_l", "self_ended"):
            assert abs(again[k] - made[k]) <= 1e-5 * max(1.0, abs(made[k])), (which, k, again[k])


def test_a_hub_models_bytes_are_its_cached_snapshots(tmp_path: Path, monkeypatch):
    import huggingface_hub.constants as hub

    from cascade import loads

    snap = tmp_path / "models--org--model/snapshots/abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"z" * 321)
    (tmp_path / "models--org--model/refs").mkdir()
    (tmp_path / "models--org--model/refs/main").write_text("abc123")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    assert loads.weight_bytes("org/model") == 321
    assert loads.weight_bytes("org/absent") == 0


def test_a_score_made_in_training_is_taken_only_for_its_model_records_and_settings(tmp_path):
    """cascade/scoring.py: the evaluation takes training's rank 0's score only when it was made of
    the same model, on the same held-out records, with the same settings; else it scores again."""
    from cascade.rundir import RunDir
    from cascade.scoring import plan, taken

    rd = RunDir(str(tmp_path / "run"))
    recs = [{"messages": [{"role": "user", "content": "q"}], "response": "a"}]
    kw = {"max_len": 64, "batch_size": 8, "answer_tokens": 8, "seed": 42, "divergence": False}
    spec = plan(rd, "4b", "after", 2, "key1", recs, kw)
    assert spec["file"].endswith("4b/train/_work/after.json")
    assert taken(rd, "4b", "after", "key1", recs, kw) is None  # none made
    rd.write_json(spec["file"], {"stamp": spec["stamp"], "score": {"loglik": -1.5}})
    assert taken(rd, "4b", "after", "key1", recs, kw) == {"loglik": -1.5}
    assert taken(rd, "4b", "after", "key2", recs, kw) is None  # another model
    assert taken(rd, "4b", "after", "key1", recs * 2, kw) is None  # other records
    assert taken(rd, "4b", "after", "key1", recs, {**kw, "seed": 1}) is None  # other settings
    assert taken(rd, "4b", "before", "key1", recs, kw) is None  # the other score's file

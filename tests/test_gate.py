"""The promotion gate (stages/gate.py): a student teaches the next stage only if its held-out
evaluation promotes it; its verdict a committed step carrying the ledger from the root teacher
up."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import FAST, copy_run, run_cli
from stages.gate import judge


def _metrics(delta=0.5, ended=0.9, kl=(1.0, 0.8), cond=0.1, z=None) -> dict:
    return {"agreement": {"delta": delta}, "self_ended": {"after": ended},
            "conditioning": {"delta": cond, **({} if z is None else {"z": z})},
            "reverse_kl": {"sampled": {"before": kl[0], "after": kl[1]}} if kl else None}


@pytest.mark.parametrize("metrics,verdict,failed", [
    (_metrics(), "PROMOTE", []),
    (_metrics(kl=None), "PROMOTE", []),  # reverse KL not measured: not counted
    (_metrics(delta=-0.3), "REJECT", ["agreement"]),
    (_metrics(ended=0.2, kl=(1.0, 1.3)), "REJECT", ["self_ended", "reverse_kl_rise"]),
    (_metrics(delta=None), "HOLD", []),
    # answers learnt without their questions: the conditioning falls, and its share of the gain
    (_metrics(cond=-0.05), "REJECT", ["conditioning", "conditioning_share"]),
    (_metrics(cond=0.02), "REJECT", ["conditioning_share"]),  # rose, by 4 % of the agreement's
    (_metrics(delta=0.05, cond=0.02), "PROMOTE", []),  # a small gain, 40 % of it conditioning
    (_metrics(cond=None), "PROMOTE", []),  # an evaluation from before it was measured
])
def test_verdict_from_the_figures(metrics, verdict, failed):
    from cascade.config import GateConfig

    v = judge(GateConfig(), metrics)
    assert v["verdict"] == verdict, v
    assert [c["name"] for c in v["criteria"] if c["passed"] is False] == failed
    assert len(v["reasons"]) == len(failed) or verdict == "HOLD"
    for c in v["criteria"]:  # each with its value and threshold
        assert {"name", "value", "op", "threshold", "passed"} <= set(c)


@pytest.mark.parametrize("z,threshold,verdict", [
    (1.2, 2.0, "REJECT"),  # a share large enough, on gains too scattered to stand above 0
    (4.0, 2.0, "PROMOTE"),
    (1.2, None, "PROMOTE"),  # the default: not judged
    (None, 2.0, "PROMOTE"),  # not measured (fewer than two records)
])
def test_conditioning_z_when_asked(z, threshold, verdict):
    from cascade.config import GateConfig

    v = judge(GateConfig(min_conditioning_z=threshold), _metrics(cond=0.1, z=z))
    assert v["verdict"] == verdict
    names = [c["name"] for c in v["criteria"]]
    assert ("conditioning_z" in names) == (threshold is not None)


def test_the_records_paired_gain():
    """stages/evaluate.py paired_gain: each record's after - before, their mean over its standard
    error, the mean per teacher; nothing from fewer than two records."""
    from stages.evaluate import paired_gain

    got = paired_gain([0.1, 0.2, 0.3, 0.4], [0.3, 0.3, 0.6, 0.5])
    gains = [0.2, 0.1, 0.3, 0.1]
    assert got["record_gains"] == pytest.approx(gains)
    sd = (sum((g - 0.175) ** 2 for g in gains) / 3) ** 0.5
    assert got["z"] == pytest.approx(0.175 / (sd / 2))
    assert paired_gain([0.1], [0.2]) == {} and paired_gain(None, [0.1, 0.2]) == {}
    # per teacher whose answers they are: which one's questions the student learnt, or lost
    got = paired_gain([0.1, 0.2, 0.3, 0.4], [0.3, 0.3, 0.6, 0.5], ["12b", "1b", "12b", "1b"])
    assert got["by_teacher"]["12b"] == {"records": 2, "gain": pytest.approx(0.25)}
    assert got["by_teacher"]["1b"] == {"records": 2, "gain": pytest.approx(0.1)}


def test_each_answer_after_other_prompts():
    """cascade/scoring.py mismatched: each record's answer after the next `k` prompts that are not
    its own (a repeated prompt skipped), wrapping around; none when every prompt is the same."""
    from cascade.scoring import mismatched

    recs = [{"messages": [{"role": "user", "content": p}], "response": f"r{i}"}
            for i, p in enumerate("abac")]
    got = mismatched(recs, 2)
    assert [[m[0]["content"] for m, _ in ps] for ps in got] == [
        ["b", "c"], ["a", "c"], ["c", "b"], ["a", "b"]]
    assert all(r == f"r{i}" for i, ps in enumerate(got) for _, r in ps)
    assert [len(ps) for ps in mismatched(recs, 16)] == [2, 3, 2, 3]  # at most the others
    assert mismatched(recs[:1] + recs[2:3], 4) is None


def _harness(student: float, teacher: float, better: bool = True) -> dict:
    res = {"results": {"cascade_format": {"acc": student, "loss": 1 - student}},
           "higher_is_better": {"cascade_format": {"acc": True, "loss": False}}}
    other = {"results": {"cascade_format": {"acc": teacher, "loss": 1 - teacher}},
             "higher_is_better": res["higher_is_better"]}
    return {"tasks": ["cascade_format"], "limit": None, "seed": 1,
            "results": {"student": res, "teacher 1b": other}}


@pytest.mark.parametrize("harness,drop,verdict", [
    (_harness(0.5, 0.8), 0.1, "REJECT"),  # the teacher 0.3 ahead, more than allowed
    (_harness(0.5, 0.8), 0.5, "PROMOTE"),
    (_harness(0.9, 0.8), 0.0, "PROMOTE"),  # the student ahead: a lead of -0.1
    (None, 0.1, "PROMOTE"),  # not run: not judged
])
def test_harness_tasks_against_the_teachers(harness, drop, verdict):
    from cascade.config import GateConfig

    v = judge(GateConfig(max_harness_drop=drop), {**_metrics(), "harness": harness})
    c = next(c for c in v["criteria"] if c["name"] == "harness_drop")
    assert v["verdict"] == verdict, v
    if harness:  # acc (higher is better) and loss (lower) give the same lead
        assert c["value"] == pytest.approx(harness["results"]["teacher 1b"]["results"][
            "cascade_format"]["acc"] - harness["results"]["student"]["results"][
            "cascade_format"]["acc"])
    # without max_harness_drop the criterion is not listed
    assert "harness_drop" not in [c["name"] for c in judge(GateConfig(), _metrics())["criteria"]]


def test_a_student_not_promoted_never_teaches(tiny_4b_run: Path, tmp_path: Path):
    # the shared healthy run: promoted, and its verdict's ledger is made of committed bytes
    v = json.loads((tiny_4b_run / "4b/gate/verdict.json").read_text())
    assert v["verdict"] == "PROMOTE" and v["reasons"] == [] and v["enforce"], v
    weights = (tiny_4b_run / "4b/train/02-p2_ethics/model.safetensors").read_bytes()
    metrics = (tiny_4b_run / "4b/eval/metrics.json").read_bytes()
    assert v["ledger"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert v["ledger"]["metrics_sha256"] == hashlib.sha256(metrics).hexdigest()
    assert len(v["ledger"]["heldout_sha256"]) == 64  # of the held-out records it was judged on
    assert v["ledger"]["teachers"] == [{"stage": "1b", "weights_key": v["ledger"]["teachers"][0][
        "weights_key"]}]  # the root teacher, used as is: its weights' identity
    assert v["thresholds"]["min_gain"] == 0.0

    # a stricter gate re-runs the gate alone, rejects the 4b, and the 12b stops before generating
    run = copy_run(tiny_4b_run, tmp_path / "run")
    args = [*FAST, "+stage=12b", "models=tiny", f"run_dir={run}", "gate.min_gain=100"]
    r = run_cli(*args)
    assert r.returncode == 2, r.stdout[-4000:]
    assert "[run ] 4b/gate" in r.stdout and "[run ] 4b/train" not in r.stdout
    assert "[run ] generate/4b" not in r.stdout and not (run / "generations/4b").exists()
    assert not (run / "12b").exists()
    said = r.stdout[r.stdout.index("stage 12b not started"):]
    assert "stage 4b, was not promoted" in said and "REJECT: agreement" in said, said[:600]
    v = json.loads((run / "4b/gate/verdict.json").read_text())
    assert v["verdict"] == "REJECT" and v["reasons"][0].startswith("agreement "), v
    assert v["criteria"][0]["threshold"] == 100 and v["criteria"][0]["passed"] is False

    # the same command again: refused from the committed verdict, before Ray starts
    r = run_cli(*args)
    assert r.returncode == 2 and "stage 12b not started" in r.stdout, r.stdout[-3000:]
    assert " up (node " not in r.stdout  # cascade.cluster's line when Ray is up
    # `cascade status` and the report say why
    st = run_cli("status", *args)
    assert "4b: gate REJECT; agreement" in st.stdout and "(does not teach)" in st.stdout, st.stdout
    assert "REJECT; agreement" in (run / "report/index.html").read_text()


def test_seeded_bad_students_are_rejected(tiny_4b_run: Path, tmp_path: Path):
    # tests/seeded_bad.py: the 4b re-trained (its teacher's answers reused) on answers shuffled
    # among its prompts, on answers contradicting the kernel, and at 100 x the learning rate; the
    # gate at its defaults rejects each, naming the criterion that caught it (benchmarks/gate.py:
    # 10 seeds of each, on the preset's own curriculum)
    import os

    from seeded_bad import overrides

    run = copy_run(tiny_4b_run, tmp_path / "run")
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    caught = {}
    for kind in ("shuffled", "contradict", "lr_x100"):
        # FAST's curriculum (lr 1e-3 each phase), its learning rates replaced for lr_x100
        args = [a for a in FAST if not (kind == "lr_x100" and ".lr=" in a)]
        extra = overrides(kind, 1, [1e-3] * 3)
        r = run_cli(*args, *extra, "+stage=4b", "models=tiny", f"run_dir={run}", env=env)
        assert r.returncode == 0, r.stdout[-3000:]
        assert "[run ] 4b/train/p0_ethics" in r.stdout and "[run ] generate/" not in r.stdout
        v = json.loads((run / "4b/gate/verdict.json").read_text())
        caught[kind] = (v["verdict"], [c["name"] for c in v["criteria"] if c["passed"] is False])
    assert all(verdict == "REJECT" for verdict, _ in caught.values()), caught
    assert "conditioning" in caught["shuffled"][1], caught

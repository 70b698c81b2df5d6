"""Phase kinds as rooms (cascade/phases/): a kind added in one module (tests/toy_kind.py) and one
conf file (tests/conf/curriculum/toy.yaml), nothing else edited, is checked before Ray starts,
planned, trained with its own encoding and loss, and its figures are kept; beside it, in the same
run, a phase of the built-in kind distill."""

from __future__ import annotations

import json
import os

import pytest

from conftest import ROOT, compose, run_cli

TOY = [f"hydra.searchpath=[file://{ROOT}/tests/conf]", "+curriculum=toy"]
# every process
ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def test_a_kind_is_one_module_and_one_conf_file(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from cascade import phases
    from cascade.rundir import RunDir
    from cascade.phases import load_examples

    run = tmp_path / "run"
    r = run_cli("cluster.include_dashboard=false", "+stage=4b", "models=tiny", f"run_dir={run}",
                *TOY, env=ENV)
    assert r.returncode == 0, r.stdout[-4000:]
    toy = json.loads((run / "4b/train/00-p0_ethics/step.json").read_text())["summary"]
    assert toy["kind"] == "toy_kind" and toy["options"] == {"first": 3, "scale": 0.5}
    # its loss trained the phase (scale x its own figure at every step) and its figure was kept
    assert len(toy["unscaled_losses"]) == toy["steps"] == 6
    assert toy["losses"] == pytest.approx([0.5 * u for u in toy["unscaled_losses"]], rel=1e-6)
    # distill: the teachers' stored top-k log-probabilities joined the loss, and it fell
    recs = [json.loads(x)
            for x in (run / "4b/dataset/p1_composure/train.jsonl").read_text().splitlines()]
    assert all(x["logprobs"]["length"] == x["completion_tokens"] and x["vocab_hash"] for x in recs)
    s = json.loads((run / "4b/train/01-p1_composure/step.json").read_text())["summary"]
    assert (s["kind"] == "distill" and len(s["distill_losses"]) == s["steps"]
            and "unscaled_losses" not in s)
    assert s["distill_loss_last"] < s["distill_loss_first"]
    # its encoding: the first `first` tokens of each answer learnt, no more
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    kind, tok = (phases.load("toy_kind"),
                 AutoTokenizer.from_pretrained(run / "4b/train/00-p0_ethics"))
    examples, _ = load_examples(RunDir(str(run)), str(run / "4b/dataset/p0_ethics/train.jsonl"),
                                tok, 256, kind, phases.options("toy_kind", toy["options"], "toy"))
    assert len(examples) == toy["examples"] and {sum(y != -100 for y in e["labels"])
                                                 for e in examples} == {3}


def test_a_kind_is_checked_and_planned_before_ray(monkeypatch):
    from cascade.config import ConfigError
    from cascade.plan import make
    from cascade.tiny import build_preset

    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    with pytest.raises(ConfigError, match="p0_ethics.*options.first must be > 0"):
        compose(["+stage=4b", "models=tiny", *TOY, "curriculum.0.options.first=0"])
    with pytest.raises(
        ConfigError, match="size not an option of kind 'toy_kind' \\(its options: first, scale\\)"
    ):
        compose(["+stage=4b", "models=tiny", *TOY, "+curriculum.0.options.size=1"])
    cfg = compose(["+stage=4b", "models=tiny", *TOY])
    build_preset(cfg)
    rows = {r["step"]: r["work"] for r in make(cfg).rows}
    # the kind's own cost
    assert rows["4b/train/p0_ethics"]["learnt_tokens_at_most"] == 6 * 8 * 1 * 3
    assert "learnt_tokens_at_most" not in rows["4b/train/p1_composure"]

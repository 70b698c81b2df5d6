"""End to end on the tiny preset: `+stage=4b` builds usable artifacts; stages resolve and reuse like
make."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import FAST, compose, copy_run, manifest, read_jsonl, run_cli

pytestmark = pytest.mark.slow
PHASES = ["00-p0_ethics", "01-p1_composure", "02-p2_ethics"]


def test_4b_artifacts_open_with_stock_tools(tiny_4b_run: Path):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tiny_4b_run
    steps = manifest(run)["steps"]
    assert steps and all(s["state"] == "done" for s in steps.values()), steps
    assert {"generate/1b/ethics", "generate/1b/composure", "4b/train/p2_ethics", "4b/eval"} <= set(
        steps
    )
    # a lone training worker runs on every CPU of this one-node cluster
    assert {json.loads(p.read_text())["summary"]["threads"]
            for p in run.glob("4b/train/*/step.json")} == {
        os.cpu_count()}

    # the distilled dataset, with provenance on every record
    ds = datasets.load_dataset("json", data_files=str(run / "4b/dataset/p0_ethics/train.jsonl"),
                               split="train")
    assert len(ds) > 0
    for rec in ds:
        assert rec["phase"] == "p0_ethics" and rec["teacher"] == "1b" and rec["response"].strip()
        assert rec["prompt_id"] and rec["teacher_key"] and rec["sampling"]["temperature"] == 0.7
        assert isinstance(rec["seed"], int) and rec["finish_reason"] == "stop"
    assert len(set(ds["prompt_id"])) == len(ds)

    # the fused student: a plain HF directory (safetensors, tokenizer, chat template), no adapter
    # left over
    student = run / "4b/train" / PHASES[-1]
    names = {p.name for p in student.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names, names
    assert not any(n.endswith(".bin") or n.startswith("adapter_") for n in names), names
    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student)
    assert model.config.num_key_value_heads == 1 and model.config.sliding_window
    msgs = [{"role": "user", "content": "What does it mean to protect consciousness?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<start_of_turn>model\n")
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    # metrics: loss per phase, agreement before/after on held-out probes, curation counts
    m = json.loads((run / "4b/eval/metrics.json").read_text())
    assert list(m["phases"]) == ["p0_ethics", "p1_composure", "p2_ethics"]
    assert all(p["loss_last"] > 0 and p["steps"] > 0 for p in m["phases"].values())
    a = m["agreement"]
    assert a["records"] > 0 and a["after"] > a["before"], a  # the student moved towards its teacher
    t = m["text_agreement"]  # its own greedy answers against the teacher's, ROUGE-L F1
    assert t["records"] == a["records"] and 0 <= t["before"] <= 1 and 0 <= t["after"] <= 1, t
    assert 0 <= m["self_ended"]["after"] <= 1 and m["kernel_in_context"] is False
    assert m["curation"]["p0_ethics"]["kept"] == len(
        read_jsonl(run / "4b/dataset/p0_ethics/train.jsonl")
    ) + len(read_jsonl(run / "4b/dataset/p0_ethics/heldout.jsonl"))

    # self-describing: the resolved config, and a step record in every committed directory
    assert "target: 4b" in (run / "config.yaml").read_text()
    for p in PHASES:
        assert json.loads((run / "4b/train" / p / "step.json").read_text())["key"]


def test_rerun_has_nothing_to_do(tiny_4b_run: Path, tmp_path):
    """The same command again does nothing; so do settings that change how, not what, is trained
    (gradient checkpointing: recomputation gives the same gradients, and `+stage=27b` turns it on
    for every stage)."""
    run = copy_run(tiny_4b_run, tmp_path / "run")
    r = run_cli(*FAST, "+stage=4b", "models=tiny", f"run_dir={run}",
                "train.gradient_checkpointing=true")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout[-2000:]
    assert "Ray 2." not in r.stdout  # decided before Ray starts


def test_12b_on_a_run_with_4b_done_reuses_it(tiny_4b_run: Path, tmp_path):
    """...with a gate no student passes, not enforced (gate.enforce=false): the 4b's gate alone runs
    again, rejects it, and it teaches anyway, as every record says; the 12b's verdict chains the
    4b's (the ledger). The gate enforced: tests/test_gate.py."""
    run = copy_run(tiny_4b_run, tmp_path / "run")
    before = {p: (run / "4b/train" / p / "step.json").read_text() for p in PHASES}
    r = run_cli(*FAST, "+stage=12b", "models=tiny", f"run_dir={run}", "gate.min_gain=100",
                "gate.enforce=false")
    assert r.returncode == 0, r.stdout[-4000:]
    ran = [x.split("[run ] ")[1].split()[0] for x in r.stdout.splitlines() if "[run ] 4b/" in x]
    assert ran == ["4b/gate"] and "[skip] 4b/dataset/p0_ethics" in r.stdout, ran
    assert "teacher 4b was not promoted (REJECT: agreement" in r.stdout
    assert "it teaches anyway (gate.enforce=false)" in r.stdout
    v4, v12 = (json.loads((run / s / "gate/verdict.json").read_text()) for s in ("4b", "12b"))
    assert v4["verdict"] == v12["verdict"] == "REJECT" and not v12["enforce"]
    digest = hashlib.sha256((run / "4b/gate/verdict.json").read_bytes()).hexdigest()
    assert v12["ledger"]["teachers"] == [
        {"stage": "4b", "verdict": "REJECT", "verdict_sha256": digest},
        {"stage": "1b", "weights_key": v4["ledger"]["teachers"][0]["weights_key"]}]
    assert before == {p: (run / "4b/train" / p / "step.json").read_text() for p in PHASES}
    # the 1b's answers made for 4b are reused by 12b (same teacher, sampling and prompts)
    assert "[skip] generate/1b/ethics" in r.stdout
    m = json.loads((run / "12b/eval/metrics.json").read_text())
    assert {t["stage"] for t in m["teachers"]} == {"4b", "1b"}
    teachers = {r["teacher"] for r in read_jsonl(run / "12b/dataset/p0_ethics/train.jsonl")}
    assert teachers == {"4b", "1b"}


def test_12b_on_a_fresh_run_plans_4b_first(tmp_path):
    """Like make: a fresh 12b run has every step of 4b (its teacher) before 12b's, in the order the
    driver runs them (stage by stage; the run itself is test_12b_on_a_run_with_4b_done_reuses_it,
    after 4b)."""
    from cascade.graph import build_graph

    p = build_graph(compose([*FAST, "+stage=12b", "models=tiny", f"run_dir={tmp_path / 'run'}"]))
    assert [sp.name for sp in p.stages] == ["1b", "4b", "12b"]
    todo = p.pending()
    assert todo.index("4b/eval") < min(i for i,
                                       s in enumerate(todo)
                                       if s.startswith(("12b/", "generate/4b/")))
    assert todo.index("4b/gate") < todo.index("generate/4b/ethics")  # a teacher only if promoted
    assert todo[0] == "generate/1b/ethics" and todo[-1] == "12b/gate" and len(todo) == 2 + 8 + 2 + 8


def test_root_teacher_built_by_kernel_context_distillation(tmp_path):
    """stages.1b.build: the base answers with the kernel in context, then learns those answers
    without it."""
    conf = tmp_path / "conf" / "local"
    conf.mkdir(parents=True)
    (conf / "build.yaml").write_text("# @package _global_\nstages:\n  1b: {build: true}\n")
    run = tmp_path / "run"
    r = run_cli("--config-dir", str(tmp_path / "conf"), *FAST, "+stage=1b", "models=tiny",
                "+local=build", f"run_dir={run}")
    assert r.returncode == 0, r.stdout[-4000:]
    gen = [x for f in sorted((run / "generations/1b-base/ethics").rglob("shard-?????.jsonl"))
           for x in read_jsonl(f)]
    assert gen and all(x["system_in_context"] for x in gen)
    train = read_jsonl(run / "1b/dataset/p0_ethics/train.jsonl")
    assert train and all(len(x["messages"]) == 1 and x["messages"][0]["role"] == "user"
                         for x in train)
    # kernel not in the data
    assert not any("Prime-Imperative" in x["messages"][0]["content"] for x in train)
    assert (run / "1b/train/02-p2_ethics/model.safetensors").exists()
    assert json.loads((run / "1b/eval/metrics.json").read_text())["agreement"]["records"] > 0


def test_changed_config_reruns_only_what_it_determines(tiny_4b_run: Path, tmp_path):
    run = copy_run(tiny_4b_run, tmp_path / "run")
    # a student-only change (and two DDP workers): generations and datasets are reused, training
    # re-runs (two steps a phase: what is re-run is the question here, not what it learns)
    r = run_cli(*FAST, "+stage=4b", "models=tiny", f"run_dir={run}", "train.lora.r=4",
                "train.num_workers=2", *(f"curriculum.{i}.iters=2" for i in range(3)))
    assert r.returncode == 0, r.stdout[-4000:]
    assert "[skip] generate/1b/ethics" in r.stdout and "[skip] 4b/dataset/p0_ethics" in r.stdout
    assert "[run ] 4b/eval" in r.stdout and "world_size=2" in r.stdout
    summary = json.loads((run / "4b/train/00-p0_ethics/step.json").read_text())["summary"]
    # the CPUs shared out
    assert summary["workers"] == 2 and summary["threads"] == max(1, os.cpu_count() // 2)
    # a sampling change: the teacher answers again
    r = run_cli(*FAST, "+stage=4b", "models=tiny", f"run_dir={run}", "generation.temperature=0.5",
                *(f"curriculum.{i}.iters=1" for i in range(3)))  # only the new answers matter here
    assert r.returncode == 0, r.stdout[-4000:]
    assert ("[skip] generate/1b/ethics" not in r.stdout
            and "generate 1b/ethics: shard 0 done" in r.stdout)
    recs = read_jsonl(run / "4b/dataset/p0_ethics/train.jsonl")
    assert {x["sampling"]["temperature"] for x in recs} == {0.5}


def test_logit_distillation_needs_a_shared_tokenizer(tiny_4b_run: Path):
    """A teacher whose vocabulary is not the student's is refused before training, naming both."""
    from cascade.config import ConfigError
    from cascade.config import compose
    from cascade.graph import build_graph
    from stages.curate import check_shared_vocab

    cfg = compose(["+stage=4b", "models=tiny", f"run_dir={tiny_4b_run}", "generation.logprobs=4",
                   "curriculum.0.kind=distill"])
    sp = build_graph(cfg).stages[-1]
    ph = sp.phases[0]
    answers = {"1b": {"p": [{"logprobs": {"file": "x", "offset": 0, "length": 1},
                             "vocab_hash": "0123abcd"}]}}
    with pytest.raises(ConfigError,
                       match="needs a shared tokenizer: teacher 1b .*0123abcd.* and student 4b"):
        check_shared_vocab(cfg, sp, ph, answers)
    answers["1b"]["p"][0].pop("logprobs")
    with pytest.raises(ConfigError, match="teacher 1b's answers have none"):
        check_shared_vocab(cfg, sp, ph, answers)

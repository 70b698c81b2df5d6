"""The planner (`python -m cascade +stage=27b plan=true`, cascade/plan.py): parameters from shipped
configs, placements refused with what would fit, and on the tiny preset the counts a run then
reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, ROOT, compose, read_jsonl, run_cli

ARGS = [*FAST, "+stage=4b", "models=tiny"]


def test_parameters_from_the_shipped_configs_are_gemma3s():
    """Gemma 3's published parameter counts (text and vision), from the configs shipped in
    data/models/."""
    from cascade.arch import Arch, shipped_configs

    shipped = shipped_configs()
    published = {"gemma-3-270m": 268_098_176, "gemma-3-1b": 999_885_952,
                 "gemma-3-4b": 4_300_079_472,
                 "gemma-3-12b": 12_187_325_040, "gemma-3-27b": 27_432_406_640}
    assert {k: Arch.of(shipped[k]).params for k in published} == published
    assert (shipped["google/gemma-3-27b-it"] == shipped["gemma-3-27b"]
            and "lthn/LEM-Gemma3-1B" in shipped)


@pytest.mark.slow
def test_parameters_of_the_tiny_preset_equal_its_weights(tiny_4b_run: Path):
    """The planner's count for the built tiny models equals their loaded parameters (tied embeddings
    once)."""
    from transformers import AutoModelForCausalLM

    from cascade.arch import Arch, model_config
    from cascade.models import model_identity

    cfg = compose(ARGS)
    for stage in ("1b", "4b"):
        model = AutoModelForCausalLM.from_pretrained(model_identity(cfg, stage)[0])
        assert Arch.of(model_config(cfg, stage)).params == sum(
            p.numel() for p in model.parameters()
        ), stage


def _plan(*args: str) -> subprocess.CompletedProcess:
    # offline: the shipped configs only
    return run_cli(*args, timeout=300, env={"HF_HUB_OFFLINE": "1"})


def test_27b_ddp_on_80gb_is_refused_with_what_would_fit(tmp_path):
    """27b without gradient checkpointing, DDP on 8 x 80 GB: refused (exit 2) naming what fits; the
    stage's own settings (gradient checkpointing) fit; on 40 GB GPUs only FSDP does. Ray never
    starts."""
    base = ["+stage=27b", f"run_dir={tmp_path}/run", "plan.gpus=8", "plan.gpu_memory_gb=80"]
    r = _plan(*base, "plan=true", "train.gradient_checkpointing=false")
    assert r.returncode == 2, r.stdout[-3000:]
    line = next(x for x in r.stdout.splitlines()
                if x.startswith("does not fit: 27b/train/p0_ethics"))
    assert ("ddp, gradient_checkpointing=False" in line
            and "would fit: train.gradient_checkpointing=true" in line)
    assert "train.strategy=fsdp train.num_workers=4" in line
    assert "Ray" not in r.stdout and not (tmp_path / "run" / "manifest.json").exists()
    from cascade.plan import make, render

    b = make(compose(base))  # the stage's own settings (gradient checkpointing for 27b) fit
    assert not b.problems and "27.4B" in render(b) and "GPU-hours" in render(b), render(b)
    # one table: the planner costs each step the driver would run, in the driver's order
    # (RunGraph.work)
    assert (
        [r["step"] for r in b.rows]
        == b.p.pending()
        == [s.name for w in b.p.work() for s in w.steps]
    )
    b = make(compose([*base[:2], "plan.gpu=A100-40GB", "plan.gpus=8"]))
    assert b.dev.memory_gb == 40 and any("would fit: train.strategy=fsdp" in p
                                         for p in b.problems), b.problems
    rows = {x["step"]: x for x in b.rows}
    assert (rows["27b/train/p0_ethics"]["fits"] is False
            and rows["12b/train/p0_ethics"]["fits"] is True)
    assert rows["generate/12b/ethics"]["memory_gb"]["weights"] == pytest.approx(24.37, abs=0.01)
    r = _plan("plan", *base, "train.gradient_checkpointing=false", "--json")  # for scripts
    assert r.returncode == 2 and json.loads(r.stdout[r.stdout.index("{\n") :])["problems"], (
        r.stdout[-3000:]
    )


def test_the_planner_loads_no_ray_and_no_weights(tmp_path):
    code = ("import sys; from cascade.config import compose; from cascade import plan; "
            f"b = plan.make(compose(['+stage=27b', 'run_dir={tmp_path}/run'])); "
            "print(sorted(m for m in ('ray', 'vllm', 'peft') if m in sys.modules), len(b.rows))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.split()[-2:] == ["[]", "33"], r.stdout + r.stderr[-2000:]


def test_the_plan_says_where_the_teachers_read_the_students_answers(tmp_path):
    """eval.reverse_kl: each teacher loaded once by the stage's evaluation, in training's rank 0
    as a run on 2 CPUs does it (tests/test_resume.py checks the run), else in the evaluation's own
    task: when it has CPUs of its own beside training, or a teacher does not fit beside a worker."""
    from cascade.plan import make

    def where(*over: str) -> dict:
        b = make(compose(["+stage=12b", "models=tiny", f"run_dir={tmp_path}/run",
                          "cluster.num_cpus=2", *over]))
        return {r["step"]: (r["work"].get("teacher_loads"), r["work"].get("teachers_read_in"))
                for r in b.rows if r["kind"] == "evaluate"}

    assert where() == {"4b/eval": (1, "training rank 0"), "12b/eval": (2, "training rank 0")}
    task = {"4b/eval": (1, "evaluation task"), "12b/eval": (2, "evaluation task")}
    assert where("train.cpus_per_worker=1") == task  # a CPU left for the evaluation
    assert where("plan.headroom=0.000001") == task  # memory
    assert set(where("eval.reverse_kl=false").values()) == {(None, None)}
    # a built root teacher's stage: its teacher is its base with the kernel in context
    assert where("+root=build")["1b/eval"] == (1, "training rank 0")


@pytest.mark.slow
def test_planned_counts_equal_what_the_tiny_run_reports(tiny_4b_run: Path, tmp_path):
    """Planned before a run (a fresh run directory, same config): prompts, samples and prompt tokens
    of each teacher's set equal what the run then reported; its generated tokens and trained tokens
    stay within the planned budgets; optimizer steps equal. Planned again with the run's
    measurements: its rates are used."""
    from cascade.plan import make

    rows = {r["step"]: r for r in make(compose([*ARGS, f"run_dir={tmp_path}/fresh"])).rows}
    steps = json.loads((tiny_4b_run / "manifest.json").read_text())["steps"]
    assert set(rows) == set(steps), (set(rows), set(steps))
    for name, r in rows.items():
        s, w = steps[name]["summary"], r["work"]
        if r["kind"] == "generate":
            assert (w["prompts"], w["samples"], w["prompt_tokens"]) == (
                s["prompts"],
                s["records"],
                s["prompt_tokens"],
            )
            assert w["prompt_tokens_exact"] and s["completion_tokens"] <= w["max_new_tokens"]
            shards = sorted((tiny_4b_run / steps[name]["path"]).glob("shards/shard-?????.jsonl"))
            assert (
                sum(x["prompt_tokens"] for f in shards for x in read_jsonl(f)) == w["prompt_tokens"]
            )
        elif r["kind"] == "train":
            assert w["steps"] == s["steps"] == len(s["losses"])
            assert s["tokens"] / s["real_token_fraction"] <= w["token_slots"]
    again = make(compose([*ARGS, f"run_dir={tmp_path}/fresh",
                          f"plan.measured_from={tiny_4b_run}"])).rows
    assert {r["rate_source"] for r in again if r["kind"] in ("generate", "train")} == {"measured"}
    given = make(compose([*ARGS, f"run_dir={tmp_path}/fresh", f"plan.measured_from={tiny_4b_run}",
                          # the user's figure beats a measured one
                          "+plan.train_tokens_per_s={4b: 1000}"])).rows
    phase = next(r for r in given if r["step"] == "4b/train/p0_ethics")
    assert phase["rate_source"] == "given" and phase["tokens_per_s"] == 1000


@pytest.mark.slow
# a `ray start`-style head: fixed default ports, one at a time
@pytest.mark.xdist_group("ray_start")
def test_gpus_are_found_on_an_attached_cluster(tmp_path):
    """Without plan.gpus, the GPUs of the cluster at cluster.address are counted (joined as a
    client: nothing started on it); a Ray cluster with 4 declared GPUs stands in for a GPU cluster
    here."""
    code = f"""
import ray
from ray.cluster_utils import Cluster
from cascade.config import compose
from cascade import plan
c = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "num_gpus": 4}})
try:
    cfg = compose(["+stage=4b", "run_dir={tmp_path}/run", f"cluster.address={{c.address}}",
                   "cluster.auth=false"])
    d = plan.device(cfg)
    print("DEVICE", d.count, d.memory_gb, d.source, ray.is_initialized())
finally:
    c.shutdown()
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300,
                       env={k: v for k,
                            v in __import__("os").environ.items() if not k.startswith("RAY_AUTH")})
    line = next((x for x in r.stdout.splitlines() if x.startswith("DEVICE")),
                r.stdout + r.stderr[-3000:])
    assert (line.startswith("DEVICE 4 80") and "found on the cluster at" in line
            and line.endswith("False")), line


@pytest.mark.slow
def test_a_tiny_cpu_runs_rates_never_plan_the_real_models_on_gpus(tiny_4b_run: Path, tmp_path):
    """As a user would: the README's tiny run, then `python -m cascade plan +stage=27b` (the real
    models, H100s assumed) on the same run directory plans exactly what it plans in an empty one,
    from estimates; the tiny run's rates still plan the tiny models on this CPU (the 12b's and 27b's
    scaled from the 4b's, said so). The tokenizer of a model this run made counts prompts only when
    it was made from the planned model."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_4b_run, run, symlinks=True)

    def plan(*args: str) -> dict:
        r = _plan("plan", *args, "--json")
        assert r.returncode == 0, r.stdout[-3000:]
        return json.loads(r.stdout[r.stdout.index("{\n"):])

    after, empty = plan("+stage=27b",
                        f"run_dir={run}"), plan("+stage=27b", f"run_dir={tmp_path}/empty")
    timed = [r for r in after["steps"] if r["kind"] in ("generate", "train")]
    assert timed and {r["rate_source"] for r in timed} == {"estimate"}, {
        r["rate_source"] for r in timed
    }
    assert after["steps"] == empty["steps"] and after["totals"] == empty["totals"]
    tiny = {r["step"]: r
            for r in plan(*FAST, "+stage=27b", "models=tiny", f"run_dir={run}")["steps"]}
    assert (
        tiny["12b/train/p0_ethics"]["rate_source"] == "measured (4b on cpu, scaled by parameters)"
    )
    assert "4b/train/p0_ethics" not in tiny  # done: nothing to plan

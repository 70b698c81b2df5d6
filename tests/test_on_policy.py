"""Phase kind `on_policy` (cascade/phases/on_policy.py): checked before Ray starts, planned with its
rollouts, and trained on the student's own samples scored by its teacher with the kernel in context;
a phase pre-empted (SIGTERM), its training worker killed and its driver killed (-9), one after the
other, resumes each time from the right step (its rollouts read back) to the bytes of a run never
struck; scored on the teacher's own replica (scorer pool), one of whose calls kills it, to the same
bytes again."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from conftest import (FAST, compose, copy_run, kill9, kill_train_workers, run_cli, start_cli,
                      wait_for)

P2 = "4b/train/02-p2_ethics"
# P2 on-policy, the teacher (the tiny 1B) with the kernel in its context; short samples, a
# checkpoint every 4 steps; one training thread in every run, as the scorer pool's run has (its
# replica takes one of two CPUs): a 2-thread and a 1-thread run differed in the last bit of 3 of
# 12 steps on an Intel Xeon (2026-12-07; alike on the AMD machines before)
ARGS = [*FAST, "+stage=4b", "models=tiny", "curriculum.2.kind=on_policy", "curriculum.2.iters=12",
        "train.cpus_per_worker=1", "train.save_every=4",
        "+curriculum.2.options.teacher_context=kernel",
        "+curriculum.2.options.samples_per_prompt=2", "+curriculum.2.options.max_new_tokens=24",
        "eval.max_probes=4", "eval.answer_tokens=8", "eval.reverse_kl=true"]


def test_on_policy_options_are_checked_and_planned_before_ray():
    from cascade.config import ConfigError
    from cascade.plan import make
    from cascade.tiny import build_preset

    base = ["+stage=4b", "models=tiny", "curriculum.2.kind=on_policy"]
    with pytest.raises(ConfigError,
                       match="teacher_temperature: only 1.0 .*vLLM applies no temperature"):
        compose([*base, "+curriculum.2.options.teacher_temperature=0.7"])
    with pytest.raises(ConfigError, match="options.beta must be in \\[0, 1\\]"):
        compose([*base, "+curriculum.2.options.beta=1.5"])
    with pytest.raises(ConfigError,
                       match="teacher_context: 'system' is not one of teacher, kernel, none"):
        compose([*base, "+curriculum.2.options.teacher_context=system"])
    with pytest.raises(ConfigError, match="samples_per_prompt must be a whole number"):
        compose([*base, "+curriculum.2.options.samples_per_prompt=1.5"])
    with pytest.raises(ConfigError, match="on_policy samples from the student's whole weights"):
        compose([*base, "train.strategy=fsdp"])
    cfg = compose([*base, "+curriculum.2.options.samples_per_prompt=2"])
    build_preset(cfg)
    work = {r["step"]: r["work"] for r in make(cfg).rows}["4b/train/p2_ethics"]
    seqs = cfg.curriculum[2].iters * cfg.train.batch_size * cfg.train.grad_accum * 2
    assert work["sequences"] == seqs and work["rollout_tokens"] == seqs * 128, work
    # the kernel's text is part of the phase's key when the teachers see it, and only then
    from cascade.graph import plan
    from cascade.prompts import load_prompts
    from cascade.rundir import RunDir

    def p2_key(ctx: str, kernel: str) -> str:
        c = compose([*base, f"+curriculum.2.options.teacher_context={ctx}",
                     "run_dir=/tmp/never-made"])
        prompts = {k: load_prompts(c.data[k]) for k in dict.fromkeys(p.data for p in c.curriculum)}
        return plan(c, RunDir(c.run_dir), prompts, kernel, weights=False)[-1].phases[2].model.key

    assert p2_key("kernel", "one") != p2_key("kernel", "two")
    assert p2_key("teacher", "one") == p2_key("teacher", "two")


def _p2_fresh(tiny_4b_run, dst):
    """A copy of the shared tiny run without its P2 and evaluation: a run of ARGS goes straight to
    P2."""
    copy_run(tiny_4b_run, dst)
    for d in ("progress", "4b/train/_ckpt", "4b/train/02-p2_ethics", "4b/eval", "4b/gate"):
        shutil.rmtree(dst / d, ignore_errors=True)
    return dst


@pytest.mark.slow
@pytest.mark.faults
def test_on_policy_phase_preempted_struck_and_killed_resumes_to_the_same_bytes(tiny_4b_run,
                                                                                tmp_path):
    ref, run = _p2_fresh(tiny_4b_run, tmp_path / "ref"), _p2_fresh(tiny_4b_run, tmp_path / "run")
    r = run_cli(*ARGS, f"run_dir={ref}")
    assert r.returncode == 0, r.stdout[-4000:]
    s = json.loads((ref / "4b/train/02-p2_ethics/step.json").read_text())["summary"]
    assert s["kind"] == "on_policy" and s["options"]["teacher_context"] == "kernel"
    assert len(s["divergence_losses"]) == s["steps"] == 12 and all(
        d > 0 for d in s["divergence_losses"]
    )
    # 4 prompts x 2 samples x <= 24 tokens
    assert all(0 < n <= 4 * 2 * 24 for n in s["sample_tokens_losses"])
    # the evaluation's signal: the reverse KL to the teacher on the student's own answers, before
    # and after
    kl = json.loads((ref / "4b/eval/metrics.json").read_text())["reverse_kl"]
    assert all(kl[how]["before"] > 0 and kl[how]["after"] >= 0 for how in ("greedy", "sampled")), kl
    st = run_cli("status", *ARGS, f"run_dir={ref}")
    said = "4b: reverse KL to its teachers on its own sampled answers"
    assert said in st.stdout, st.stdout[-2000:]
    # the reference's own rollouts: those from the oldest checkpoint kept (of steps 4 and 8, 2
    # kept) on, those before it removed as the checkpoint at step 8 was saved
    ckpt = next((ref / "4b/train/_ckpt").glob("02-p2_ethics-*"))
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-000004", "step-000008"]
    assert sorted(p.name for p in (ckpt / "rollouts").iterdir()) == [f"{i:06d}-000-0of1.safetensors"
                                                                      for i in range(4, 12)]

    # three faults in one run directory, each resumed from the right step (the rollouts of the
    # steps already taken read back, not sampled again), and the bytes in the end the reference's:
    # 1. SIGTERM while P2 samples and trains: a checkpoint at the step it was in, exit 143
    proc = start_cli(*ARGS, "train.save_every=1000", f"run_dir={run}", log=tmp_path / "a.log")
    wait_for(lambda: (run / "progress/4b/train/p2_ethics.json").exists(), 600, proc, "P2 under way")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, (tmp_path / "a.log").read_text()[-4000:]
    saved = _ckpts(run)
    assert saved and not (run / P2 / "step.json").exists(), "the signal must land mid-phase"
    at = _step(saved[-1])
    assert json.loads(saved[-1].read_text())["reason"] == "sigterm" and at < 12

    # 2. the same command; after a checkpoint past that step, its Ray Train worker killed: Ray Train
    #    restarts the group, which resumes from that checkpoint
    proc = start_cli(*ARGS, "train.save_every=1", f"run_dir={run}", log=tmp_path / "b.log")
    wait_for(lambda: _resumed(run) is not None and _resumed(run)["step"] == at + 1, 600, proc,
             "the resume")
    wait_for(lambda: _step(_ckpts(run)[-1]) > at, 600, proc, "a checkpoint after the resume")
    struck = _step(_ckpts(run)[-1])
    t_kill = kill_train_workers(proc)
    wait_for(lambda: _resumed(run)["time"] > t_kill or (run / P2 / "step.json").exists(), 600,
             proc, "the restarted group's resume")

    # 3. kill -9 of the driver (if the phase is still going), and the same command to the end
    if proc.poll() is None and not (run / P2 / "step.json").exists():
        kill9(proc)
    else:
        proc.wait(timeout=300)
    r = run_cli(*ARGS, f"run_dir={run}")
    assert r.returncode == 0, r.stdout[-4000:]
    again = json.loads((run / P2 / "step.json").read_text())
    assert again["summary"]["resumed_from_step"] >= struck
    assert again["files"] == json.loads((ref / P2 / "step.json").read_text())["files"]
    assert again["summary"]["divergence_losses"] == s["divergence_losses"]

    # 4. the teachers' scores on their own replica (scorer pool) instead of in the worker, the
    #    replica dying at its 3rd call (Ray restarts it, the worker asks again): the same bytes
    pool = _p2_fresh(tiny_4b_run, tmp_path / "pool")
    r = run_cli(*ARGS, "+curriculum.2.options.scorer=pool", f"run_dir={pool}",
                env={"CASCADE_FAILPOINT": f"score:3@{tmp_path / 'struck'}"})
    assert r.returncode == 0, r.stdout[-4000:]
    assert (tmp_path / "struck").exists() and "score/4b/1b/0: " in r.stdout, r.stdout[-4000:]
    got = json.loads((pool / P2 / "step.json").read_text())
    assert got["files"] == json.loads((ref / P2 / "step.json").read_text())["files"]
    assert got["summary"]["divergence_losses"] == s["divergence_losses"]
    # the teacher loaded by its replica (restarted: the new one's load), not by the worker
    assert [x["process"] for x in got["summary"]["loads"] if "1b" in x["model"]] == ["generate"]


def _ckpts(run) -> list:
    return sorted(run.glob("4b/train/_ckpt/02-*/step-*/meta.json"))


def _step(meta) -> int:
    return json.loads(meta.read_text())["step"]


def _resumed(run) -> dict | None:
    """The first optimizer step taken after the latest resume of P2, and when (rank 0 writes it)."""
    f = next(run.glob("4b/train/_ckpt/02-*/resumed.json"), None)
    return json.loads(f.read_text()) if f else None


def test_a_teacher_with_another_tokenizer_is_refused_before_ray(tmp_path):
    """Kinds that compare distributions token by token need the teachers' tokenizer to be the
    student's: a student whose tokenizer has one token more is refused when the run is planned (no
    Ray, no model loaded)."""
    from transformers import AutoTokenizer

    from cascade.config import ConfigError
    from cascade.graph import build_graph
    from cascade.tiny import build_preset

    cfg = compose(["+stage=4b", "models=tiny", f"run_dir={tmp_path / 'run'}"])
    base = build_preset(cfg) / "4b"
    other = tmp_path / "4b-other-tokenizer"
    shutil.copytree(base, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<not-in-the-teachers-vocabulary>"])
    tok.save_pretrained(other)
    for kind in ("sft", "on_policy"):
        cfg = compose(["+stage=4b", "models=tiny", f"run_dir={tmp_path / 'run'}",
                       f"curriculum.2.kind={kind}"])
        cfg.stages["4b"].model = str(other)
        if kind == "sft":  # text: any tokenizer
            build_graph(cfg)
            continue
        with pytest.raises(ConfigError, match="p2_ethics \\(kind on_policy\\) compares .* "
                                              "teacher 1b .* different tokenizers"):
            build_graph(cfg)
    # a preset not built yet (a fresh cache; the driver builds it after this check) is passed over
    cfg = compose(["+stage=4b", "models=gemma3-270m", f"run_dir={tmp_path / 'run'}",
                   f"models.cache_dir={tmp_path / 'empty-cache'}", "curriculum.2.kind=on_policy"])
    assert build_graph(cfg).stages[-1].phases[-1].kind == "on_policy"


def test_a_micro_batchs_samples_are_each_prompts_own_answers(tiny_preset):
    """The hf engine samples every row of a micro-batch in one left-padded generate()
    (on_policy_rollouts._sample): near temperature 0 each row is its own prompt's greedy answer
    decoded alone, cut at its stop token or at its own prompt's limit, never a padded row's id."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cascade.chat import padded_ids, prompt_ids, stop_token_ids
    from cascade.phases.on_policy import Options
    from cascade.phases.on_policy_rollouts import _sample

    path = tiny_preset / "4b"  # its embedding has padded rows past the tokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    questions = ["Is it right to lie to protect a friend?", "Hi",
                 "What should I do when someone I love asks me to keep a secret that could hurt?"]
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) == 3  # the batch is padded
    limits, stops, padded = [12, 5, 40], stop_token_ids(tok), padded_ids(model, tok) or []
    torch.manual_seed(0)
    with torch.no_grad():
        got = _sample(Options(samples_per_prompt=2, temperature=1e-4),
                      SimpleNamespace(tok=tok, device=torch.device("cpu")), model, prompts, limits)
    assert len(got) == 6
    for i, (p, limit) in enumerate(zip(prompts, limits)):
        x = torch.tensor([p])
        with torch.no_grad():
            ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=limit, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id, suppress_tokens=padded or None)
        ref = ref[0, len(p):].tolist()
        ref = ref[: next((j + 1 for j, t in enumerate(ref) if t in stops), len(ref))]
        assert got[2 * i] == got[2 * i + 1] == ref, (i, got[2 * i], ref)
        assert 0 < len(ref) <= limit and not set(ref) & set(padded)

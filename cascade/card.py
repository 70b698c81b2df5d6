"""A release's model card (README.md), as the seed's: front matter the hub reads, then the quick
start, lineage, curriculum, evaluation, harness results, formats and licence, written from the
run's own records (stages/release.py gathers them).
"""

from __future__ import annotations

import os
from typing import Any

from cascade.config import Config
from cascade.graph import StageGraph


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


QUICK_START = """## Quick start

No system prompt needed.

llama.cpp (any platform):

```bash
llama-server -m {pick} --port 8080
# or, from the run directory's project:
python -m cascade serve +stage={stage} serve.engine=llamacpp serve.port=8080
```

vLLM (the `hf/` directory):

```bash
vllm serve ./hf --port 8080
# or: python -m cascade serve +stage={stage} serve.engine=vllm serve.port=8080
```

Any OpenAI client:

```bash
curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{{"model":"{name}","messages":[{{"role":"user","content":"What is kindness?"}}]}}'
```

HuggingFace Transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("./hf")
tokenizer = AutoTokenizer.from_pretrained("./hf")
messages = [{{"role": "user", "content": "What does sovereignty mean to you?"}}]
inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", add_generation_prompt=True,
                                       return_dict=True)
outputs = model.generate(**inputs, max_new_tokens=512)
print(tokenizer.decode(outputs[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""


def model_card(cfg: Config, sp: StageGraph, name: str, formats: list[dict], harness: dict,
               prov: dict) -> str:
    """The card, as the seed's: front matter the hub reads, then lineage, curriculum, metrics,
    formats, quick start."""
    m = prov["metrics"]
    gguf = [f for f in formats if f["format"].startswith("GGUF") and f["file"]]  # shipped
    pick = next((f for f in gguf if "Q4_K_M" in f["file"] and f["verdict"] == "ship"),
                gguf[0])["file"]
    datasets = sorted({ph.data for ph in sp.phases})
    base = cfg.stages[sp.name].model if os.path.isabs(sp.base_model) else sp.base_model
    front = ["---", f"license: {cfg.release.license}", f"base_model: {base}",
             "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [gemma3, distillation, lora, cascade, gguf]",
             f"datasets: [{', '.join(datasets)}]", "---", ""]
    lines = front + [
        f"# {name}", "",
        f"Stage `{sp.name}` of a teacher-student distillation cascade built by cascade: the base "
        f"model `{cfg.stages[sp.name].model}` trained through the ethics-composure-ethics "
        f"curriculum on the answers of {', '.join(f'`{t.name}`' for t in sp.teachers)}; every "
        "phase a LoRA fused into the weights.", "",
        *QUICK_START.format(pick=pick, stage=sp.name, name=name).split("\n"),
        "## Lineage", "", "| Stage | Model | Key | Taught by | Gate |", "|---|---|---|---|---|",
    ]
    for s in prov["lineage"]:
        taught = ", ".join(f"{t[0]} (weight {t[1]:g})" for t in s["teachers"]) or "root teacher"
        lines.append(f"| {s['stage']} | `{s['model']}` | `{s['key']}` | {taught} | {s['gate']} |")
    lines += (_curriculum_and_evaluation(sp, m) + _gate(prov.get("verdict"))
              + _harness_table(harness))
    lines += ["", "## Available formats", "",
              "Each GGUF was made by llama.cpp's converter and quantizer and compared with "
              f"transformers on {prov['probes']} held-out prompts with their teachers' answers "
              "(next-token argmax agreement, mean KL(transformers || GGUF) per position).", "",
              "A type other than F32/F16 ships when its agreement reaches "
              f"{cfg.release.min_quant_agreement:g} (release.min_quant_agreement).", "",
              "| Format | File | Size | Engines | Agreement | KL | Verdict |",
              "|---|---|---|---|---|---|---|"]
    for f in formats:
        where = f"`{f['file']}`" if f["file"] else "-"
        lines.append(f"| {f['format']} | {where} | {_human(f['bytes'])} | {f['engines']} | "
                     f"{_f(f.get('agreement'))} | {_f(f.get('kl'), '.2e')} | "
                     f"{f.get('verdict', 'ship')} |")
    lines += ["", "## Licence", "",
              f"Released under {cfg.release.license.upper()}. The base model is subject to its own "
              "licence terms (Gemma 3: Google's Gemma terms).", ""]
    return "\n".join(lines)


def _curriculum_and_evaluation(sp: StageGraph, m: dict) -> list[str]:
    """The card's curriculum as run (per phase: data, records, iters, lr, loss) and its evaluation
    table."""
    agree, text = m["agreement"], m["text_agreement"]
    lines = ["", "## Curriculum, as run", "",
             "| Phase | Data | Records | Iters | LR | Loss first -> last |",
             "|---|---|---|---|---|---|"]
    for ph in sp.phases:
        t, c = m["phases"][ph.name], m["curation"][ph.name]
        lines.append(f"| {ph.name} | {ph.data} | {c.get('kept', '?')} | {ph.iters} | {ph.lr:g} | "
                     f"{t['loss_first']:.3f} -> {t['loss_last']:.3f} |")
    return (
        lines
        + [
            "",
            "## Evaluation",
            "",
            "| Measure | Before | After |",
            "|---|---|---|",
            f"| {agree['metric']} ({agree['records']} held-out) | {_f(agree['before'])} | "
            f"{_f(agree['after'])} |",
            f"| {text['metric']} | {_f(text['before'])} | {_f(text['after'])} |",
            "| share of greedy answers that end by themselves | "
            f"{_f(m['self_ended']['before'])} | {_f(m['self_ended']['after'])} |",
        ]
        + [f"| {c['metric']} | {_f(c['before'])} | {_f(c['after'])} |"
           for c in [m.get("conditioning")] if c]
        + [
            f"| reverse KL(student \\|\\| teacher) per token, its own {how} answers (nats; "
            f"lower = closer) | {_f(kl[how]['before'])} | {_f(kl[how]['after'])} |"
            for kl in [m.get("reverse_kl") or {}]
            for how in ("greedy", "sampled")
            if how in kl
        ]
    )


def _gate(v: dict | None) -> list[str]:
    """The stage's promotion gate: its verdict, each criterion with its value and threshold."""
    if not v:
        return []
    head = f"**{v['verdict']}**" + "".join(f"; {r}" for r in v["reasons"])
    if v["verdict"] != "PROMOTE":
        head += (" - not promoted, and released anyway: this model is not fit to teach"
                 + (" (gate.enforce=false let it teach)" if not v["enforce"] else ""))
    return ["", "## Promotion gate", "", head, "", "| Criterion | Value | Threshold | Passed |",
            "|---|---|---|---|"] + [
        f"| {c['name']} | {_f(c['value'])} | {c['op']} {c['threshold']:g} | "
        f"{'-' if c['passed'] is None else 'yes' if c['passed'] else 'no'} |"
        for c in v["criteria"]]


def _harness_table(harness: dict) -> list[str]:
    """The lm-evaluation-harness results, one column per model scored (none: no lines)."""
    if not harness:
        return []
    who = list(harness)
    first = next(iter(harness.values()))
    lines = ["",
             f"EleutherAI's lm-evaluation-harness {first.get('lm_eval', '')} (greedy, chat "
             "template; `cascade_*`: offline tasks shipped with cascade, data/harness/):", "",
             f"| Task | Metric | {' | '.join(who)} |", "|---|---|" + "---|" * len(who)]
    for task, r in first.get("results", {}).items():
        for k in r:
            vals = [_f(harness[w].get("results", {}).get(task, {}).get(k)) for w in who]
            lines.append(f"| {task} ({first['samples'].get(task, '?')} prompts) | {k} | "
                         f"{' | '.join(vals)} |")
    return lines


def _f(x: Any, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)

"""The arithmetic of a step's cost (the planner's, cascade/plan.py; each step's `cost` in stages/):
memory of a generation replica and of a training worker, the placements that would fit, prompt
tokens as the backends count them, a replica's decode rate. No Ray is started and no weights are
loaded.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from cascade import generation
from cascade.arch import Arch
from cascade.config import Config, TrainConfig
from cascade.devices import GB, Device
from cascade.graph import GenJob, RunGraph

# cascade.modeling.LOSS_CHUNK: positions whose vocabulary logits exist at once
LOSS_CHUNK_ROWS = 256
# per decode step beyond the model: scheduling, sampling, detokenizing (vLLM, batched)
DECODE_STEP_S = 0.005
# per step
OVERHEAD_S = {"gpu": {"generate": 120.0, "train": 60.0}, "cpu": {"generate": 5.0, "train": 10.0}}


def nbytes(dtype: str, dev: Device) -> int:
    return 4 if dtype == "float32" or (dtype == "auto" and dev.cpu) else 2


def replica_memory(a: Arch, cfg: Config, dev: Device, nbytes: int, prompt_len: float,
                   opts: Any = None) -> tuple[dict, int]:
    """GB per generation replica by part, its limit, and the sequences it decodes at once (the
    backend's memory model, cascade/generation/; `opts`: its settings, else the config's)."""
    b = cfg.backend
    mem, conc = generation.load(b.name).memory(opts or b.options, a, cfg.generation, nbytes,
                                               prompt_len, dev.memory_gb * GB, cfg.plan.headroom)
    mem = {k: v / GB for k, v in mem.items()}
    mem["total"] = mem["weights"] + mem["runtime"] + mem["kv_cache"]
    return mem, conc


def train_memory(a: Arch, t: TrainConfig, dev: Device, limit: float) -> dict:
    """GB per training worker by part, and its limit."""
    nbytes = 2 if t.bf16 and not dev.cpu else 4
    shard = t.num_workers if t.strategy == "fsdp" else 1
    tokens = t.batch_size // t.num_workers * t.max_seq_len
    mem = {"weights": a.params * nbytes / shard / GB,
           "lora_states": a.lora_params(t.lora.r, t.lora.target_modules) * 16 / shard / GB,
           "activations": a.activation_bytes(tokens, nbytes, t.gradient_checkpointing) / GB,
           "logits": 3 * LOSS_CHUNK_ROWS * a.vocab * 4 / GB, "runtime": 0.0 if dev.cpu else 1.0}
    mem["total"] = sum(mem.values())
    mem["limit"] = limit
    return mem


def train_fixes(a: Arch, t: TrainConfig, dev: Device, limit: float) -> list[str]:
    """The overrides (fewest changes first) under which a training worker fits."""
    # the most workers the batch divides among
    n = max(w for w in range(1, dev.count + 1) if t.batch_size % w == 0)
    gc, fsdp = {"gradient_checkpointing": True}, {"strategy": "fsdp", "num_workers": n}
    tries = ([gc] if not t.gradient_checkpointing else []) + ([fsdp] if n > 1 else [])
    tries += [{**gc, **fsdp}] if n > 1 and not t.gradient_checkpointing else []
    fits = []
    for change in tries:
        if train_memory(a, replace(t, **change), dev, limit)["total"] <= limit:
            fits.append(" ".join(f"train.{k}={str(v).lower()}" for k, v in change.items()))
    return fits


def prompt_tokens(p: RunGraph, job: GenJob, cache: dict) -> tuple[int, bool]:
    """The prompt set's tokens as the backends count them (chat template, no extra specials), with
    the teacher's tokenizer when it is on this machine; else estimated at 4 characters a token
    (False)."""
    from cascade.chat import prompt_messages, render_prompt

    ps = p.prompts[job.data]
    tok = _tokenizer(p, job.teacher.name, job.teacher.model, cache)
    if tok is None:
        return int(sum(len(m["content"]) for pr in ps for m in pr.messages) / 4), False
    texts = [render_prompt(tok, prompt_messages(pr.messages, job.teacher.system)) for pr in ps]
    return sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]), True


def _tokenizer(p: RunGraph, teacher: str, model: str, cache: dict) -> Any:
    """The teacher's tokenizer from its directory, or (a stage trained in this run: not made yet)
    its stage's base model's, which training does not change; from the HF cache for a hub id; None
    when nowhere on this machine."""
    base = next((sp.base_model for sp in p.stages if sp.name == teacher.removesuffix("-base")),
                model)
    made = next((sp.phases[-1].model for sp in p.stages if sp.phases and sp.final_model == model),
                None)
    if made is not None and p.rd.committed(made) is None:
        # not made yet, or made from another model: not its own
        model = base
    for src in dict.fromkeys((model, base)):
        if src not in cache:
            from transformers import AutoTokenizer

            try:
                cache[src] = AutoTokenizer.from_pretrained(
                    src, local_files_only=True, trust_remote_code=p.cfg.models.trust_remote_code
                )
            except (OSError, ValueError):
                cache[src] = None
        if cache[src] is not None:
            return cache[src]
    return None


def decode_rate(a: Arch, dev: Device, nbytes: int, tp: int, conc: int, ctx: float,
                plan: Any) -> float:
    """Tokens/s of one replica: a decode step reads the weights and every running sequence's KV
    cache (memory bound), or does 2 x params FLOPs per sequence (compute bound), whichever is
    slower."""
    read = (a.params * nbytes + conc * a.kv_bytes(ctx, nbytes)) / (
        dev.bandwidth_gbs * GB * plan.decode_efficiency * tp
    )
    compute = 2 * a.text_params * conc / (dev.tflops * 1e12 * tp * plan.train_mfu)
    return conc / (max(read, compute) + DECODE_STEP_S)

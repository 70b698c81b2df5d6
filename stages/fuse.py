"""Step 3b of a stage: merge a phase's LoRA into the weights, save, and prove the saved model is base + adapter.

    (run by stages/train.py on rank 0 at the end of every phase)

On a fixed batch of the phase's held-out prompts (its training prompts when it has none), the logits of the
model reloaded from the saved directory must equal those of the PEFT model (base + adapter, adapter active)
within a tolerance (1e-4 in float32, 5e-2 in bfloat16/float16), else the step fails and nothing is committed.
Reloading from disk is the point: it checks what a user and vLLM will load, not the object in memory (Gemma3
merges have broken elsewhere on tied embeddings, norms and dtype).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cascade.chat import collate


class FusionError(RuntimeError):
    pass


def tolerance(dtype: Any) -> float:
    import torch

    return 1e-4 if dtype == torch.float32 else 5e-2


def logits(model: Any, batch: tuple) -> Any:
    import torch

    ids, _, mask = batch
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def check(reference: Any, fused_dir: Path, batch: tuple, tol: float) -> float:
    """Max |logit difference| between `reference` logits and the model saved at fused_dir; raises past tol."""
    import torch
    from transformers import AutoModelForCausalLM

    fused = AutoModelForCausalLM.from_pretrained(fused_dir, dtype=reference.dtype, use_safetensors=True)
    fused.to(reference.device).eval()
    got = logits(fused, batch)
    mask = batch[2].bool()
    diff = float((got - reference).abs()[mask].max())
    if not torch.isfinite(torch.tensor(diff)) or diff > tol:
        raise FusionError(f"fused model at {fused_dir} differs from base + adapter: max |Δlogit| {diff:.3g} > {tol}")
    return diff


def fuse(peft_model: Any, tokenizer: Any, examples: list[dict], out_dir: Path) -> float:
    """Merge, save (safetensors, tokenizer, chat template) to out_dir, verify; returns the max logit difference."""
    peft_model.eval()
    device = next(peft_model.parameters()).device
    batch = collate(examples[:8], tokenizer.pad_token_id, device)
    reference = logits(peft_model, batch)
    dtype = next(peft_model.parameters()).dtype
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return check(reference.to(dtype=reference.dtype), out_dir, batch, tolerance(dtype))

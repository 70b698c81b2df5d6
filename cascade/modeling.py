"""The model code every step shares: loading (safetensors only), the LoRA wrap, weights identity, and fusion.

Fusion merges a phase's LoRA into the weights, saves, and proves the saved model is base + adapter: on a fixed
batch of the phase's held-out prompts (its training prompts when it has none), the logits of the model reloaded
from the saved directory must equal those of the PEFT model (base + adapter, adapter active) within a tolerance
(1e-4 in float32, 5e-2 in bfloat16/float16), else the phase fails and nothing is committed. Reloading from disk is
the point: it checks what a user and vLLM will load, not the object in memory (Gemma3 merges have broken
elsewhere on tied embeddings, norms and dtype). stages/train.py runs it on rank 0 at the end of every phase.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cascade.chat import collate
from cascade.config import LoraSpec


def load_model(path: str | Path, revision: str | None = None, dtype: Any = None,
               trust_remote_code: bool = False) -> Any:
    """A causal LM from a local directory or hub id, from safetensors only."""
    from transformers import AutoModelForCausalLM

    kw = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                                use_safetensors=True, **kw)


def with_lora(model: Any, spec: LoraSpec) -> Any:
    """The model wrapped in a fresh PEFT LoRA (all linear layers by default)."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if spec.target_modules == ["all-linear"] else spec.target_modules
    return get_peft_model(model, LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                            task_type="CAUSAL_LM", target_modules=targets))


def weights_digest(model: str, revision: str | None = None) -> str:
    """Content identity of a model's weights: sha256 over its safetensors files.

    For a hub snapshot the files are links to blobs named by their LFS sha256, so the names are hashed (free);
    for a local directory the bytes are (once per replica start).
    """
    import hashlib
    from pathlib import Path

    p = Path(model).expanduser()
    if not p.is_dir():
        from huggingface_hub import snapshot_download

        p = Path(snapshot_download(model, revision=revision, local_files_only=True))
    h = hashlib.sha256()
    for f in sorted(p.glob("*.safetensors")):
        h.update(f.name.encode())
        if f.is_symlink():
            h.update(Path(os.readlink(f)).name.encode())
            continue
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


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

    fused = load_model(fused_dir, dtype=reference.dtype)
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

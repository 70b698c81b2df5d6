"""The model code every step shares: loading (safetensors only), the LoRA wrap, weights identity,
and fusion.

Fusion merges a phase's LoRA into the weights, saves, and proves the saved model is base + adapter:
on a fixed batch of the phase's held-out prompts (its training prompts when it has none), the logits
of the model reloaded from the saved directory must equal those of the PEFT model (base + adapter,
adapter active) up to rounding, else the phase fails and nothing is committed. Reloading from disk
is the point: it checks what a user and vLLM will load, not the object in memory (Gemma3 merges have
broken elsewhere on tied embeddings, norms and dtype). stages/train.py runs it on rank 0 at the end
of every phase; a failed check is deterministic and is not retried.

The tolerance is relative to the logits' scale: max |Δlogit| <= rtol x max |logit| over the batch's
real tokens, rtol 1e-4 in float32 (a merge rounds each weight once, ~6e-8 relative; a real Gemma 3's
logits reach tens, and the merge moves them by ~1e-4 absolute: 5e-6 relative) and 4e-2 in
bfloat16/float16 (~5 units of bf16's rounding). Within that bound no next-token choice whose margin
exceeds 2 x max |Δlogit| can change; the check also reports the top-1 agreement and the mean KL(base
+ adapter || fused) per token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cascade.config_train import LoraSpec
from cascade.failpoints import failpoint


def load_model(path: str | Path, revision: str | None = None, dtype: Any = None,
               trust_remote_code: bool = False) -> Any:
    """A causal LM from a local directory or hub id, from safetensors only."""
    from transformers import AutoModelForCausalLM

    from cascade import loads

    kw = {} if dtype is None else {"dtype": dtype}
    with loads.timed(path):  # recorded: cascade/loads.py
        return AutoModelForCausalLM.from_pretrained(path, revision=revision,
                                                    trust_remote_code=trust_remote_code,
                                                    use_safetensors=True, **kw)


def with_lora(model: Any, spec: LoraSpec) -> Any:
    """The model wrapped in a fresh PEFT LoRA (all linear layers by default)."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if spec.target_modules == ["all-linear"] else spec.target_modules
    return get_peft_model(model,
                          LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                            task_type="CAUSAL_LM", target_modules=targets))


def weights_digest(model: str, revision: str | None = None) -> str:
    """Content identity of a model's weights: sha256 over its safetensors files.

    For a hub snapshot the files are links to blobs named by their LFS sha256, so the names are
    hashed (free); for a local directory the bytes are (once per replica start).
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
    """The fusion check's relative bound (see the module's text)."""
    import torch

    return 1e-4 if dtype == torch.float32 else 4e-2


# the fusion check's probe: at most this many float32 logits held per model (1 GiB), one example per
# forward
PROBE_LOGITS = 1 << 28


def probe(examples: list[dict], vocab_size: int) -> list[dict]:
    """The first examples (up to 8) whose logits fit PROBE_LOGITS; at least one."""
    out, n = [], 0
    for e in examples[:8]:
        n += len(e["input_ids"]) * vocab_size
        if out and n > PROBE_LOGITS:
            break
        out.append(e)
    return out


def logits(model: Any, examples: list[dict]) -> list[Any]:
    """Float32 logits [tokens, vocab] of each example, one forward each (no padding to mask)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=torch.tensor([e["input_ids"]], device=device)).logits[0].float()
                for e in examples]


def check(reference: list[Any], fused_dir: Path, examples: list[dict], rtol: float,
          dtype: Any = None, keep: dict | None = None) -> dict:
    """The model saved at fused_dir against `reference` (base + adapter's logits of `examples`):
    {max_abs_logit_diff, rel_logit_diff, top1_agreement, mean_kl}; raises FusionError past rtol.
    keep: given a dict, the model read back and verified is left in keep["model"] (the next
    phase starts from it instead of reading the same file again)."""
    import torch
    import torch.nn.functional as F

    fused = load_model(fused_dir, dtype=dtype)
    fused.to(reference[0].device).eval()
    diff = scale = agree = kl = 0.0
    n = 0
    for ref, got in zip(reference, logits(fused, examples)):
        diff, scale = max(diff, float((got - ref).abs().max())), max(scale, float(ref.abs().max()))
        agree += float((got.argmax(-1) == ref.argmax(-1)).sum())
        kl += float(F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                             reduction="sum"))
        n += ref.shape[0]
    rel = diff / max(scale, 1e-6)
    out = {"max_abs_logit_diff": diff, "rel_logit_diff": rel, "top1_agreement": agree / n,
           "mean_kl": kl / n}
    if not torch.isfinite(torch.tensor(diff)) or rel > rtol:
        raise FusionError(f"fused model at {fused_dir} differs from base + adapter: max |Δlogit| "
                          f"{diff:.3g} is {rel:.3g} of the logits' scale > {rtol:g} (top-1 "
                          f"agreement {out['top1_agreement']:.3f})")
    if keep is not None:
        keep["model"] = fused
    return out


def fuse(peft_model: Any, tokenizer: Any, examples: list[dict], out_dir: Path,
         keep: dict | None = None) -> dict:
    """Merge, save (safetensors, tokenizer, chat template) to out_dir, verify; returns the check's
    figures (keep: see check)."""
    peft_model.eval()
    dtype = next(peft_model.parameters()).dtype
    examples = probe(examples, peft_model.config.vocab_size)
    reference = logits(peft_model, examples)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    if failpoint("fuse", str(out_dir)) == "corrupt":  # fault tests: a merge that went wrong
        _damage(out_dir)
    return check(reference, out_dir, examples, tolerance(dtype), dtype, keep)


def _damage(out_dir: Path) -> None:
    """One MLP weight perturbed (seeded), as a merge that added a delta twice would: the check must
    refuse it."""
    import torch
    from safetensors.torch import load_file, save_file

    f = sorted(out_dir.glob("*.safetensors"))[0]
    w = load_file(f)
    key = next(k for k in sorted(w) if "mlp.down_proj.weight" in k)
    noise = torch.randn(w[key].shape, generator=torch.Generator().manual_seed(0)) * float(
        w[key].float().std()
    )
    w[key] = (w[key].float() + noise).to(w[key].dtype)
    save_file(w, f, metadata={"format": "pt"})


# -- the loss on response tokens, without a full-vocabulary logits tensor
# ----------------------------------------- A Gemma 3 vocabulary has 262k entries: the logits of one
# 8 x 256 batch are 2 GB in float32, their gradient as much again. Training and evaluation instead
# take the decoder's final hidden states (caught by a hook on its last norm; the model is asked for
# one position's logits) and apply the output layer to LOSS_CHUNK response positions at a time, each
# chunk recomputed in the backward pass (activation checkpointing): at most LOSS_CHUNK x vocab
# logits exist at once. The sums are those of the usual per-token cross-entropy; only the order of
# the float additions differs.
LOSS_CHUNK = 256


def _unwrapped(model: Any) -> Any:
    """The transformers model inside DDP (.module) and PEFT (get_base_model) wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _full(w: Any) -> Any:
    """A weight whole, also when FSDP2 holds it sharded (a collective: every rank calls this alike).
    """
    return w.full_tensor() if hasattr(w, "full_tensor") else w


def logits_of(h: Any, w: Any, cap: float | None) -> Any:
    """float32 logits of hidden states `h` under the output layer `w`, with Gemma's final soft-cap
    when it has one."""
    import torch

    z = (h @ w.t()).float()
    return torch.tanh(z / cap) * cap if cap else z


def _chunk_sums(h: Any, y: Any, w: Any, cap: float | None, kd_ids: Any = None,
                kd_q: Any = None) -> Any:
    """[sum of -log p(y), sum over k of -q_k log p(id_k)] over the chunk's positions."""
    import torch

    z = logits_of(h, w, cap)
    lse = torch.logsumexp(z, dim=-1)
    ce = (lse - z.gather(-1, y.unsqueeze(-1)).squeeze(-1)).sum()
    kd = (-(kd_q * (z.gather(-1, kd_ids) - lse.unsqueeze(-1))).sum() if kd_ids is not None
          else ce * 0.0)
    return torch.stack([ce, kd])


def response_hidden(model: Any, batch: dict) -> tuple[Any, Any, Any, Any, Any]:
    """(h, keep, w, cap, zero): the decoder's final hidden states at the positions that predict a
    response token ([n, d]; position t's label is predicted from t - 1), the mask that chose them
    ([batch, width - 1]), the output layer's weight, Gemma's final logit soft-cap (None when the
    model has none) and a zero in the graph (sums start from it, so they have a gradient with no
    response token too). batch: input_ids, labels and optionally attention_mask, position_ids."""
    from cascade.chat import IGNORE_INDEX

    inner = _unwrapped(model)
    caught: list = []
    hook = inner.get_decoder().norm.register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")
                  if batch.get(k) is not None}
        model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    hidden, labels = caught[-1], batch["labels"]
    keep = labels[:, 1:] != IGNORE_INDEX
    w, cap = (_full(inner.get_output_embeddings().weight),
              inner.config.get_text_config().final_logit_softcapping)
    return hidden[:, :-1][keep], keep, w, cap, hidden.sum() * 0.0


def response_nll(model: Any, batch: dict, chunk: int = LOSS_CHUNK) -> tuple[Any, Any, int]:
    """(sum of the cross-entropy over response tokens, the same for the teachers' top-k
    distributions when the batch carries kd_ids/kd_lp (else 0), the number of response tokens).
    batch: input_ids, labels and optionally attention_mask, position_ids, kd_ids, kd_lp. Position
    t's label is predicted from t - 1."""
    import torch
    from torch.utils.checkpoint import checkpoint

    h, keep, w, cap, zero = response_hidden(model, batch)
    y = batch["labels"][:, 1:][keep]
    kd = "kd_ids" in batch and batch["kd_ids"] is not None
    ids = batch["kd_ids"][:, 1:][keep] if kd else None
    q = torch.softmax(batch["kd_lp"][:, 1:][keep].float(), dim=-1) if kd else None
    total = torch.stack([zero, zero]).float()  # in the graph, with no response tokens too
    for i in range(0, h.shape[0], chunk):
        args = (h[i : i + chunk], y[i : i + chunk], w, cap, ids[i : i + chunk] if kd else None,
                q[i : i + chunk] if kd else None)
        total = total + (checkpoint(_chunk_sums, *args, use_reentrant=False)
                         if torch.is_grad_enabled()
                         else _chunk_sums(*args))
    return total[0], total[1], int(y.shape[0])


def response_nll_rows(model: Any, batch: dict, chunk: int = LOSS_CHUNK) -> tuple[list, list]:
    """Without gradients: ([the cross-entropy summed over each row's response tokens], [each row's
    number of response tokens]) - response_nll per example, in one forward pass."""
    import torch

    with torch.no_grad():
        h, keep, w, cap, _ = response_hidden(model, batch)
        y = batch["labels"][:, 1:][keep]
        parts = [h.new_zeros(0).float()]
        for i in range(0, h.shape[0], chunk):  # the output layer in chunks, as response_nll
            z = logits_of(h[i : i + chunk], w, cap)
            parts.append(torch.logsumexp(z, dim=-1)
                         - z.gather(-1, y[i : i + chunk].unsqueeze(-1)).squeeze(-1))
        ce = torch.cat(parts)
        rows = keep.nonzero()[:, 0]
        sums = torch.zeros(keep.shape[0], dtype=torch.float64, device=ce.device)
        sums.index_add_(0, rows, ce.double())
    return sums.tolist(), keep.sum(dim=1).tolist()

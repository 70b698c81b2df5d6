"""The tiny preset: Gemma3-architecture models built locally, deterministically from the seed, with
no download.

A SentencePiece BPE tokenizer of Gemma's kind (<= 8k entries) is trained on the project's own texts,
with Gemma3's turn format; one Gemma3ForCausalLM per stage (1 KV head, sliding-window layers, sizes
strictly growing) is initialised from the seed and pre-trained briefly on the project's texts: the
1b teacher on chat-formatted reference answers and the kernel, so that it answers with text that
ends with <end_of_turn>; the students on the same texts as plain prose plus the kernel's axioms as
questions and answers, like base models that can hold a conversation but have never seen the probes
answered, so that what they learn of them comes from their teachers. Models are cached under
models.cache_dir keyed by everything that determines them; a build commits by rename.

    # build the tiny preset into the cache, print paths
    python -c "from cascade.tiny import main; main()"
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

from cascade.chat import GEMMA3_CHAT_TEMPLATE, collate, encode_example, prompt_messages
from cascade.config import Config
from cascade.prompts import load_prompts, read_text

log = logging.getLogger(__name__)
# Gemma's low ids first
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
BUILD_VERSION = 4  # bump when the build procedure changes


def _corpus(cfg: Config) -> tuple[str, list[tuple[list[dict], str]]]:
    kernel = read_text(cfg.kernel)
    pairs = []
    for src in cfg.data.values():
        for p in load_prompts(src):
            if p.reference:
                pairs.append((prompt_messages(p.messages), p.reference))
    # the kernel itself, as an answer, so its words are in the vocabulary and the models
    pairs.append(([{"role": "user", "content": "What are the five axioms?"}], kernel))
    return kernel, pairs


def preset_key(cfg: Config) -> str:
    kernel, pairs = _corpus(cfg)
    blob = json.dumps({"v": BUILD_VERSION, "seed": cfg.seed,
                       "tiny": dataclasses.asdict(cfg.models.tiny), "kernel": kernel,
                       "pairs": pairs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def preset_dir(cfg: Config) -> Path:
    return Path(cfg.models.cache_dir).expanduser() / f"tiny-{preset_key(cfg)}"


def _build_tokenizer(cfg: Config, texts: list[str], out: Path) -> None:
    """Gemma's kind of tokenizer, trained on the project's texts: SentencePiece BPE with byte
    fallback, digits split, spaces kept as "▁", the turn tokens as control pieces after Gemma's low
    ids (the kind llama.cpp's converter takes). transformers loads it as a GemmaTokenizer; the
    directory keeps its tokenizer.json."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe",
                                   vocab_size=cfg.models.tiny.vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=False,
                                   remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
                                   character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=SPECIALS[0], eos_piece=SPECIALS[1],
                                   bos_piece=SPECIALS[2],
        unk_piece=SPECIALS[3], control_symbols=SPECIALS[4:], num_threads=1,
                                   max_sentence_length=1 << 20,
        minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                    "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": None})
    )
    fast = AutoTokenizer.from_pretrained(str(out))
    # a path of this build's; tokenizer.json is the tokenizer from here on
    fast.init_kwargs.pop("vocab_file", None)
    (out / "tokenizer.model").unlink()
    fast.chat_template = GEMMA3_CHAT_TEMPLATE
    fast.padding_side = "left"
    fast.save_pretrained(str(out))


def _pretrain(model, tokenizer, examples: list[dict], steps: int, cfg: Config, seed: int) -> float:
    """Full-parameter LM training on chat-formatted examples (loss on answers), deterministic from
    `seed`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.models.tiny.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps)
    )
    bs = cfg.models.tiny.batch_size
    model.train()
    loss_val = float("nan")
    for _ in range(steps):
        idx = torch.randint(len(examples), (bs,), generator=g).tolist()
        batch = [examples[i] for i in idx]
        ids, labels, mask = collate(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_val = loss.item()
    model.eval()
    return loss_val


def _examples(tokenizer, kernel: str, pairs: list, texts: list[str],
              max_len: int) -> tuple[list, list]:
    """(chat examples: the reference answers in the turn format; text examples: the same texts as
    prose, plus the turn format learnt from the kernel alone: a base model that can hold a
    conversation)."""
    chat = [encode_example(tokenizer, m, a, max_len) for m, a in pairs]
    text = []
    for t in texts:
        ids = [tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"][
            : max_len - 1
        ]
        text.append({"input_ids": ids, "labels": ids})
    axioms = [ln.split(". ", 1)[1] for ln in kernel.splitlines() if ln[:1].isdigit()]
    text += [
        encode_example(tokenizer,
                       [{"role": "user", "content": f"What does {a.split(':')[0]} ask?"}],
                       a.split(": ", 1)[1], max_len)
        for a in axioms
    ] * 4
    return chat, text


def _build_model(cfg: Config, stage: str, i: int, tokenizer, examples: list[dict],
                 out: Path) -> dict:
    """One stage's Gemma3 model, initialised from the seed, pre-trained, saved to `out`; returns its
    summary."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig

    t, spec = cfg.models.tiny, cfg.models.tiny.sizes[stage]
    layers = spec.num_hidden_layers
    mcfg = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim,
        sliding_window=t.sliding_window,
        # Gemma 3's own layout, which llama.cpp assumes for the architecture: every sixth layer
        # attends fully (none of these few), the others to the window; queries scaled by
        # 1/sqrt(head_dim)
        layer_types=["sliding_attention" if (j + 1) % 6 else "full_attention"
                     for j in range(layers)],
        query_pre_attn_scalar=t.head_dim,
        max_position_embeddings=t.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        architectures=["Gemma3ForCausalLM"],
    )
    torch.manual_seed(cfg.seed + 1000 * i)
    model = Gemma3ForCausalLM(mcfg).float()
    loss = _pretrain(model, tokenizer, examples, spec.pretrain_steps, cfg, cfg.seed + 1000 * i)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=[tokenizer.eos_token_id, eot],
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(str(out))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny %s: %d parameters, pre-train loss %.3f", stage, n_params, loss)
    return {"params": n_params, "pretrain_loss": round(loss, 4),
            "pretrain_format": spec.pretrain_format}


def build_preset(cfg: Config) -> Path:
    """Build (once) and return the directory holding tokenizer/ and one HF model directory per
    stage."""
    final = preset_dir(cfg)
    if (final / "preset.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # one builder at a time; the others find it done
        if (final / "preset.json").exists():
            return final
        import torch
        from transformers import AutoTokenizer

        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        kernel, pairs = _corpus(cfg)
        texts = [kernel] + [m[-1]["content"] + "\n" + a for m, a in pairs]
        _build_tokenizer(cfg, texts, tmp / "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"))
        chat, text = _examples(tokenizer, kernel, pairs, texts,
                               cfg.models.tiny.max_position_embeddings)
        summary = {"key": final.name, "vocab_size": len(tokenizer), "models": {}}
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        for i, stage in enumerate(cfg.stage_order()):
            examples = chat if cfg.models.tiny.sizes[stage].pretrain_format == "chat" else text
            summary["models"][stage] = _build_model(cfg, stage, i, tokenizer, examples, tmp / stage)
        (tmp / "preset.json").write_text(json.dumps(summary, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        return final


def main() -> None:
    from cascade.config import compose

    logging.basicConfig(level=logging.INFO)
    print(build_preset(compose(["+stage=27b", "models=tiny"])))

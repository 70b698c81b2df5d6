"""A SentencePiece `tokenizer.model` written from a Gemma-form `tokenizer.json`, for llama.cpp's
converter.

llama.cpp converts a Gemma 3 tokenizer only from SentencePiece's file (its other route needs a
pre-tokenizer it recognises by hash); transformers keeps only `tokenizer.json` (so do models
dequantized from a GGUF). A Gemma-form tokenizer.json - BPE with byte fallback over "▁"-for-space
text, no pre-tokenizer but a split at spaces - is a SentencePiece BPE model written another way: the
same pieces and ids; a piece's score orders the merges (the earlier its merge, the higher), bytes
<0xNN> are BYTE pieces, special added tokens CONTROL, other added tokens USER_DEFINED. llama.cpp
then tokenizes as transformers does; the release step checks that on held-out prompts.

    write_sentencepiece(model_dir)   # model_dir/tokenizer.model, unless it has one
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_BYTE = re.compile(r"^<0x[0-9A-F]{2}>$")


class TokenizerFormError(ValueError):
    """The tokenizer is not of the Gemma form that SentencePiece can express."""


def write_sentencepiece(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    out = model_dir / "tokenizer.model"
    if out.exists():
        return out
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    m = tj["model"]
    if m.get("type") != "BPE" or not m.get("byte_fallback"):
        raise TokenizerFormError(f"{model_dir}: tokenizer.json is {m.get('type')} without byte "
                                 "fallback; llama.cpp converts a Gemma tokenizer only as "
                                 "SentencePiece (BPE, byte fallback)")
    norm = tj.get("normalizer") or {}
    if norm.get("type") != "Replace" or norm.get("content") != "▁":
        raise TokenizerFormError(f"{model_dir}: tokenizer.json does not write spaces as '▁' (not "
                                 "Gemma's form)")
    proto = _proto(m, tj.get("added_tokens", []))
    tmp = out.with_suffix(".model.tmp")
    tmp.write_bytes(proto.SerializeToString())
    tmp.rename(out)
    return out


def _piece_type(pb: Any, piece: str, added: dict | None, unk: str) -> int:
    kind = pb.ModelProto.SentencePiece
    if piece == unk:
        return kind.UNKNOWN
    if added is not None:
        return kind.CONTROL if added.get("special") else kind.USER_DEFINED
    if _BYTE.match(piece):
        return kind.BYTE
    return kind.NORMAL if piece else kind.UNUSED


def _proto(m: dict, added_tokens: list[dict]) -> Any:
    """The SentencePiece ModelProto of a tokenizer.json's BPE model (m) and its added tokens."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab: dict[str, int] = m["vocab"]
    added = {t["id"]: t for t in added_tokens}
    rank: dict[str, int] = {}
    for i, merge in enumerate(m["merges"]):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(a + b, i)
    n = max(max(vocab.values()), max(added, default=-1)) + 1
    pieces = [""] * n
    for piece, i in vocab.items():
        pieces[i] = piece
    for i, t in added.items():
        pieces[i] = t["content"]
    proto = pb.ModelProto()
    unk = m.get("unk_token") or "<unk>"
    for i, piece in enumerate(pieces):
        p = proto.pieces.add()
        p.piece = piece or f"<unused-id-{i}>"
        p.type = _piece_type(pb, piece, added.get(i), unk)
        # SentencePiece's BPE merges the adjacent pair whose joined piece scores highest: the merge
        # rank, negated
        last = len(m["merges"]) + i
        p.score = -float(rank.get(piece, last)) if p.type == p.NORMAL and len(piece) > 1 else 0.0
    ids = {t["content"]: i for i, t in added.items()}
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = True
    ts.split_digits = True
    ts.unk_id = vocab.get(unk, ids.get(unk, 3))
    ts.bos_id, ts.eos_id, ts.pad_id = (ids.get(t, vocab.get(t, -1))
                                       for t in ("<bos>", "<eos>", "<pad>"))
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto

"""Phase kind `sft` (the default, the seed's recipe): cross-entropy on the teachers' answers, prompt
tokens masked.

    curriculum: [{name: p0_ethics, data: ethics, iters: 300, lr: 1.0e-4}]    # kind: sft
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TEACHER_LOGPROBS = False
METRICS: tuple[str, ...] = ()


@dataclass
class Options:
    pass


def check(opts: Options, cfg: Any, where: str) -> None:
    pass


def encode(opts: Options, tok: Any, rec: dict, max_len: int, read: Any) -> dict:
    """Prompt (masked) + the teacher's answer as text, re-tokenized by the student's tokenizer."""
    from cascade.chat import encode_example

    return encode_example(tok, rec["messages"], rec["response"], max_len)


def loss(opts: Options, model: Any, batch: dict) -> tuple[Any, dict[str, float]]:
    from cascade.modeling import response_nll

    ce, _, n = response_nll(model, batch)  # chunked over the vocabulary's logits
    return ce / max(1, n), {}


def cost(opts: Options, train: Any, iters: int) -> dict[str, int]:
    """One forward and backward over every training token slot."""
    seqs = iters * train.batch_size * train.grad_accum
    return {"steps": iters, "sequences": seqs, "token_slots": seqs * train.max_seq_len}

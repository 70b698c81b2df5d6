"""Phase kind `distill`: the sft loss plus `weight` x the cross-entropy against the teachers' stored
top-k distribution at each response token (logit distillation on the teachers' own samples,
cascade/logprobs.py).

    python -m cascade +stage=4b models=tiny generation.logprobs=8 curriculum.0.kind=distill \
        +curriculum.0.options.weight=0.5

Needs generation.logprobs > 0 and teachers whose tokenizer is the student's (stages/curate.py checks
the vocabulary hashes; Gemma 3's 1B and 4B+ embeddings differ only in padded rows past the shared
tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cascade.phases.sft as sft
from cascade.validate import fail, number

TEACHER_LOGPROBS = True
SHARED_TOKENIZER = True  # compares the student's and the teachers' distributions token by token
METRICS = ("distill",)


@dataclass
class Options:
    weight: float = 0.5  # of the distillation term, beside the sft loss's 1

    def check(self, where: str) -> None:
        number(f"{where}.weight", self.weight, 0, lo_open=True)


def check(opts: Options, cfg: Any, where: str) -> None:
    if cfg.generation.logprobs <= 0:
        fail(f"{where}: kind distill needs the teachers' top-k log-probabilities: set "
             "generation.logprobs (e.g. 20)")


def encode(opts: Options, tok: Any, rec: dict, max_len: int, read: Any) -> dict:
    """The teacher's sampled tokens as they were generated, each position with the teacher's top-k.
    """
    from cascade.logprobs import encode_distill

    return encode_distill(tok, rec, max_len, read)


def loss(opts: Options, model: Any, batch: dict) -> tuple[Any, dict[str, float]]:
    from cascade.modeling import response_nll

    ce, kd, n = response_nll(model, batch)  # both sums in one pass over the vocabulary's chunks
    kd_t = kd / max(1, n)
    return ce / max(1, n) + opts.weight * kd_t, {"distill": kd_t.item()}


def cost(opts: Options, train: Any, iters: int) -> dict[str, int]:
    """sft's work; the top-k targets add k reads per token slot, nothing a planner needs to count.
    """
    return sft.cost(opts, train, iters)

"""A phase kind that exists only for tests/test_phase_kinds.py: one module, one conf file
(tests/conf/curriculum/toy.yaml) and its test, with nothing else in the project edited, is all a new
kind takes.

It learns only the first `first` tokens of each answer (its own encoding), at `scale` x the mean
cross-entropy (its own loss), and records the unscaled figure at every step (its own metric, kept in
mid-phase checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cascade.phases.sft as sft

TEACHER_LOGPROBS = False
METRICS = ("unscaled",)


@dataclass
class Options:
    first: int = 4
    scale: float = 1.0


def check(opts: Options, cfg: Any, where: str) -> None:
    from cascade.validate import number

    number(f"{where}.options.first", opts.first, 1)
    number(f"{where}.options.scale", opts.scale, 0, lo_open=True)


def encode(opts: Options, tok: Any, rec: dict, max_len: int, read: Any) -> dict:
    from cascade.chat import IGNORE_INDEX

    ex = sft.encode(opts, tok, rec, max_len, read)
    learnt = set([i for i, y in enumerate(ex["labels"]) if y != IGNORE_INDEX][: opts.first])
    ex["labels"] = [y if i in learnt else IGNORE_INDEX for i, y in enumerate(ex["labels"])]
    return ex


def loss(opts: Options, model: Any, batch: dict) -> tuple[Any, dict[str, float]]:
    ce, _ = sft.loss(opts, model, batch)
    return opts.scale * ce, {"unscaled": ce.item()}


def cost(opts: Options, train: Any, iters: int) -> dict[str, int]:
    work = sft.cost(opts, train, iters)
    return {**work, "learnt_tokens_at_most": work["sequences"] * opts.first}

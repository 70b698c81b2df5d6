"""Seeded bad students for the promotion gate (tests/test_gate.py, benchmarks/gate.py): a phase kind
that trains a LoRA on corrupted answers, reached by its dotted path with tests/ on PYTHONPATH:

    python -m cascade +stage=4b models=tiny curriculum.0.kind=seeded_bad \
        +curriculum.0.options.mode=shuffled +curriculum.0.options.seed=3

    shuffled    each training answer after another training prompt of its data set (a seeded
                derangement): the answers are right, the questions they answer are not
    contradict  each answer replaced by one contradicting the LEK-1 kernel
                (tests/data/contradicting_answers.json, by the probe's axiom; a seeded choice)

The third seeded bad student, a learning rate 100 x too high, needs no kind (curriculum.N.lr).
`overrides(kind, seed, lrs)` gives the command-line changes that make each.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cascade.phases.sft as sft

TEACHER_LOGPROBS = False
METRICS: tuple[str, ...] = ()
DATA = Path(__file__).resolve().parents[1] / "data"
MODES = ("shuffled", "contradict")
KINDS = ("healthy", "shuffled", "lr_x100", "contradict")


def overrides(kind: str, seed: int, lrs: list[float]) -> list[str]:
    """The command-line changes that make a seed's student of a kind, for a curriculum whose phases
    have the learning rates `lrs` (train.seed: the data order and the adapter's initialisation)."""
    out = [f"train.seed={seed}"]
    for i, lr in enumerate(lrs):
        if kind == "lr_x100":
            out.append(f"curriculum.{i}.lr={lr * 100:g}")
        elif kind in MODES:
            out += [f"curriculum.{i}.kind=seeded_bad", f"+curriculum.{i}.options.mode={kind}",
                    f"+curriculum.{i}.options.seed={seed}"]
    return out


@dataclass
class Options:
    mode: str = "shuffled"
    seed: int = 0


def check(opts: Options, cfg: Any, where: str) -> None:
    from cascade.validate import fail

    if opts.mode not in MODES:
        fail(f"{where}.options.mode {opts.mode!r}: one of {', '.join(MODES)}")


@functools.cache
def _rows() -> dict[str, dict]:
    """Every probe and lesson of the project's data sets by id, with the file it is from."""
    out = {}
    for f in ("ethics_probes.jsonl", "composure_lessons.jsonl"):
        for line in (DATA / f).read_text().splitlines():
            row = json.loads(line)
            out[row["id"]] = {**row, "file": f}
    return out


@functools.cache
def _derangement(seed: int, file: str) -> dict[str, str]:
    """A seeded permutation of a file's training prompts that moves every one of them."""
    ids = sorted(i for i, r in _rows().items() if r["file"] == file and r["split"] == "train")
    random.Random(f"{seed}/{file}").shuffle(ids)
    return {a: b for a, b in zip(ids, ids[1:] + ids[:1])}


@functools.cache
def _contradictions() -> dict[str, list[str]]:
    return json.loads((Path(__file__).parent / "data/contradicting_answers.json").read_text())


def corrupt(opts: Options, rec: dict) -> dict:
    row = _rows()[rec["prompt_id"]]
    if opts.mode == "shuffled":
        to = _derangement(opts.seed, row["file"]).get(rec["prompt_id"])
        if to is None:  # a held-out probe (the fusion check reads them): left as it is
            return rec
        other = _rows()[to]
        messages = [*rec["messages"][:-1], {**rec["messages"][-1], "content": other["prompt"]}]
        return {**rec, "messages": messages}
    choices = _contradictions()[row.get("axiom", "composure")]
    pick = random.Random(f"{opts.seed}/{rec['prompt_id']}").randrange(len(choices))
    return {**rec, "response": choices[pick]}


def encode(opts: Options, tok: Any, rec: dict, max_len: int, read: Any) -> dict:
    return sft.encode(opts, tok, corrupt(opts, rec), max_len, read)


def loss(opts: Options, model: Any, batch: dict) -> tuple[Any, dict[str, float]]:
    return sft.loss(opts, model, batch)


def cost(opts: Options, train: Any, iters: int) -> dict[str, int]:
    return sft.cost(opts, train, iters)

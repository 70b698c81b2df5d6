"""Phase kinds: what one curriculum phase trains on and with which loss. A phase names its kind and
its options:

    curriculum:
      - {name: p0_ethics, data: ethics, iters: 300, lr: 1.0e-4}      # kind: sft (the default)
      - {name: p2_ethics, data: ethics, iters: 100, kind: distill, options: {weight: 0.5}}

    python -m cascade +stage=4b models=tiny generation.logprobs=8 curriculum.2.kind=distill

A kind is one module; everything else (the schema's check, the plan, curation, the training worker,
the checkpoints, the planner) asks it, through `load`, and never compares its name. The module
declares:

    Options                         a dataclass: the phase's `options:` (unknown keys refused before
                                    Ray starts)
    TEACHER_LOGPROBS                whether it trains on the teachers' stored top-k
                                    log-probabilities (then generation.logprobs > 0 and every
                                    teacher's tokenizer the student's are required)
    METRICS                         names of its per-step figures beside the loss (kept in mid-phase
                                    checkpoints, listed in the phase's summary as <name>_losses)
    check(opts, cfg, where)         any further check of the whole config, before Ray starts
    encode(opts, tok, rec, max_len, read) -> example
                                    a curated record as token ids, labels masked where no loss is
                                    taken (cascade.chat; `read` gives a record's stored top-k)
    loss(opts, model, batch) -> (loss, {metric: value})
                                    one micro-batch's loss per response token
    cost(opts, train, iters) -> {"token_slots": ..., ...}
                                    the planner's work for the phase

and optionally:

    batch(opts, trainer, rows, step, micro) -> batch
                                    the micro-batch the loss takes, built by the kind itself from
                                    the rows' examples (never packed): on_policy's samples and their
                                    scores
    uses_kernel(opts) -> bool       whether the kernel's text determines what the phase trains (part
                                    of its key)
    SHARED_TOKENIZER                compares distributions token by token: every teacher's tokenizer
                                    must be the student's (checked before Ray starts:
                                    check_tokenizers below)

Built in: `sft` (cascade/phases/sft.py), `distill` (cascade/phases/distill.py) and `on_policy`
(cascade/phases/on_policy.py). Any other name is the dotted path of a module that declares the same
(`kind: mypkg.my_kind`), imported by the driver and by every training worker: it must be importable
on every node, as the config's own code (like Hydra's `_target_`).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
from types import ModuleType
from typing import Any

from cascade.validate import fail

log = logging.getLogger(__name__)

BUILTIN = {"sft": "cascade.phases.sft", "distill": "cascade.phases.distill",
           "on_policy": "cascade.phases.on_policy"}
DECLARES = ("Options", "TEACHER_LOGPROBS", "METRICS", "check", "encode", "loss", "cost")
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def load(kind: str) -> ModuleType:
    """The module of a phase kind (a ConfigError, naming the built-in kinds, when there is none)."""
    name = BUILTIN.get(kind, kind)
    if not _MODULE.match(name):
        fail(f"phase kind {kind!r}: built-in kinds: {', '.join(BUILTIN)}; or the dotted path of a "
             "module")
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        fail(f"phase kind {kind!r}: not a built-in kind ({', '.join(BUILTIN)}) and no module of "
             f"that name can be imported ({e})")
    missing = [d for d in DECLARES if not hasattr(module, d)]
    if missing:
        fail(f"phase kind {kind!r} ({name}) does not declare {', '.join(missing)} (see "
             "cascade/phases/__init__.py)")
    return module


def options(kind: str, given: dict[str, Any], where: str) -> Any:
    """The phase's options as its kind's Options dataclass; unknown keys or a wrong value refused
    with `where`."""
    cls = load(kind).Options
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        fail(f"{where}.options: {', '.join(unknown)} not an option of kind {kind!r} (its options: "
             f"{', '.join(sorted(known)) or 'none'})")
    opts = cls(**given)
    if hasattr(opts, "check"):
        opts.check(f"{where}.options")
    return opts


def identity(phase: Any) -> dict[str, Any]:
    """What of a phase determines its trained model (part of the step's key). An `sft` phase without
    options is keyed as phases were before kinds existed, so run directories made then keep their
    committed steps."""
    out = {"name": phase.name, "data": phase.data, "iters": phase.iters, "lr": phase.lr}
    if phase.kind != "sft" or phase.options:
        out.update(kind=phase.kind, options=dict(phase.options))
    return out


def check_tokenizers(p: Any) -> None:
    """Before Ray starts (`p`: the cascade.graph.RunGraph): a phase whose kind compares the
    student's and its teachers' distributions token by token (SHARED_TOKENIZER: distill, on_policy)
    needs every teacher's tokenizer to be the student's (training never changes a tokenizer, so a
    teacher trained in this run is compared by its base model's). Gemma 3's 1B and 4B+ share one
    (their embeddings differ only in padded rows, which the kinds drop). A preset's model not built
    yet (tiny, gemma3-270m: built after this check, each preset's from one tokenizer) is passed
    over."""
    import os

    from cascade.chat import vocab_hash

    stages = {sp.name: sp for sp in p.stages}
    unbuilt = {sp.base_model for sp in p.stages if not os.path.exists(sp.base_model)
               and p.cfg.stages[sp.name].model.startswith(("tiny:", "gemma3-270m:"))}
    hashes: dict[tuple, str | None] = {}

    def of(model: str, revision: str | None) -> str | None:
        if model in unbuilt:
            return None
        if (model, revision) not in hashes:
            from transformers import AutoTokenizer

            hashes[model, revision] = vocab_hash(AutoTokenizer.from_pretrained(
                model, revision=revision, trust_remote_code=p.cfg.models.trust_remote_code))
        return hashes[model, revision]

    for sp in p.stages:
        for ph in sp.phases:
            if not getattr(load(ph.kind), "SHARED_TOKENIZER", False):
                continue
            student = of(sp.base_model, sp.revision)
            for t in sp.teachers:
                base = stages.get(t.name)
                model, revision = ((base.base_model, base.revision) if base
                                   else (t.model, t.revision))
                theirs = None if student is None else of(model, revision)
                if theirs is not None and theirs != student:
                    fail(f"{ph.model.name} (kind {ph.kind}) compares the student's and its "
                         f"teachers' distributions token by token: teacher {t.name} ({model}) and "
                         f"student {sp.name} ({sp.base_model}) have different tokenizers; use kind "
                         "sft for this stage's phases")


def load_examples(rd: Any, path: str, tok: Any, max_len: int, kind: Any,
                  opts: Any) -> tuple[list[dict], int]:
    """A dataset file's records encoded for training by the phase's kind ([] when the file does not
    exist), and how many were dropped for having no response token within max_len."""
    from cascade.chat import IGNORE_INDEX
    from cascade.logprobs import Reader

    read = Reader(rd.read_bytes)
    out = [kind.encode(opts, tok, r, max_len, read) for r in rd.read_jsonl(path)]
    # a prompt as long as max_seq_len leaves no response token to learn from: dropped, counted
    kept = [e for e in out if any(x != IGNORE_INDEX for x in e["labels"])]
    if len(kept) < len(out):
        log.warning("%s: %d of %d examples dropped: their prompt fills train.max_seq_len=%d, no "
                    "response token is left to train on", path, len(out) - len(kept), len(out),
                    max_len)
    return kept, len(out) - len(kept)

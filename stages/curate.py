"""Step 2 of a stage: turn the teachers' raw responses into one phase's distilled dataset.

    python -m cascade +stage=12b models=tiny       # mixes the answers of teachers 4b and 1b

For each prompt one teacher is chosen by its mix weight, deterministically from (seed, stage, phase,
prompt id); its responses are kept unless failed, empty, cut off by the token limit (finish_reason
"length", when generation.drop_truncated), outside the length bounds (generation.min_chars,
max_chars) or a duplicate of another answer to the same prompt (exact, or equal after lower-casing
and collapsing whitespace and punctuation). Every drop is counted. Output: train.jsonl and
heldout.jsonl (datasets.load_dataset("json", ...) opens them), each record with its provenance. With
generation.logprobs a record also points at its stored top-k log-probabilities (file, offset,
length); for a phase whose kind trains on them (distill) the teachers' vocabulary must be the
student's, or the step stops here, before training.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter, defaultdict
from typing import Any

from cascade import phases
from cascade.config import Config, ConfigError, GenerationConfig
from cascade.graph import Context, GenJob, PhaseGraph, StageGraph, Work
from cascade.prompts import Prompt
from cascade.rundir import RunDir, Step, stable_hash
from cascade.steps import Made


def normalize(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def _load(rd: RunDir, job: GenJob) -> dict[str, list[dict]]:
    """A teacher's answers to one prompt set, by prompt id; log-prob references made run-directory
    paths."""
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for f in rd.shards(job.teacher.name, job.data, job.step.key):
        for rec in rd.read_jsonl(f):
            if "logprobs" in rec:
                name = rec["logprobs"]["file"]
                rec["logprobs"] = {**rec["logprobs"],
                                   "file": rd.shard_file(job.teacher.name, job.data,
                                                                             job.step.key, name)}
            by_prompt[rec["prompt_id"]].append(rec)
    return by_prompt


def run(ctx: Context, w: Work, todo: list[Step]) -> dict[str, Made]:
    """The phase's dataset, staged for the driver to commit."""
    staging = ctx.rd.staging(w.phase.dataset.name)
    return {w.phase.dataset.name: Made(build(staging, ctx.cfg, w.stage, w.phase,
                                             ctx.graph.prompts[w.phase.data], ctx.rd), staging)}


def cost(est: Any, w: Work, todo: list[Step]) -> list[dict]:
    """On the driver's CPU, seconds at most: the answers it filters (one teacher's per prompt)."""
    n = len(est.p.prompts[w.phase.data])
    work = {"prompts": n, "answers_at_most": n * est.cfg.generation.n_samples}
    return [est.row(w.phase.dataset.name, "curate", w.stage.name, est.arch[w.stage.name], 0, {},
                    work, 0, "", 0.0)]


def build(staging: str, cfg: Config, sp: StageGraph, ph: PhaseGraph, prompts: list[Prompt],
          rd: RunDir) -> dict:
    """Write the phase's train and held-out records into staging; returns the summary (the funnel's
    counts)."""
    jobs = [j for j in sp.gen_jobs if j.data == ph.data]
    answers = {j.teacher.name: _load(rd, j) for j in jobs}
    if phases.load(ph.kind).TEACHER_LOGPROBS:
        check_shared_vocab(cfg, sp, ph, answers)
    weights = [j.teacher.weight for j in jobs]
    # the funnel of each teacher
    by_teacher: dict[str, Counter] = {j.teacher.name: Counter() for j in jobs}
    out = {"train": [], "heldout": []}
    for p in prompts:
        rng = random.Random(stable_hash("mix", cfg.seed, sp.name, ph.name, p.id))
        teacher = rng.choices(jobs, weights=weights)[0].teacher
        c = by_teacher[teacher.name]
        kept = [_record(p, ph, teacher.name, rec, text) for rec, text in
                _keep(answers[teacher.name].get(p.id, []), cfg.generation, c)]
        out["heldout" if p.heldout else "train"] += kept
        c["kept"] += len(kept)
        if not kept:
            c["prompts_without_answer"] += 1
    counts: Counter = sum(by_teacher.values(), Counter())
    counts.update({f"teacher/{t}": c["kept"] for t, c in by_teacher.items() if c["kept"]})
    if not out["train"]:
        raise ConfigError(
            f"{sp.name}/{ph.name}: no usable generations to train on ({dict(counts)})"
        )
    for split, recs in out.items():
        rd.write_jsonl(f"{staging}/{split}.jsonl", recs)
    return {"counts": dict(counts), "by_teacher": {t: dict(c) for t, c in by_teacher.items()},
            "train": len(out["train"]), "heldout": len(out["heldout"])}


def _keep(recs: list[dict], g: GenerationConfig, counts: Counter) -> list[tuple[dict, str]]:
    """The answers to one prompt that are kept, with their stripped text; every drop counted by its
    reason."""
    seen: set[str] = set()
    seen_exact: set[str] = set()
    kept = []
    for rec in recs:
        counts["generated"] += 1
        text = rec["text"].strip()
        if rec["finish_reason"] not in ("stop", "length"):
            counts["failed"] += 1
        elif len(text) < g.min_chars:
            counts["empty"] += 1
        elif rec["finish_reason"] == "length" and g.drop_truncated:
            counts["truncated"] += 1
        elif g.max_chars and len(text) > g.max_chars:
            counts["too_long"] += 1
        elif text in seen_exact:
            counts["duplicate_exact"] += 1
        elif normalize(text) in seen:
            counts["duplicate_normalized"] += 1
        else:
            seen.add(normalize(text))
            seen_exact.add(text)
            kept.append((rec, text))
    return kept


def _record(p: Prompt, ph: PhaseGraph, teacher: str, rec: dict, text: str) -> dict:
    """A dataset record: the prompt, the teacher's answer, and its provenance."""
    return {
        "id": f"{p.id}/{teacher}/{rec['sample']}",
        "prompt_id": p.id,
        "phase": ph.name,
        "messages": p.messages,
        "response": text,
        **{k: rec[k]
           for k in ("data", "teacher", "teacher_key", "sampling", "seed", "sample",
                     "finish_reason",
                               "prompt_tokens", "completion_tokens")},
        **({"logprobs": rec["logprobs"], "vocab_hash": rec.get("vocab_hash")} if "logprobs" in rec
           else {}),
    }


@functools.lru_cache(maxsize=8)
def _vocab(model: str, revision: str | None, trust: bool) -> str:
    """A student's vocabulary hash, its tokenizer loaded once per driver (a 262k vocabulary takes
    seconds; each phase's dataset asks)."""
    from transformers import AutoTokenizer

    from cascade.chat import vocab_hash

    return vocab_hash(AutoTokenizer.from_pretrained(model, revision=revision,
                                                    trust_remote_code=trust))


def check_shared_vocab(cfg: Config, sp: StageGraph, ph: PhaseGraph,
                       answers: dict[str, dict[str, list[dict]]]) -> None:
    """A kind that trains on the teachers' top-k compares token ids: every teacher's vocabulary must
    be the student's."""
    from cascade.storage import local_model

    student = _vocab(local_model(sp.base_model), sp.revision, cfg.models.trust_remote_code)
    for name, by_prompt in answers.items():
        recs = [r for rs in by_prompt.values() for r in rs]
        if not all("logprobs" in r for r in recs):
            raise ConfigError(f"{ph.model.name} (kind {ph.kind}) needs the teachers' top-k "
                              "log-probabilities: "
                              f"teacher {name}'s answers have none (set generation.logprobs > 0)")
        theirs = {r.get("vocab_hash") for r in recs}
        if theirs != {student}:
            raise ConfigError(f"{ph.model.name} (kind {ph.kind}) needs a shared tokenizer: teacher "
                              f"{name} (vocabulary {sorted(map(str, theirs))}) and student "
                              f"{sp.name} ({sp.base_model}, vocabulary {student}) differ; use kind "
                              "sft for this stage's phases")


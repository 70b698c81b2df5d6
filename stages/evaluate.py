"""Step 4 of a stage: student-teacher agreement on held-out prompts, before and after the
curriculum.

    python -m cascade +stage=4b models=tiny       # writes <run_dir>/4b/eval/metrics.json

Agreement is the mean per-token log-likelihood (nats) of the teachers' held-out responses under the
student, averaged over all response tokens (<end_of_turn> included), prompt tokens masked exactly as
in training. Higher is closer; `after - before` is what the stage taught. A second, text-level
measure: the student's own greedy answers (eval.answer_tokens at most) to the same held-out prompts,
compared with the teachers' answers by ROUGE-L F1 over lower-cased words (0..1), and the share of
them that end by themselves (<end_of_turn>). For the root teacher built by kernel context
distillation, the teachers' answers are the base model's with the kernel in context, and the student
is asked *without* it: before/after is how far the kernel's effect moved into the weights (the
seed's "from weights alone, no system prompt"). The distribution-level measure: the reverse
KL(student || teacher) per token of the student's own answers (greedy, and sampled at temperature
1), each teacher reading them after its own prompt (with the kernel when the root teacher is built),
compared on the student's top-32 and the tail (cascade/divergence.py); `cut` = 1 - after / before is
what the stage moved the student towards its teachers on their own ground - the quantity on-policy
distillation (kind on_policy) minimises. The conditioning: what the teachers' held-out answers owe
to their own questions - their log-likelihood/token after their own prompt minus their mean after up
to eval.other_prompts other held-out prompts (one prompt alone made a noisy figure); with each
record's gain (after - before) and `z`, the gains' mean over its standard error. The metrics file
also gathers the loss of each phase and the curation counts of each phase's dataset.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from cascade import loads
from cascade.config import Config
from cascade.graph import Context, StageGraph, Work
from cascade.rundir import RunDir, Step
from cascade.scoring import heldout_records, score_records, settings, taken, teacher_divergence
from cascade.steps import Made

log = logging.getLogger(__name__)
METRIC = ("mean per-token log-likelihood of held-out teacher responses under the student "
          "(nats; higher = closer)")
TEXT_METRIC = ("ROUGE-L F1 of the student's greedy answers against the teachers' held-out "
               "answers (0..1)")
COND_METRIC = ("log-likelihood/token of the teachers' held-out answers after their own prompt "
               "minus their mean after other held-out prompts (nats: what the answers owe to "
               "their questions)")


def start_before(cfg: Config, sp: StageGraph, rd: RunDir) -> Any:
    """Score the base student now, as a Ray task on eval.num_cpus CPUs (while the first phase trains
    on the CPUs training leaves free); run() collects it."""
    return _task(score_records, cfg).options(name=f"eval/{sp.name}/before").remote(
        sp.base_model, sp.revision, heldout_records(cfg, rd, sp), **_score_kwargs(cfg))


def _task(fn: Any, cfg: Config, num_cpus: float | None = None) -> Any:
    """fn as a Ray task on `num_cpus` CPUs (default eval.num_cpus) and eval.num_gpus GPUs."""
    import ray

    return ray.remote(num_cpus=num_cpus or cfg.eval.num_cpus, num_gpus=cfg.eval.num_gpus)(fn)


def _score_kwargs(cfg: Config) -> dict:
    return {**settings(cfg), "trust": cfg.models.trust_remote_code}


def teachers_of(sp: StageGraph) -> list[tuple]:
    """The stage's teachers as the evaluation's divergence reads them: (model, revision, weight,
    context)."""
    return [(t.model, t.revision, t.weight, t.system) for t in sp.teachers]


def run(ctx: Context, w: Work, todo: list[Step]) -> dict[str, Made]:
    """The stage's metrics, staged for the driver to commit; the base student's score is the one
    started while the curriculum trained (ctx.before) or, with no CPUs to spare, the one training's
    rank 0 made as the first phase loaded it (cascade/scoring.py; else scored here on a training
    worker's CPUs)."""
    sp = w.stage
    staging = ctx.rd.staging(sp.eval.name)
    summary = measure(staging, ctx.cfg, sp, ctx.rd, ctx.before.pop(sp.name, None),
                      None if ctx.spare else ctx.cpus)
    return {sp.eval.name: Made(summary, staging)}


def cost(est: Any, w: Work, todo: list[Step]) -> list[dict]:
    """Two models scored on the held-out prompts (the base student and the trained one); with
    eval.reverse_kl, each teacher loaded once to read their answers, and where (Plan.divergence_in:
    training's rank 0, or the evaluation's own task when memory or CPUs say so)."""
    held = sum(1 for ph in est.cfg.curriculum for p in est.p.prompts[ph.data] if p.heldout)
    work: dict = {"heldout_prompts_at_most": held, "models_scored": 2}
    if est.cfg.eval.reverse_kl and w.stage.teachers:
        work |= {"teacher_loads": len(w.stage.teachers),
                 "teachers_read_in": est.divergence_in(w.stage)}
    units = 2 * math.ceil(est.cfg.eval.num_gpus)
    return [est.row(w.stage.eval.name, "evaluate", w.stage.name, est.arch[w.stage.name], units, {},
                    work, 0, "", 0.0)]


def measure(staging: str, cfg: Config, sp: StageGraph, rd: RunDir, before_ref: Any = None,
            num_cpus: float | None = None) -> dict:
    """The stage's metrics. The base student's score is before_ref's (start_before) or, without one,
    scored here with the trained student's in one task on `num_cpus` CPUs (default eval.num_cpus):
    one process, one set of imports, one model in memory at a time."""
    records, kw = heldout_records(cfg, rd, sp), settings(cfg)
    # the students as training's rank 0 scored them where they were (no load), else their paths
    final = taken(rd, sp.name, "after", sp.phases[-1].model.key, records, kw) or sp.final_model
    if before_ref is None:
        before_ref = taken(rd, sp.name, "before", sp.base_key, records, kw)
    before, after, kl = _scores(cfg, sp, records, before_ref, num_cpus, final)
    metrics = {
        "stage": sp.name,
        "student": sp.final_model,
        "base_model": sp.base_model,
        "teachers": [{"stage": t.name, "weight": t.weight, "key": t.key} for t in sp.teachers],
        "agreement": _delta(METRIC, len(records), before["loglik"], after["loglik"]),
        "text_agreement": _delta(TEXT_METRIC, len(records), before["rouge_l"], after["rouge_l"]),
        "conditioning": {**_delta(COND_METRIC, len(records), before.get("conditioning"),
                                  after.get("conditioning")),
                         **paired_gain(before.get("conditioning_records"),
                                       after.get("conditioning_records"),
                                       [r.get("teacher") for r in records])},
        "self_ended": {"before": before["self_ended"], "after": after["self_ended"]},
        "reverse_kl": kl,
        "harness": harness_scores(cfg, sp, rd),  # the gate's harness tasks, when it judges them
        # the teachers' answers had the kernel
        "kernel_in_context": any(t.system for t in sp.teachers),
        "phases": {},
        "curation": {},
        "compute_seconds": before["seconds"] + after["seconds"],
    }
    keep = ("loss_first", "loss_last", "loss_mean_last", "steps", "tokens", "tokens_per_s",
            "seconds", "train_seconds")
    for ph in sp.phases:
        t = rd.committed(ph.model)["summary"]
        metrics["phases"][ph.name] = {k: t[k] for k in keep}
        metrics["curation"][ph.name] = rd.committed(ph.dataset)["summary"]["counts"]
    rd.write_json(f"{staging}/metrics.json", metrics)
    sampled = (kl or {}).get("sampled") or {}
    log.info("stage %s agreement: before %.4f after %.4f; ROUGE-L before %.3f after %.3f; reverse "
             "KL to the teachers (sampled answers) before %.4f after %.4f", sp.name,
             _num(before["loglik"]), _num(after["loglik"]), _num(before["rouge_l"]),
             _num(after["rouge_l"]), _num(sampled.get("before")), _num(sampled.get("after")))
    return {"loads": before.get("loads", []) + after.get("loads", []),
            "agreement_before": before["loglik"], "agreement_after": after["loglik"],
            "records": len(records), "rouge_l_before": before["rouge_l"],
            "rouge_l_after": after["rouge_l"], "reverse_kl_before": sampled.get("before"),
            "reverse_kl_after": sampled.get("after")}


def _scores(cfg: Config, sp: StageGraph, records: list[dict], before_ref: Any,
            num_cpus: float | None, final: str | dict) -> tuple[dict, dict, dict | None]:
    """(the base student's score (before_ref: a task's, or the score itself), the trained
    student's (`final`: its path, or its score), the teachers' divergence from both)."""
    import ray

    teachers, kw = teachers_of(sp), _score_kwargs(cfg)
    if isinstance(before_ref, dict) and isinstance(final, dict) and (
            "answers" not in final or "divergence" in final):  # no model to load: here
        return _public(before_ref), _public(final), final.get("divergence")
    if before_ref is None:
        task = _task(_score_both, cfg, num_cpus).options(name=f"eval/{sp.name}")
        return ray.get(task.remote(sp.base_model, sp.revision, final, records, teachers, **kw))
    # the teachers read both students' answers in the "after" task: it waits for the "before" score
    task = _task(_score_after, cfg).options(name=f"eval/{sp.name}/after")
    return ray.get(task.remote(before_ref, final, records, teachers, **kw))


def harness_scores(cfg: Config, sp: StageGraph, rd: RunDir) -> dict | None:
    """With gate.max_harness_drop: the release's harness tasks (cascade/harness.py) on the trained
    student and on each teacher, each a task on eval's resources ({tasks, limit, seed, results:
    {"student": .., "teacher <stage>": ..}}; the release takes them); else None."""
    import ray

    from cascade.scoring import heldout
    from cascade.harness import describe, evaluate, spec

    judged = spec(cfg)
    if judged is None:
        return None
    task, probes = _task(evaluate, cfg), heldout(rd, sp)
    models = {"student": sp.final_model, **{f"teacher {t.name}": t.model for t in sp.teachers}}
    refs = {k: task.options(name=f"harness/{sp.name}/{k}").remote(m, *judged, probes)
            for k, m in models.items()}
    results = {k: ray.get(r) for k, r in refs.items()}
    for k, r in results.items():
        log.info("harness %s %s: %s", sp.name, k, describe(r))
    return {"tasks": judged[0], "limit": judged[1], "seed": judged[2], "results": results}


def _num(x: float | None) -> float:
    return float("nan") if x is None else x


def paired_gain(before: list[float] | None, after: list[float] | None,
                teachers: list[str | None] | None = None) -> dict:
    """{record_gains: each held-out record's after - before, z: their mean over its standard
    error (how many standard errors the gain stands above 0: the gate's confidence bound),
    by_teacher: per teacher whose answers the records are, their count and mean gain (which
    teacher's answers the student learnt, or lost, the questions of)}; {} with fewer than two
    records' figures on either side."""
    if not before or not after or len(before) != len(after) or len(before) < 2:
        return {}
    gains = [a - b for a, b in zip(after, before, strict=True)]
    n, mean = len(gains), sum(gains) / len(gains)
    sd = math.sqrt(sum((g - mean) ** 2 for g in gains) / (n - 1))
    by: dict[str, list[float]] = {}
    for t, g in zip(teachers or [], gains):
        by.setdefault(str(t), []).append(g)
    return {"record_gains": gains, "z": mean / max(sd / math.sqrt(n), 1e-12),
            "by_teacher": {t: {"records": len(v), "gain": sum(v) / len(v)}
                           for t, v in by.items()}}


def _delta(metric: str, records: int, before: float | None, after: float | None) -> dict:
    return {"metric": metric, "records": records, "before": before, "after": after,
            "delta": None if before is None or after is None else after - before}


def _score_both(base: str, revision: str | None, final: str | dict, records: list[dict],
                teachers: list[tuple], **kw: Any) -> tuple[dict, dict, dict | None]:
    """(the base student's score, the trained student's, the teachers' divergence from both), one
    model after the other in this process."""
    return _score_after(score_records(base, revision, records, **kw), final, records, teachers,
                        **kw)


def _score_after(before: dict, final: str | dict, records: list[dict], teachers: list[tuple],
                 **kw: Any) -> tuple[dict, dict, dict | None]:
    """(before, the trained student's score (`final`'s: its path, or the score itself), the
    teachers' divergence from both students' answers)."""
    after = final if isinstance(final, dict) else score_records(final, None, records, **kw)
    loads.process = "eval"  # an evaluation task's (score_records may not have run in it)
    kl = teacher_divergence(teachers, records, [before, after], trust=kw["trust"])
    after["loads"] = after.get("loads", []) + loads.taken()  # the teachers'
    return _public(before), _public(after), kl


def _public(score: dict) -> dict:
    """A score without the answers and top-k it carried for the teachers."""
    return {k: v for k, v in score.items() if k not in ("answers", "top", "divergence")}

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
distillation (kind on_policy) minimises. The metrics file also gathers the loss of each phase and
the curation counts of each phase's dataset.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from cascade import loads
from cascade.config import Config
from cascade.metrics import rouge_l
from cascade.graph import Context, StageGraph, Work, heldout
from cascade.rundir import RunDir, Step
from cascade.steps import Made
from cascade.storage import local_model

log = logging.getLogger(__name__)
METRIC = ("mean per-token log-likelihood of held-out teacher responses under the student "
          "(nats; higher = closer)")
TEXT_METRIC = ("ROUGE-L F1 of the student's greedy answers against the teachers' held-out "
               "answers (0..1)")
COND_METRIC = ("log-likelihood/token of the teachers' held-out answers after their own prompt "
               "minus after another held-out prompt (nats: what the answers owe to their "
               "questions)")
KL_METRIC = ("reverse KL(student || teacher) per token of the student's own answers to the "
             "held-out prompts, the teacher with its context (nats; lower = closer), on the "
             "student's top-32 and the tail")


def start_before(cfg: Config, sp: StageGraph, rd: RunDir) -> Any:
    """Score the base student now, as a Ray task on eval.num_cpus CPUs (while the first phase trains
    on the CPUs training leaves free); run() collects it."""
    return _task(score_records, cfg).options(name=f"eval/{sp.name}/before").remote(
        sp.base_model, sp.revision, _heldout(cfg, sp, rd), **_score_kwargs(cfg))


def _task(fn: Any, cfg: Config, num_cpus: float | None = None) -> Any:
    """fn as a Ray task on `num_cpus` CPUs (default eval.num_cpus) and eval.num_gpus GPUs."""
    import ray

    return ray.remote(num_cpus=num_cpus or cfg.eval.num_cpus, num_gpus=cfg.eval.num_gpus)(fn)


def _score_kwargs(cfg: Config) -> dict:
    return dict(max_len=cfg.train.max_seq_len, batch_size=cfg.eval.batch_size,
                trust=cfg.models.trust_remote_code,
                answer_tokens=cfg.eval.answer_tokens, seed=cfg.seed, divergence=cfg.eval.reverse_kl)


def _teachers(sp: StageGraph) -> list[tuple]:
    """The stage's teachers as the evaluation's divergence reads them: (model, revision, weight,
    context)."""
    return [(t.model, t.revision, t.weight, t.system) for t in sp.teachers]


def _heldout(cfg: Config, sp: StageGraph, rd: RunDir) -> list[dict]:
    records = heldout(rd, sp)
    return records[: cfg.eval.max_probes] if cfg.eval.max_probes else records


def run(ctx: Context, w: Work, todo: list[Step]) -> dict[str, Made]:
    """The stage's metrics, staged for the driver to commit; the base student's score is the one
    started while the curriculum trained (ctx.before) or, with no CPUs to spare, scored here on a
    training worker's CPUs."""
    sp = w.stage
    staging = ctx.rd.staging(sp.eval.name)
    summary = measure(staging, ctx.cfg, sp, ctx.rd, ctx.before.pop(sp.name, None),
                      None if ctx.spare else ctx.cpus)
    return {sp.eval.name: Made(summary, staging)}


def cost(est: Any, w: Work, todo: list[Step]) -> list[dict]:
    """Two models scored on the held-out prompts (the base student and the trained one)."""
    held = sum(1 for ph in est.cfg.curriculum for p in est.p.prompts[ph.data] if p.heldout)
    work = {"heldout_prompts_at_most": held, "models_scored": 2}
    units = 2 * math.ceil(est.cfg.eval.num_gpus)
    return [est.row(w.stage.eval.name, "evaluate", w.stage.name, est.arch[w.stage.name], units, {},
                    work, 0, "", 0.0)]


def measure(staging: str, cfg: Config, sp: StageGraph, rd: RunDir, before_ref: Any = None,
            num_cpus: float | None = None) -> dict:
    """The stage's metrics. The base student's score is before_ref's (start_before) or, without one,
    scored here with the trained student's in one task on `num_cpus` CPUs (default eval.num_cpus):
    one process, one set of imports, one model in memory at a time."""
    records = _heldout(cfg, sp, rd)
    before, after, kl = _scores(cfg, sp, records, before_ref, num_cpus)
    metrics = {
        "stage": sp.name,
        "student": sp.final_model,
        "base_model": sp.base_model,
        "teachers": [{"stage": t.name, "weight": t.weight, "key": t.key} for t in sp.teachers],
        "agreement": _delta(METRIC, len(records), before["loglik"], after["loglik"]),
        "text_agreement": _delta(TEXT_METRIC, len(records), before["rouge_l"], after["rouge_l"]),
        "conditioning": _delta(COND_METRIC, len(records), before.get("conditioning"),
                               after.get("conditioning")),
        "self_ended": {"before": before["self_ended"], "after": after["self_ended"]},
        "reverse_kl": kl,
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
            num_cpus: float | None) -> tuple[dict, dict, dict | None]:
    """(the base student's score, the trained student's, the teachers' divergence from both)."""
    import ray

    teachers, kw = _teachers(sp), _score_kwargs(cfg)
    if before_ref is None:
        task = _task(_score_both, cfg, num_cpus).options(name=f"eval/{sp.name}")
        return ray.get(task.remote(sp.base_model, sp.revision, sp.final_model, records, teachers,
                                   **kw))
    # the teachers read both students' answers in the "after" task: it waits for the "before" score
    task = _task(_score_after, cfg).options(name=f"eval/{sp.name}/after")
    return ray.get(task.remote(before_ref, sp.final_model, records, teachers, **kw))


def _num(x: float | None) -> float:
    return float("nan") if x is None else x


def _delta(metric: str, records: int, before: float | None, after: float | None) -> dict:
    return {"metric": metric, "records": records, "before": before, "after": after,
            "delta": None if before is None or after is None else after - before}


def _score_both(base: str, revision: str | None, final: str, records: list[dict],
                teachers: list[tuple], **kw: Any) -> tuple[dict, dict, dict | None]:
    """(the base student's score, the trained student's, the teachers' divergence from both), one
    model after the other in this process."""
    return _score_after(score_records(base, revision, records, **kw), final, records, teachers,
                        **kw)


def _score_after(before: dict, final: str, records: list[dict], teachers: list[tuple],
                 **kw: Any) -> tuple[dict, dict, dict | None]:
    """(before, the trained student's score, the teachers' divergence from both students' answers).
    """
    after = score_records(final, None, records, **kw)
    kl = teacher_divergence(teachers, records, [before, after], trust=kw["trust"])
    after["loads"] = after.get("loads", []) + loads.taken()  # the teachers'
    return _public(before), _public(after), kl


def _public(score: dict) -> dict:
    """A score without the answers and top-k it carried for the teachers."""
    return {k: v for k, v in score.items() if k not in ("answers", "top")}


def score_records(model_path: str, revision: str | None, records: list[dict], *, max_len: int,
                  batch_size: int, trust: bool, answer_tokens: int = 0, seed: int = 0,
                  divergence: bool = False) -> dict:
    """{loglik: mean log-likelihood per response token of the records' responses under the model;
    rouge_l: mean ROUGE-L F1 of its greedy answers (answer_tokens at most) against them; self_ended:
    the share of those answers that ended by themselves; seconds: compute time; with `divergence`,
    answers and top: its greedy and sampled answers (temperature 1, seeded) and its top-k at each of
    their tokens, for the teachers to read (teacher_divergence); vocab_hash}."""
    import torch
    from transformers import AutoTokenizer

    from cascade.chat import prompt_ids, vocab_hash
    from cascade.cluster import cpu_threads
    from cascade.divergence import answer_top_k
    from cascade.modeling import load_model

    if not records:
        return {"loglik": None, "rouge_l": None, "self_ended": None, "conditioning": None,
                "seconds": 0.0, "loads": []}
    loads.process = "eval"
    model_path = local_model(model_path)  # pulled into this node's cache from an object store
    torch.set_num_threads(cpu_threads())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_path, revision=revision, trust_remote_code=trust)
    model = load_model(model_path, revision, trust_remote_code=trust).to(device).eval()
    t0, args = time.perf_counter(), (max_len, batch_size, device)
    out = {"loglik": _loglik(model, tok, [(r["messages"], r["response"]) for r in records], *args),
           "rouge_l": None, "self_ended": None, "vocab_hash": vocab_hash(tok)}
    swapped = mismatched(records)
    out["conditioning"] = (None if swapped is None
                           else out["loglik"] - _loglik(model, tok, swapped, *args))
    if answer_tokens:
        kinds = ("greedy", "sampled") if divergence else ("greedy",)
        answers = {how: _answers(model, tok, records, answer_tokens, batch_size, device,
                                 how == "sampled", seed)
                   for how in kinds}
        out["rouge_l"], out["self_ended"] = _text_agreement(tok, records, answers["greedy"])
    if answer_tokens and divergence:
        prompts = [prompt_ids(tok, r["messages"]) for r in records]
        out["answers"] = answers
        out["top"] = {how: answer_top_k(model, tok, prompts, a) for how, a in answers.items()}
    return {**out, "seconds": time.perf_counter() - t0, "loads": loads.taken()}


def _loglik(model: Any, tok: Any, pairs: list[tuple[list[dict], str]], max_len: int,
            batch_size: int, device: str) -> float:
    """Mean log-likelihood per response token of each (messages, response) under the model."""
    import torch

    from cascade.chat import collate, encode_example
    from cascade.modeling import response_nll

    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        batch = [encode_example(tok, m, r, max_len) for m, r in pairs[i : i + batch_size]]
        ids, labels, mask = collate(batch, tok.pad_token_id, device)
        with torch.no_grad():
            # the output layer applied in chunks: no [batch, tokens, vocab] tensor
            nll, _, n = response_nll(
                model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        total -= float(nll)
        count += n
    return total / max(1, count)


def mismatched(records: list[dict]) -> list[tuple[list[dict], str]] | None:
    """Each record's response after the next record's prompt that differs from its own (None when
    all prompts are one): what the log-likelihood of an answer owes to being asked its question."""
    n = len(records)
    out = []
    for i, r in enumerate(records):
        other = next((records[(i + k) % n] for k in range(1, n)
                      if records[(i + k) % n]["messages"] != r["messages"]), None)
        if other is None:
            return None
        out.append((other["messages"], r["response"]))
    return out


def _answers(model: Any, tok: Any, records: list[dict], max_new: int, batch_size: int, device: str,
             sample: bool = False, seed: int = 0) -> list[list[int]]:
    """The model's answers to the records' prompts (greedy, or sampled at temperature 1 seeded by
    `seed`), each up to and including its stop token (or max_new tokens long)."""
    import torch

    from cascade.chat import padded_ids, render_prompt, stop_token_ids

    stops, answers, padded = stop_token_ids(tok), [], padded_ids(model, tok)
    how = (dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample
           else dict(do_sample=False))
    tok.padding_side = "left"
    devices = [torch.cuda.current_device()] if device == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in range(0, len(records), batch_size):
            batch = records[i : i + batch_size]
            enc = tok([render_prompt(tok, r["messages"]) for r in batch], return_tensors="pt",
                      padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id, suppress_tokens=padded, **how)
            for seq in out[:, enc["input_ids"].shape[1]:].tolist():
                stop = next((k for k, t in enumerate(seq) if t in stops), None)
                answers.append(seq if stop is None else seq[: stop + 1])
    return answers


def _text_agreement(tok: Any, records: list[dict], answers: list[list[int]]) -> tuple[float, float]:
    """(mean ROUGE-L F1 of the answers against the records' responses, the share that ended by
    themselves)."""
    from cascade.chat import stop_token_ids

    stops, scores, ended = stop_token_ids(tok), [], 0
    for r, a in zip(records, answers, strict=True):
        done = bool(a) and a[-1] in stops
        ended += done
        scores.append(rouge_l(tok.decode(a[:-1] if done else a, skip_special_tokens=True),
                              r["response"]))
    return sum(scores) / len(scores), ended / len(records)


def teacher_divergence(teachers: list[tuple], records: list[dict], scores: list[dict],
                       trust: bool) -> dict | None:
    """For each score (before, after) and its greedy and sampled answers: the reverse KL(student ||
    teacher) per answer token, each teacher reading the answers after its own prompt (with its
    context: the kernel when the root teacher is built), teachers weighted as in generation; `cut` =
    1 - after / before. None without answers or teachers; {"skipped": why} when a teacher's
    tokenizer is not the student's."""
    import torch
    from transformers import AutoTokenizer

    from cascade.chat import prompt_ids, vocab_hash
    from cascade.divergence import reverse_kl
    from cascade.modeling import load_model

    if not records or not teachers or any("answers" not in s for s in scores):
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sums: dict[tuple[int, str], float] = {}
    for path, revision, weight, system in teachers:
        path = local_model(path)
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust)
        if vocab_hash(tok) != scores[0]["vocab_hash"]:
            return {"skipped": f"teacher {path}: its tokenizer is not the student's"}
        model = load_model(path, revision, trust_remote_code=trust).to(device).eval()
        prompts = [prompt_ids(tok, r["messages"], system) for r in records]
        for i, s in enumerate(scores):
            for how in ("greedy", "sampled"):
                total, n = reverse_kl(model, tok, prompts, s["answers"][how], s["top"][how])
                sums[i, how] = sums.get((i, how), 0.0) + weight * total / max(1, n)
        del model
    w = sum(t[2] for t in teachers)
    out: dict[str, Any] = {"metric": KL_METRIC}
    for how in ("greedy", "sampled"):
        before, after = sums[0, how] / w, sums[1, how] / w
        out[how] = {"before": before, "after": after,
                    "cut": 1 - after / before if before > 0 else None}
    return out

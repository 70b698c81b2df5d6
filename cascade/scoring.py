"""A model's score on held-out records: the evaluation's measures of one student (stages/evaluate.py
reads them before and after a stage's curriculum; training's rank 0 scores the stage's base and its
last fused model where they already are, cascade/trainer.py, and has the teachers read both
students' answers there too). What each measure means: stages/evaluate.py.

    score_records(path, revision, records, max_len=..., batch_size=..., trust=False)  # loads it
    score_model(model, tok, records, max_len=..., batch_size=...)  # a model in memory
"""

from __future__ import annotations

import time
from typing import Any

from cascade import loads
from cascade.metrics import rouge_l


def score_records(model_path: str, revision: str | None, records: list[dict], *, max_len: int,
                  batch_size: int, trust: bool, answer_tokens: int = 0, seed: int = 0,
                  divergence: bool = False, other_prompts: int = 1, samples: int = 1) -> dict:
    """score_model of the model at `model_path`, loaded for it (in an evaluation task)."""
    import torch
    from transformers import AutoTokenizer

    from cascade.cluster import cpu_threads
    from cascade.modeling import load_model
    from cascade.storage import local_model

    if not records:
        return {**score_model(None, None, records, max_len=max_len, batch_size=batch_size),
                "loads": []}
    loads.process = "eval"
    model_path = local_model(model_path)  # pulled into this node's cache from an object store
    torch.set_num_threads(cpu_threads())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_path, revision=revision, trust_remote_code=trust)
    model = load_model(model_path, revision, trust_remote_code=trust).to(device).eval()
    return {**score_model(model, tok, records, max_len=max_len, batch_size=batch_size,
                          answer_tokens=answer_tokens, seed=seed, divergence=divergence,
                          other_prompts=other_prompts, samples=samples),
            "loads": loads.taken()}


def score_model(model: Any, tok: Any, records: list[dict], *, max_len: int, batch_size: int,
                answer_tokens: int = 0, seed: int = 0, divergence: bool = False,
                other_prompts: int = 1, samples: int = 1) -> dict:
    """{loglik: mean log-likelihood per response token of the records' responses under the model;
    conditioning: that minus the same after up to `other_prompts` other records' prompts each
    (mismatched), and conditioning_records: each record's; rouge_l: mean ROUGE-L F1 of its greedy
    answers (answer_tokens at most) against them; self_ended: the share of those answers that
    ended by themselves; seconds: compute time; with `divergence`, answers and top: its greedy and
    sampled answers (temperature 1; `samples` rounds over the records, the j-th seeded by seed + j)
    and its top-k at each of their tokens, for the teachers to read (teacher_divergence);
    vocab_hash}."""
    from cascade.chat import prompt_ids, vocab_hash
    from cascade.divergence import answer_top_k

    if not records:  # nothing held out: no figure
        return {"loglik": None, "rouge_l": None, "self_ended": None, "conditioning": None,
                "seconds": 0.0}
    device = str(model.device.type)
    t0, args = time.perf_counter(), (max_len, batch_size, device)
    out = {"rouge_l": None, "self_ended": None, "vocab_hash": vocab_hash(tok)}
    out["loglik"], own = loglik(model, tok, [(r["messages"], r["response"]) for r in records],
                                *args)
    out["conditioning"], out["conditioning_records"] = conditioning(
        model, tok, records, out["loglik"], own, other_prompts, args)
    if answer_tokens:
        kinds = ("greedy", "sampled") if divergence else ("greedy",)
        answers = {how: [a for j in range(samples if how == "sampled" else 1)
                         for a in answers_to(model, tok, records, answer_tokens, batch_size,
                                             device, how == "sampled", seed + j)]
                   for how in kinds}
        out["rouge_l"], out["self_ended"] = text_agreement(tok, records, answers["greedy"])
    if answer_tokens and divergence:
        prompts = [prompt_ids(tok, r["messages"]) for r in records]
        out["answers"] = answers
        out["top"] = {how: answer_top_k(model, tok, each_answer(prompts, a), a)
                      for how, a in answers.items()}
    return {**out, "seconds": time.perf_counter() - t0}


def conditioning(model: Any, tok: Any, records: list[dict], mean: float, own: list[float],
                 k: int, args: tuple) -> tuple[float | None, list[float] | None]:
    """(what the records' responses owe to their own prompts: `mean`, their log-likelihood/token
    after them, minus the same after up to `k` other records' prompts each; each record's own
    figure, from `own`, its log-likelihood/token after its prompt); (None, None) when all prompts
    are one."""
    swapped = mismatched(records, k)
    if swapped is None:
        return None, None
    other, each = loglik(model, tok, [p for ps in swapped for p in ps], *args)
    per, at = [], 0
    for a, ps in zip(own, swapped, strict=True):  # each record's pairs are consecutive
        per.append(a - sum(each[at : at + len(ps)]) / len(ps))
        at += len(ps)
    return mean - other, per


def loglik(model: Any, tok: Any, pairs: list[tuple[list[dict], str]], max_len: int,
           batch_size: int, device: str) -> tuple[float, list[float]]:
    """(mean log-likelihood per response token of the (messages, response) pairs under the model,
    each pair's own mean per token)."""
    from cascade.chat import collate, encode_example
    from cascade.modeling import response_nll_rows

    sums, counts = [], []
    for i in range(0, len(pairs), batch_size):
        batch = [encode_example(tok, m, r, max_len) for m, r in pairs[i : i + batch_size]]
        ids, labels, mask = collate(batch, tok.pad_token_id, device)
        # the output layer applied in chunks: no [batch, tokens, vocab] tensor
        nll, n = response_nll_rows(model, {"input_ids": ids, "attention_mask": mask,
                                           "labels": labels})
        sums += nll
        counts += n
    return (-sum(sums) / max(1, sum(counts)),
            [-s / max(1, n) for s, n in zip(sums, counts, strict=True)])


def mismatched(records: list[dict], k: int = 1) -> list[list[tuple[list[dict], str]]] | None:
    """For each record, its response after each of the next `k` records' prompts that differ from
    its own (None when all prompts are one): what the log-likelihood of an answer owes to being
    asked its question."""
    from itertools import islice

    n, out = len(records), []
    for i, r in enumerate(records):  # the first k found: O(n k), not O(n^2), for many records
        others = list(islice((records[(i + j) % n]["messages"] for j in range(1, n)
                              if records[(i + j) % n]["messages"] != r["messages"]), k))
        if not others:
            return None
        out.append([(m, r["response"]) for m in others])
    return out


def answers_to(model: Any, tok: Any, records: list[dict], max_new: int, batch_size: int,
               device: str, sample: bool = False, seed: int = 0) -> list[list[int]]:
    """The model's answers to the records' prompts (greedy, or sampled at temperature 1 seeded by
    `seed`), each up to and including its stop token (or max_new tokens long)."""
    import torch

    from cascade.chat import padded_ids, render_prompt, stop_token_ids

    stops, answers, padded = stop_token_ids(tok), [], padded_ids(model, tok)
    how = (dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample
           else dict(do_sample=False))
    side, tok.padding_side = tok.padding_side, "left"
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
    tok.padding_side = side
    return answers


def text_agreement(tok: Any, records: list[dict], answers: list[list[int]]) -> tuple[float, float]:
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


def each_answer(prompts: list, answers: list) -> list:
    """The prompt of each answer: score_model's answers are rounds over the records' prompts
    (eval.samples of them for the sampled ones, one for the greedy)."""
    return prompts * (len(answers) // len(prompts))


def heldout_ready(rd: Any, sp: Any) -> bool:
    """Whether every phase's dataset, and so every held-out record, is committed (not while later
    phases' answers are made beside training: cascade/overlap.py)."""
    return all(rd.committed(ph.dataset) for ph in sp.phases)


def heldout_records(cfg: Any, rd: Any, sp: Any) -> list[dict]:
    """The stage's held-out records the evaluation scores (eval.max_probes of them at most)."""

    records = heldout(rd, sp)
    return records[: cfg.eval.max_probes] if cfg.eval.max_probes else records


def settings(cfg: Any) -> dict:
    """score_model's settings, from the config."""
    return dict(max_len=cfg.train.max_seq_len, batch_size=cfg.eval.batch_size,
                answer_tokens=cfg.eval.answer_tokens, seed=cfg.seed,
                divergence=cfg.eval.reverse_kl, other_prompts=cfg.eval.other_prompts,
                **({"samples": cfg.eval.samples} if cfg.eval.samples > 1 else {}))


# -- a stage's scores, made in the training workers where the models already are -----------------
def plan(rd: Any, stage: str, which: str, phase: int, key: str, records: list[dict],
         kw: dict, teachers: list[tuple] | None = None, base_key: str = "",
         trust: bool = False) -> dict:
    """What training's rank 0 needs to score a model of the stage as the evaluation would:
    `which` "before" (the stage's base as phase `phase`, the first, loaded it) or "after" (phase
    `phase`'s fused model, the stage's last, as its fusion check read it back); `key` the model's;
    the held-out records, score_model's settings, where to write it. An "after" plan with
    `teachers` (eval.reverse_kl) also has the teachers' divergence from both students made there
    (teacher_divergence), when rank 0 scored the base (`base_key`) too and each teacher fits in
    what its device has free: no evaluation task, its process and imports, then."""
    return {"which": which, "phase": phase, "records": records, "kw": kw,
            "file": rd.stage_score(stage, which), "stamp": _stamp(key, records, kw),
            "teachers": teachers or [], "trust": trust,
            "before": [rd.stage_score(stage, "before"), _stamp(base_key, records, kw)]}


def in_worker(plans: list[dict], rd: Any, phase: int, which: str, model: Any, tok: Any,
              device: Any) -> None:
    """Training's rank 0 with `model` in memory (moved to `device`): the plans for this phase and
    moment scored (score_model) and written for the evaluation, which then loads them no more;
    one already written (a phase resumed) is kept. "after" is written before its phase commits,
    so a committed last phase always has it."""
    for spec in plans:
        if (spec["phase"], spec["which"]) != (phase, which) or model is None:
            continue
        if (rd.read_json(spec["file"]) or {}).get("stamp") == spec["stamp"]:
            continue
        mode = model.training
        model.to(device).eval()
        score = score_model(model, tok, spec["records"], **spec["kw"])
        model.train(mode)
        _divergence_here(spec, rd, score, device)
        rd.write_json(spec["file"], {"stamp": spec["stamp"], "score": score})


def _divergence_here(spec: dict, rd: Any, score: dict, device: Any) -> None:
    """An "after" plan's teachers' divergence (spec["teachers"]) from the base's score rank 0 made
    and this one, into `score` with the teachers' loads; nothing when the base was scored
    elsewhere (an evaluation task beside training) or a teacher does not fit."""
    from cascade.storage import local_model

    before = rd.read_json(spec["before"][0]) or {}
    if not spec["teachers"] or "answers" not in score or before.get("stamp") != spec["before"][1]:
        return
    teachers = [(local_model(t[0]), *t[1:]) for t in spec["teachers"]]  # each pulled once
    if not all(_fits(t[0], device) for t in teachers):
        return
    phase_loads = loads.taken()  # the phase's, not yet taken: put back after
    score["divergence"] = teacher_divergence(teachers, spec["records"], [before["score"], score],
                                             spec["trust"], device)
    score["loads"] = loads.taken()
    loads.add(phase_loads)


def _fits(path: str, device: Any) -> bool:
    """Whether the model at `path` (its weights' bytes, 1.5x) fits in what `device` has free."""
    import psutil
    import torch

    need = 1.5 * loads.weight_bytes(path)
    if torch.device(device).type == "cuda":
        return need < torch.cuda.mem_get_info(device)[0]
    return need < psutil.virtual_memory().available


def taken(rd: Any, stage: str, which: str, key: str, records: list[dict],
          kw: dict) -> dict | None:
    """The score training's rank 0 made of the model `key` on these records with these settings
    ("before" or "after"), or None (none made, or made for another model, records or settings)."""
    got = rd.read_json(rd.stage_score(stage, which))
    return got["score"] if got and got.get("stamp") == _stamp(key, records, kw) else None


def _stamp(key: str, records: list[dict], kw: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps([key, records, kw], sort_keys=True).encode()).hexdigest()


def heldout(rd: Any, sp: Any) -> list[dict]:
    """A trained stage's held-out records (prompt messages, teachers' answer) from its committed
    datasets, each prompt once: what evaluate scores, the release checks its GGUF files on, the
    harness's cascade_probes task."""
    records, seen = [], set()
    for ph in sp.phases:
        for r in rd.read_jsonl(rd.dataset_file(sp.name, ph.name, "heldout")):
            if r["id"] not in seen:
                seen.add(r["id"])
                records.append(r)
    return records


KL_METRIC = ("reverse KL(student || teacher) per token of the student's own answers to the "
             "held-out prompts, the teacher with its context (nats; lower = closer), on the "
             "student's top-32 and the tail")


def teacher_divergence(teachers: list[tuple], records: list[dict], scores: list[dict],
                       trust: bool, device: Any = None) -> dict | None:
    """For each score (before, after) and its greedy and sampled answers: the reverse KL(student ||
    teacher) per answer token, each teacher reading the answers after its own prompt (with its
    context: the kernel when the root teacher is built), teachers weighted as in generation; `cut` =
    1 - after / before. None without answers or teachers; {"skipped": why} when a teacher's
    tokenizer is not the student's. Each teacher is loaded on `device` (default: the GPU if any),
    one at a time; the caller names the process its loads are recorded under (cascade/loads.py)."""
    import torch
    from transformers import AutoTokenizer

    from cascade.chat import prompt_ids, vocab_hash
    from cascade.divergence import reverse_kl
    from cascade.modeling import load_model
    from cascade.storage import local_model

    if not records or not teachers or any("answers" not in s for s in scores):
        return None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
                answers = s["answers"][how]
                total, n = reverse_kl(model, tok, each_answer(prompts, answers), answers,
                                      s["top"][how])
                sums[i, how] = sums.get((i, how), 0.0) + weight * total / max(1, n)
        del model
    w = sum(t[2] for t in teachers)
    out: dict[str, Any] = {"metric": KL_METRIC}
    for how in ("greedy", "sampled"):
        before, after = sums[0, how] / w, sums[1, how] / w
        out[how] = {"before": before, "after": after,
                    "cut": 1 - after / before if before > 0 else None}
    return out

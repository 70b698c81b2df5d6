"""Step 4 of a stage: student-teacher agreement on held-out prompts, before and after the curriculum.

    python -m cascade +stage=4b models=tiny       # writes <run_dir>/4b/eval/metrics.json

Agreement is the mean per-token log-likelihood (nats) of the teachers' held-out responses under the student,
averaged over all response tokens (<end_of_turn> included), prompt tokens masked exactly as in training. Higher is
closer; `after - before` is what the stage taught. The metrics file also gathers the loss of each phase and the
curation counts of each phase's dataset.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from cascade.config import Config
from cascade.plan import StagePlan
from cascade.rundir import RunDir, local_model

log = logging.getLogger(__name__)
METRIC = "mean per-token log-likelihood of held-out teacher responses under the student (nats; higher = closer)"


def start_before(cfg: Config, sp: StagePlan, rd: RunDir) -> Any:
    """Score the base student now, as a Ray task that runs while the curriculum trains; run() collects it."""
    return _scorer(cfg).options(name=f"eval/{sp.name}/before").remote(
        sp.base_model, sp.revision, _heldout(cfg, sp, rd), **_score_kwargs(cfg))


def _scorer(cfg: Config) -> Any:
    return ray.remote(num_cpus=cfg.backend.num_cpus, num_gpus=cfg.backend.num_gpus)(score_records)


def _score_kwargs(cfg: Config) -> dict:
    return dict(max_len=cfg.train.max_seq_len, batch_size=cfg.eval.batch_size, trust=cfg.models.trust_remote_code)


def _heldout(cfg: Config, sp: StagePlan, rd: RunDir) -> list[dict]:
    records, seen = [], set()
    for ph in sp.phases:
        for r in rd.read_jsonl(rd.dataset_file(sp.name, ph.name, "heldout")):
            if r["id"] not in seen:
                seen.add(r["id"])
                records.append(r)
    return records[: cfg.eval.max_probes] if cfg.eval.max_probes else records


def run(staging: str, cfg: Config, sp: StagePlan, rd: RunDir, before_ref: Any = None) -> dict:
    records = _heldout(cfg, sp, rd)
    if before_ref is None:
        before_ref = start_before(cfg, sp, rd)
    after_ref = _scorer(cfg).options(name=f"eval/{sp.name}/after").remote(sp.final_model, None, records,
                                                                          **_score_kwargs(cfg))
    (before, t_before), (after, t_after) = ray.get([before_ref, after_ref])
    metrics = {
        "stage": sp.name,
        "student": sp.final_model,
        "base_model": sp.base_model,
        "teachers": [{"stage": t.name, "weight": t.weight, "key": t.key} for t in sp.teachers],
        "agreement": {"metric": METRIC, "records": len(records), "before": before, "after": after,
                      "delta": None if before is None or after is None else after - before},
        "phases": {},
        "curation": {},
        "compute_seconds": t_before + t_after,
    }
    for ph in sp.phases:
        t = rd.committed(ph.model)["summary"]
        metrics["phases"][ph.name] = {k: t[k] for k in ("loss_first", "loss_last", "loss_mean_last", "steps",
                                                        "tokens", "tokens_per_s", "seconds", "train_seconds")}
        metrics["curation"][ph.name] = rd.committed(ph.dataset)["summary"]["counts"]
    rd.write_json(f"{staging}/metrics.json", metrics)
    log.info("stage %s agreement: before %.4f after %.4f", sp.name, before or float("nan"), after or float("nan"))
    return {"agreement_before": before, "agreement_after": after, "records": len(records)}


def score_records(model_path: str, revision: str | None, records: list[dict], *, max_len: int, batch_size: int,
                  trust: bool) -> tuple[float | None, float]:
    """(mean log-likelihood per response token of the records' responses under the model, compute seconds)."""
    import torch
    from transformers import AutoTokenizer

    from cascade.chat import collate, encode_example
    from cascade.cluster import cpu_threads
    from cascade.modeling import load_model, response_nll

    if not records:
        return None, 0.0
    model_path = local_model(model_path)  # pulled into this node's cache from an object store
    torch.set_num_threads(cpu_threads())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_path, revision=revision, trust_remote_code=trust)
    model = load_model(model_path, revision, trust_remote_code=trust).to(device).eval()
    total, count, t0 = 0.0, 0, time.perf_counter()
    for i in range(0, len(records), batch_size):
        batch = [encode_example(tok, r["messages"], r["response"], max_len) for r in records[i : i + batch_size]]
        ids, labels, mask = collate(batch, tok.pad_token_id, device)
        with torch.no_grad():  # the output layer applied in chunks: no [batch, tokens, vocab] tensor
            nll, _, n = response_nll(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        total -= float(nll)
        count += n
    return total / max(1, count), time.perf_counter() - t0



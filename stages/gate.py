"""Step 5 of a stage: the promotion gate - a trained student teaches the next stage only if its
held-out evaluation (stages/evaluate.py) says it carries its teachers' alignment.

    python -m cascade +stage=4b models=tiny          # writes <run_dir>/4b/gate/verdict.json
    python -m cascade +stage=4b models=tiny gate.min_gain=0.5     # a stricter gate: re-runs only it

Criteria (the `gate:` section, cascade/config.py GateConfig), each recorded with its value and
threshold:
    agreement     log-likelihood/token of the teachers' held-out answers rose by >= gate.min_gain
    self_ended    the share of the student's greedy answers ending by themselves >= min_self_ended
    conditioning  what the teachers' held-out answers owe to their own prompts (log-likelihood/token
                  after their prompt minus after others') rose by >= gate.min_conditioning_gain:
                  answers learnt without their questions (shuffled among prompts) lower it
    conditioning_share  the conditioning's gain over the agreement's >= min_conditioning_share
                  (where the agreement rose): the share of what the student learnt that it owes to
                  the questions, comparable from stage to stage where an absolute gain is not
    conditioning_z  with gate.min_conditioning_z: the held-out records' conditioning gains (each
                  record's after - before) stand >= it standard errors above 0: a gain the
                  student's luck on a few records cannot make (needs enough held-out records)
    reverse_kl    the reverse KL(student || teachers) per token on the student's sampled answers
                  rose by at most gate.max_kl_rise (a share of before); where measured
                  (eval.reverse_kl)
    harness_drop  with gate.max_harness_drop: on the release's harness tasks (release.harness,
                  run by the evaluation on the student and each teacher), no teacher ahead of the
                  student by more than it on any metric
A measured criterion that fails: REJECT. None failed but the agreement could not be measured (no
held-out records): HOLD. Otherwise PROMOTE. Only a promoted student teaches: with gate.enforce (the
default) a stage whose teacher was not promoted stops before generating (exit 2, naming the stage,
the criterion and its figures; `cascade status` and the report show the verdict); gate.enforce=false
lets it through, and the verdict, the report and the model card say so.

The verdict is a step of its own (<stage>/gate/verdict.json), made from committed bytes only: it
carries the sha256 of the student's weights, of the evaluation and of its held-out data, the
thresholds, and the sha256 of each teacher's own verdict (a root teacher used as is: its weights'
identity) - a ledger from the root teacher up. Its key is the evaluation's, the thresholds and the
teachers' verdicts': a changed threshold re-runs the gate alone, never training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

from cascade.graph import Context, RunGraph, StageGraph, Work
from cascade.rundir import RunDir, Step
from cascade.scoring import heldout
from cascade.steps import Made

log = logging.getLogger(__name__)
VERDICT = "verdict.json"


class NotPromoted(Exception):
    """A stage's teacher was not promoted by its gate (gate.enforce): the stage does not start."""


def run(ctx: Context, w: Work, todo: list[Step]) -> dict[str, Made]:
    sp, rd = w.stage, ctx.rd
    staging = rd.staging(sp.gate.name)
    verdict = judge(ctx.cfg.gate, rd.read_json(rd.metrics(sp.name)) or {})
    verdict.update(stage=sp.name, enforce=ctx.cfg.gate.enforce,
                   thresholds=dataclasses.asdict(ctx.cfg.gate), ledger=ledger(ctx.graph, sp))
    rd.write_json(f"{staging}/{VERDICT}", verdict)
    (log.info if verdict["verdict"] == "PROMOTE" else log.warning)(
        "stage %s gate: %s%s", sp.name, verdict["verdict"],
        "".join(f"; {r}" for r in verdict["reasons"]))
    return {sp.gate.name: Made({"verdict": verdict["verdict"], "reasons": verdict["reasons"],
                                "enforce": verdict["enforce"]}, staging)}


def cost(est: Any, w: Work, todo: list[Step]) -> list[dict]:
    """Reads the evaluation's figures: no model, no accelerator."""
    return [est.row(w.stage.gate.name, "gate", w.stage.name, est.arch[w.stage.name], 0, {}, {}, 0,
                    "", 0.0)]


def judge(gate: Any, metrics: dict) -> dict:
    """{verdict, reasons, criteria: [{name, value, threshold, op, passed}]} from a stage's
    metrics.json (a criterion not measured: value None, passed None)."""
    agreement = (metrics.get("agreement") or {}).get("delta")
    ended = (metrics.get("self_ended") or {}).get("after")
    kl = ((metrics.get("reverse_kl") or {}).get("sampled") or {})
    rise = (kl["after"] / kl["before"] - 1 if kl.get("before") and kl.get("after") is not None
            else None)
    conditioning = (metrics.get("conditioning") or {}).get("delta")
    z = (metrics.get("conditioning") or {}).get("z")
    share = conditioning / agreement if conditioning is not None and (agreement or 0) > 0 else None
    criteria = [_criterion("agreement", agreement, ">=", gate.min_gain),
                _criterion("conditioning", conditioning, ">=", gate.min_conditioning_gain),
                _criterion("conditioning_share", share, ">=", gate.min_conditioning_share),
                *([_criterion("conditioning_z", z, ">=", gate.min_conditioning_z)]
                  if gate.min_conditioning_z is not None else []),
                _criterion("self_ended", ended, ">=", gate.min_self_ended),
                _criterion("reverse_kl_rise", rise, "<=", gate.max_kl_rise)]
    if gate.max_harness_drop is not None:
        criteria.append(_criterion("harness_drop", harness_drop(metrics.get("harness")), "<=",
                                   gate.max_harness_drop))
    failed = [c for c in criteria if c["passed"] is False]
    reasons = [f"{c['name']} {c['value']:.4g} is not {c['op']} {c['threshold']:.4g}"
               for c in failed]
    if failed:
        verdict = "REJECT"
    elif agreement is None:
        verdict, reasons = "HOLD", ["agreement not measured (no held-out records)"]
    else:
        verdict = "PROMOTE"
    return {"verdict": verdict, "reasons": reasons, "criteria": criteria}


def harness_drop(harness: dict | None) -> float | None:
    """The largest lead of any teacher over the student on the harness tasks' metrics (None: not
    run)."""
    from cascade.harness import lead

    results = (harness or {}).get("results") or {}
    student = results.get("student")
    leads = [lead(student, r) for k, r in results.items() if k != "student" and student]
    leads = [x for x in leads if x is not None]
    return max(leads) if leads else None


def _criterion(name: str, value: float | None, op: str, threshold: float) -> dict:
    passed = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "passed": passed}


def ledger(g: RunGraph, sp: StageGraph) -> dict:
    """What the verdict is about, by content: the student's weights, the evaluation and its held-out
    data, and each teacher's verdict (a root teacher used as is: the identity of its weights)."""
    rd = g.rd
    files = (rd.committed(sp.phases[-1].model) or {}).get("files") or {}
    weights = {k: v[1] for k, v in files.items() if k.endswith(".safetensors")}
    teachers = []
    for t in sp.teachers:
        gate = gate_step(g, t.name)
        rec = rd.committed(gate) if gate else None
        teachers.append({"stage": t.name, "weights_key": t.key} if gate is None else
                        {"stage": t.name, "verdict": (rec or {}).get("summary", {}).get("verdict"),
                         "verdict_sha256": _sha(rd, gate, VERDICT)})
    return {"student": sp.phases[-1].model.name,  # its step: the same wherever the run lives
            # one file's sha256, or that of the {file: sha256} of a sharded model
            "weights_sha256": (next(iter(weights.values())) if len(weights) == 1
                               else _sha256_json(weights)),
            "metrics_sha256": _sha(rd, sp.eval, "metrics.json"),
            "heldout_sha256": _sha256_json(heldout(rd, sp)),
            "teachers": teachers}


def _sha256_json(x: Any) -> str:
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()


def _sha(rd: RunDir, step: Step, name: str) -> str | None:
    rec = rd.committed(step) or {}
    return ((rec.get("files") or {}).get(name) or [None, None])[1]


def gate_step(g: RunGraph, stage: str) -> Step | None:
    """The gate of the stage named `stage` in this plan (None: a teacher used as is)."""
    return next((sp.gate for sp in g.stages if sp.name == stage), None)


def require_promoted(g: RunGraph, sp: StageGraph, committed_only: bool = False) -> None:
    """Raise NotPromoted when a teacher of `sp` was not promoted by its gate and gate.enforce holds
    (committed_only: a gate not yet committed is passed over - before Ray, the driver checks what it
    can). With gate.enforce=false, say that it teaches anyway."""
    for t in sp.teachers:
        gate = gate_step(g, t.name)
        if gate is None:
            continue
        rec = g.rd.committed(gate)
        if rec is None:
            if committed_only:
                continue
            raise NotPromoted(f"stage {sp.name}: its teacher {t.name} has no gate verdict")
        summary = rec["summary"]
        if summary["verdict"] == "PROMOTE":
            continue
        why = f"{summary['verdict']}: {'; '.join(summary['reasons'])}"
        if not g.cfg.gate.enforce:
            log.warning("stage %s: teacher %s was not promoted (%s); it teaches anyway "
                        "(gate.enforce=false)", sp.name, t.name, why)
            continue
        raise NotPromoted(f"stage {sp.name} not started: its teacher, stage {t.name}, was not "
                          f"promoted by its gate ({why}; {g.rd.gate(t.name)}/{VERDICT}). "
                          "Fix that stage (or its gate's thresholds) and re-run; "
                          "gate.enforce=false lets it teach anyway")

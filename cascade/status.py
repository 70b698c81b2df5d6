"""`python -m cascade status +stage=4b [--json]`: where a run stands, read-only, from any machine
that can read its run directory (a filesystem or an object store), while it runs or after.

    python -m cascade status +stage=27b run_dir=s3://bucket/cascade  # the same overrides as the run

One row per planned step of the target (cascade.graph: the keys a re-run would use): its state -
done (committed with this key), running (the manifest says so and the run's driver is alive:
cascade.lease.holder), stopped (the manifest says running but no driver holds the run: killed,
pre-empted), failed (with its error), pending -, its key, elapsed time, progress (shards done/total,
optimizer step/iters: cascade/progress.py, or the shards already on disk) and an ETA from the rate
measured since the step (re)started. Then each trained stage's agreement before/after, and the steps
a re-run would execute. Nothing here starts Ray, loads a model or writes to the run directory.
"""

from __future__ import annotations

import json
import time
from typing import Any

from cascade import loads
from cascade.config import Config
from cascade.lease import holder
from cascade.graph import RunGraph, build_graph
from cascade.progress import duration
from cascade.rundir import Step


def collect(cfg: Config) -> dict:
    p = build_graph(cfg, weights=False)
    rd, now = p.rd, time.time()
    steps = rd.manifest()["steps"]
    driver = holder(rd, cfg.lease_ttl_s)
    shards = {j.step.name: (j, j.shards(len(p.prompts[j.data]))) for sp in p.stages
              for j in sp.gen_jobs}
    rows = [_row(p, s, steps.get(s.name, {}), driver is not None, shards.get(s.name), now)
            for s in p.steps()]
    agreement, reverse_kl, gate = {}, {}, {}
    for sp in p.stages:
        if sp.gate and (rec := rd.committed(sp.gate)):
            gate[sp.name] = rec["summary"]  # verdict, reasons, enforce
        if sp.eval and rd.committed(sp.eval):
            m = rd.read_json(rd.metrics(sp.name)) or {}
            agreement[sp.name], reverse_kl[sp.name] = (m.get("agreement", {}),
                                                       m.get("reverse_kl") or {})
    weights = {s: loads.per_model(r) for s, r in loads.per_stage(p).items() if r}
    return {"run_dir": rd.url, "target": cfg.target, "time": now, "loads": weights,
            "driver": {k: driver[k] for k in ("host", "pid", "start")} if driver else None,
            "steps": rows, "agreement": agreement, "reverse_kl": reverse_kl, "gate": gate,
            "rerun_would_run": [r["step"] for r in rows if r["state"] != "done"]}


def _row(p: RunGraph, step: Step, entry: dict, alive: bool, gen: Any, now: float) -> dict:
    rd = p.rd
    entry = entry if entry.get("key") == step.key else {}
    row = {"step": step.name, "key": step.key, "state": "pending", "elapsed_s": None,
           "progress": None, "eta_s": None}
    if rec := rd.committed(step):
        # elapsed: the step's own measure (a phase's, a teacher's sets'), else the manifest's
        row["state"] = "done"
        s = rec.get("summary") or {}
        own = s.get("seconds") or (s.get("engine_start_s", 0) + s["generate_wall_s"]
                                   if "generate_wall_s" in s else 0)
        if own or (entry.get("state") == "done" and entry.get("started")):
            row["elapsed_s"] = own or entry["time"] - entry["started"]
        return row
    prog = rd.read_json(rd.progress(step.name))
    prog = prog if prog and prog.get("key") == step.key else None
    if entry.get("state") == "failed":
        row.update(state="failed", error=entry.get("error"))
    elif entry.get("state") == "running":
        row["state"] = "running" if alive else "stopped"
        row["elapsed_s"] = now - entry.get("started", entry["time"]) if alive else None
    if prog:
        row["progress"] = {"unit": prog["unit"], "done": prog["done"], "total": prog["total"]}
        rate = (prog["done"] - prog["start_done"]) / max(1e-9, prog["updated"] - prog["started"])
        if row["state"] == "running" and rate > 0:
            row["eta_s"] = (prog["total"] - prog["done"]) / rate
    elif gen is not None:
        # the shards already committed (a stopped or pending generation keeps them)
        job, total = gen
        done = sum(1 for i in range(total)
                   if rd.exists(rd.shard(job.teacher.name, job.data, job.step.key, i)))
        row["progress"] = {"unit": "shards", "done": done, "total": total}
    return row


def said(v: dict) -> str:
    """A gate's verdict in one line (stages/gate.py): VERDICT; its reasons; and when it is not
    PROMOTE, whether the stage teaches anyway (gate.enforce=false) or not."""
    text = v["verdict"] + "".join(f"; {r}" for r in v["reasons"])
    if v["verdict"] == "PROMOTE":
        return text
    return text + (" (teaches anyway: gate.enforce=false)" if not v["enforce"] else
                   " (does not teach)")


def render(st: dict) -> str:
    d = st["driver"]
    who = f"driver {d['host']} pid {d['pid']} running" if d else "no driver running"
    lines = [f"run {st['run_dir']} (target {st['target']}): {who}", ""]
    head = f"{'step':34} {'state':8} {'key':17} {'elapsed':>8} {'progress':>18} {'ETA':>8}"
    lines += [head, "-" * len(head)]
    for r in st["steps"]:
        pr = r["progress"]
        prog = f"{pr['done']}/{pr['total']} {pr['unit']}" if pr else "-"
        lines.append(f"{r['step']:34} {r['state']:8} {r['key']:17} {duration(r['elapsed_s']):>8} "
                     f"{prog:>18} "
                     f"{duration(r['eta_s']):>8}" + (f"  {r['error']}" if r.get("error") else ""))
    for stage, a in st["agreement"].items():
        if a:
            lines.append(f"\n{stage}: agreement with its teachers {a['before']:.3f} -> "
                         f"{a['after']:.3f} nats/token ({a['after'] - a['before']:+.3f})")
        k = st["reverse_kl"].get(stage, {}).get("sampled")
        if k:
            lines.append(f"{stage}: reverse KL to its teachers on its own sampled answers "
                         f"{k['before']:.3f} -> {k['after']:.3f} nats/token")
        if v := st["gate"].get(stage):
            lines.append(f"{stage}: gate {said(v)}")
    for stage, pm in st.get("loads", {}).items():
        lines.append(f"{stage}: weight loads: {loads.describe(pm)}")
    todo = st["rerun_would_run"]
    lines.append(f"\na re-run would execute {len(todo)} steps"
                 + (": " + ", ".join(todo) if todo else ""))
    return "\n".join(lines)


def main(cfg: Config, *flags: str) -> None:
    st = collect(cfg)
    print(json.dumps(st, indent=1) if "--json" in flags else render(st))

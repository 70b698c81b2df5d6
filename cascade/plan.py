"""Before launch: what a run will need and take. No Ray is started and no weights are loaded.

    python -m cascade +stage=27b plan=true  # 8 x H100-80GB unless found or given
    python -m cascade +stage=27b plan=true plan.gpus=16 plan.gpu=A100-80GB
    python -m cascade plan +stage=27b --json                           # the same, as JSON

For every step still to run (cascade.graph: the same table of steps and keys the driver runs; each
step's module under stages/ costs its own, with cascade/costs.py's arithmetic):
- parameters, from the model's config.json: shipped with the project for the presets' models
  (data/models/), read from a local directory or the HF cache otherwise;
- memory of a generation replica: weights (divided by tensor parallelism) and the KV cache (2 x kv
  heads x head_dim per token and layer; a sliding-window layer keeps at most the window) for one
  sequence at max_model_len at least, within backend.vllm.gpu_memory_utilization; what is left sets
  the concurrency;
- memory of a training worker: frozen weights (bf16 on GPU with train.bf16), the LoRA's parameters,
  gradients and Adam states (fp32: 16 bytes each), activations at max_seq_len (every layer's, or
  with gradient checkpointing each layer's input plus one layer's), the loss's logits chunk; FSDP
  divides weights and LoRA states by the workers; it fits within plan.headroom of a GPU. A placement
  that cannot fit is refused (exit 2) with the changes that would fit (gradient checkpointing, FSDP
  over more workers, tensor parallelism);
- prompts, samples and tokens: prompt tokens counted with the teacher's tokenizer when it is on this
  machine (the way the backends count them; estimated from characters otherwise), generated tokens
  at most samples x max_new_tokens, training token slots = steps x batch x grad_accum x max_seq_len;
- hours and GPU-hours: decoding reads the weights and the batch's KV cache at every step
  (plan.decode_efficiency of the GPU's bandwidth), training costs 4 (6 with recomputation) x params
  FLOPs per token at plan.train_mfu of its peak; a rate measured by a committed step of this run (or
  plan.measured_from) replaces the estimate, and plan.generate_tokens_per_s /
  plan.train_tokens_per_s replace both; plus plan.overhead_s per step.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from cascade import generation
from cascade.arch import Arch, model_config
from cascade.config import Config
from cascade.costs import OVERHEAD_S
from cascade.devices import Device, Measured, device
from cascade.graph import RunGraph, build_graph
from cascade.progress import duration
from cascade.rundir import RunDir
from stages import load as step_module

log = logging.getLogger("cascade.plan")


class Plan:
    """Every step still to run with what it needs and takes (each step module's `cost`, stages/,
    over the same table the driver runs: RunGraph.work); `problems` lists what cannot fit."""

    def __init__(self, p: RunGraph, dev: Device) -> None:
        cfg = self.cfg = p.cfg
        self.p, self.dev, self.rows, self.problems, self.toks, self.started = (
            p,
            dev,
            [],
            [],
            {},
            set(),
        )
        self.arch = {sp.name: Arch.of(model_config(cfg, sp.name)) for sp in p.stages}
        # the identity of each model this plan runs: a measured rate counts only for the same one
        self.keys = {f"t/{sp.name}": sp.base_key for sp in p.stages}
        self.keys |= {f"g/{j.teacher.name}": j.teacher.key for sp in p.stages for j in sp.gen_jobs}
        src = RunDir(cfg.plan.measured_from) if cfg.plan.measured_from else p.rd
        self.m = Measured.read(src, cfg.generation.max_new_tokens, dev)
        pending = set(p.pending())
        for w in p.work():
            todo = [s for s in w.steps if s.name in pending]
            if todo:
                self.rows += step_module(w.kind).cost(self, w, todo)

    def overhead(self, kind: str) -> float:
        return self.cfg.plan.overhead_s.get(kind,
                                            OVERHEAD_S["cpu" if self.dev.cpu else "gpu"][kind])

    def rate(self, given: dict, measured: dict, kind: str, who: str,
             estimate: Any) -> tuple[float, str]:
        """Given, else measured for this very model (the identity this plan has for it, on the kind
        of device planned for: Measured.read), else measured for the nearest such model in size,
        scaled by the parameters (time per token grows with them), else estimated."""
        if who in given:
            return given[who], "given"
        usable = [k for k in measured if k.removesuffix("-base") in self.arch
                  and self.m.model_key.get(f"{kind}/{k}") == self.keys.get(f"{kind}/{k}")]
        if who in usable:
            return measured[who], "measured"
        if usable:
            size = self.arch[who.removesuffix("-base")].params
            k = min((abs(self.arch[k.removesuffix("-base")].params - size), k) for k in usable)[1]
            return (measured[k] * self.arch[k.removesuffix("-base")].params / size,
                    f"measured ({k} on {self.dev.kind}, scaled by parameters)")
        return estimate(), "estimate"

    def row(self, step: str, kind: str, model: str, a: Arch, units: int, mem: dict, work: dict,
            rate: float,
             source: str, seconds: float, gpus: bool = True) -> dict:
        return {"step": step, "kind": kind, "model": model, "params": a.params, "units": units,
                "memory_gb": {k: round(v, 3) for k, v in mem.items()},
                "fits": not mem or not mem.get("limit") or mem["total"] <= mem["limit"],
                "work": work,
                "tokens_per_s": round(rate, 1), "rate_source": source, "hours": seconds / 3600,
                "gpu_hours": seconds / 3600 * units if gpus and not self.dev.cpu else 0.0}

    def shares(self) -> tuple[dict[str, float], int, bool]:
        """(the resources planned for: this machine's CPUs, or the GPUs planned and CPUs and custom
        resources not counted; the CPUs a training worker gets; whether the evaluation has CPUs of
        its own beside the workers), as the driver finds them on its cluster (cascade/driver.py)."""
        import math
        import os

        from cascade import cluster

        cfg, dev = self.cfg, self.dev
        extra = {k: math.inf for k in (*cfg.train.resources, *cfg.backend.resources)}
        totals = ({"CPU": float(cfg.cluster.num_cpus or os.cpu_count() or 1)} if dev.cpu
                  else {"CPU": math.inf, "GPU": float(dev.count)})
        totals |= extra | dict(cfg.cluster.resources)
        cpus = (cfg.train.cpus_per_worker
                or (cluster.share_cpus([int(totals["CPU"])], cfg.train.num_workers) if dev.cpu
                    else 1))
        return totals, cpus, totals["CPU"] - cpus * cfg.train.num_workers >= cfg.eval.num_cpus

    def divergence_in(self, sp: Any) -> str:
        """Where stage `sp`'s teachers read its students' answers (eval.reverse_kl), as its run
        decides (stages/train.py _scores, cascade/scoring.py): "training rank 0" when rank 0
        scores both students (the evaluation has no CPUs of its own and the stage does not
        overlap) and each teacher (1.5x its weights, one at a time) fits in what a training
        worker leaves of its device; else "evaluation task", which loads them (and the students
        rank 0 did not score) in a process of its own."""
        from cascade import overlap
        from cascade.costs import nbytes, train_memory
        from cascade.devices import GB

        cfg, dev, t = self.cfg, self.dev, self.cfg.train
        totals, cpus, spare = self.shares()
        if spare or overlap.stages(cfg, [sp], totals, cpus, spare):
            return "evaluation task"
        limit = dev.memory_gb * cfg.plan.headroom / (t.num_workers if dev.cpu else 1)
        left = limit - train_memory(self.arch[sp.name], t, dev, limit)["total"]
        need = max(1.5 * self.arch[x.name.removesuffix("-base")].params * nbytes("auto", dev) / GB
                   for x in sp.teachers)  # a built root's teacher: its base, "<stage>-base"
        return "training rank 0" if need <= left else "evaluation task"

    def overlapped(self) -> dict[str, float]:
        """Per stage whose first phases would train beside its teachers' answers to the other prompt
        sets (cascade/overlap.py, with the resources planned for: this machine's CPUs, or the GPUs
        planned and CPUs and custom resources not counted), the hours that saves: the shorter of
        the two sides."""
        from cascade import overlap

        cfg, (totals, cpus, spare) = self.cfg, self.shares()
        hours = {r["step"]: r["hours"] for r in self.rows}
        out = {}
        for sp in self.p.stages:
            if sp.name not in overlap.stages(cfg, [sp], totals, cpus, spare):
                continue
            lead, rest = overlap.split(sp)
            side = [j.step.name for j in sp.gen_jobs if j.data in rest] + [
                ph.dataset.name for ph in sp.phases if ph.data in rest]
            first = sum(hours.get(ph.model.name, 0.0) for ph in sp.phases[:lead])
            if saved := min(first, sum(hours.get(n, 0.0) for n in side)):
                out[sp.name] = saved
        return out

    def totals(self) -> dict:
        work = [r["work"] for r in self.rows]
        return {"hours": sum(r["hours"] for r in self.rows),
                "wall_hours": sum(r["hours"] for r in self.rows) - sum(self.overlapped().values()),
                "gpu_hours": sum(r["gpu_hours"] for r in self.rows),
                "generate_new_tokens_max": sum(w.get("max_new_tokens", 0) for w in work),
                "train_token_slots": sum(w.get("token_slots", 0) for w in work)}


def _count_problems(b: Plan) -> None:
    cfg, dev = b.cfg, b.dev
    if dev.cpu:
        return
    if cfg.train.use_gpu and cfg.train.num_workers > dev.count:
        b.problems.append(f"train.num_workers={cfg.train.num_workers} workers need a GPU each; "
                          f"{dev.count} GPUs")
    tp = generation.load(cfg.backend.name).tensor_parallel(cfg.backend.options)
    if cfg.generation.replicas * tp > dev.count:
        b.problems.append(f"generation.replicas={cfg.generation.replicas} x "
                          f"tensor_parallel_size={tp} GPUs; {dev.count} GPUs")


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def render(b: Plan) -> str:
    d = b.dev
    lines = [f"plan for +stage={b.cfg.target}: {d.count} x {d.kind} ({d.memory_gb:.0f} GB), "
             f"{d.source}; {len(b.rows)} steps to run", ""]
    head = (f"{'step':34} {'model':7} {'params':>7} {'units':>5} {'memory GB (per unit)':34} "
            f"{'fits':4}  work")
    lines += [head, "-" * len(head)]
    for r in b.rows:
        m = r["memory_gb"]
        mem = " + ".join(f"{v:.1f} {k}" for k,
                         v in m.items() if k not in ("total", "limit") and v >= 0.05)
        mem = f"{m['total']:.1f}/{m['limit']:.0f} ({mem})" if m.get("limit") else mem
        w = r["work"]
        if r["kind"] == "generate":
            work = (
                f"{w['prompts']} prompts, {w['samples']} samples, "
                f"{'' if w['prompt_tokens_exact'] else '~'}"
                f"{_fmt(w['prompt_tokens'])} prompt tok, <= {_fmt(w['max_new_tokens'])} new tok"
            )
        elif r["kind"] == "train":
            work = (
                f"{w['steps']} steps, {w['sequences']} seqs, {_fmt(w['token_slots'])} token slots"
            )
        else:
            work = ", ".join(f"{k} {v}" for k, v in w.items())
        rate = (f"; {_fmt(r['tokens_per_s'])} tok/s ({r['rate_source']}), "
                f"{duration(r['hours'] * 3600)}"
                if r["hours"] else "")
        lines.append(f"{r['step']:34} {r['model']:7} {_fmt(r['params']):>7} {r['units']:>5} "
                     f"{mem:34} {'yes' if r['fits'] else 'NO':4}  {work}{rate}")
    t = b.totals()
    lap = (f"{duration(t['wall_hours'] * 3600)} wall with the overlap of "
           f"{', '.join(b.overlapped())} (train.overlap), " if t["wall_hours"] < t["hours"] else "")
    lines += ["", f"total: {lap}{duration(t['hours'] * 3600)} wall (steps one after another), "
              f"{t['gpu_hours']:.1f} GPU-hours; <= {_fmt(t['generate_new_tokens_max'])} tokens to "
              f"generate, {_fmt(t['train_token_slots'])} to train"]
    lines += [f"does not fit: {p}" for p in b.problems]
    return "\n".join(lines)


def make(cfg: Config) -> Plan:
    b = Plan(build_graph(cfg, weights=False), device(cfg))
    _count_problems(b)
    return b


def main(cfg: Config, *flags: str) -> None:
    """`python -m cascade +stage=<s> plan=true [--json]`: print the budget; exit 2 when a step
    cannot fit."""
    b = make(cfg)
    if "--json" in flags:
        print(json.dumps({"target": cfg.target, "device": vars(b.dev), "steps": b.rows,
                          "totals": b.totals(), "problems": b.problems}, indent=1))
    else:
        print(render(b))
    if b.problems:
        sys.exit(2)

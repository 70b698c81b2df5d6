"""Before launch: what a run will need and take. No Ray is started and no weights are loaded.

    python -m cascade +stage=27b plan=true                             # 8 x H100-80GB unless found or given
    python -m cascade +stage=27b plan=true plan.gpus=16 plan.gpu=A100-80GB
    python -m cascade plan +stage=27b --json                           # the same, as JSON

For every step still to run (cascade.graph: the same steps and keys the run uses):
- parameters, from the model's config.json: shipped with the project for the presets' models (data/models/),
  read from a local directory or the HF cache otherwise;
- memory of a generation replica: weights (divided by tensor parallelism) and the KV cache (2 x kv heads x
  head_dim per token and layer; a sliding-window layer keeps at most the window) for one sequence at
  max_model_len at least, within backend.gpu_memory_utilization; what is left sets the concurrency;
- memory of a training worker: frozen weights (bf16 on GPU with train.bf16), the LoRA's parameters, gradients and
  Adam states (fp32: 16 bytes each), activations at max_seq_len (every layer's, or with gradient checkpointing
  each layer's input plus one layer's), the loss's logits chunk; FSDP divides weights and LoRA states by the
  workers; it fits within plan.headroom of a GPU. A placement that cannot fit is refused (exit 2) with the
  changes that would fit (gradient checkpointing, FSDP over more workers, tensor parallelism);
- prompts, samples and tokens: prompt tokens counted with the teacher's tokenizer when it is on this machine (the
  way the backends count them; estimated from characters otherwise), generated tokens at most samples x
  max_new_tokens, training token slots = steps x batch x grad_accum x max_seq_len;
- hours and GPU-hours: decoding reads the weights and the batch's KV cache at every step (plan.decode_efficiency
  of the GPU's bandwidth), training costs 4 (6 with recomputation) x params FLOPs per token at plan.train_mfu of
  its peak; a rate measured by a committed step of this run (or plan.measured_from) replaces the estimate, and
  plan.generate_tokens_per_s / plan.train_tokens_per_s replace both; plus plan.overhead_s per step.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import replace
from typing import Any

from cascade import gguf
from cascade.arch import Arch, model_config
from cascade.config import Config, TrainConfig
from cascade.devices import GB, Device, Measured, device
from cascade.graph import GenJob, RunGraph, StageGraph, build_graph
from cascade.progress import duration
from cascade.rundir import RunDir

log = logging.getLogger("cascade.plan")
LOSS_CHUNK_ROWS = 256  # cascade.modeling.LOSS_CHUNK: positions whose vocabulary logits exist at once
DECODE_STEP_S = 0.005  # per decode step beyond the model: scheduling, sampling, detokenizing (vLLM, batched)
OVERHEAD_S = {"gpu": {"generate": 120.0, "train": 60.0}, "cpu": {"generate": 5.0, "train": 10.0}}  # per step


# -- the steps --------------------------------------------------------------------------------------------------
def _nbytes(dtype: str, dev: Device) -> int:
    return 4 if dtype == "float32" or (dtype == "auto" and dev.cpu) else 2


def replica_memory(a: Arch, cfg: Config, dev: Device, nbytes: int, prompt_len: float) -> tuple[dict, int]:
    """GB per generation replica by part, its limit, and the sequences it decodes at once."""
    b, g = cfg.backend, cfg.generation
    seq = prompt_len + g.max_new_tokens
    if b.name == "vllm":
        tp, max_seqs = b.tensor_parallel_size, int(b.engine_kwargs.get("max_num_seqs", 256))
        mem = {"weights": a.params * nbytes / tp / GB, "runtime": 1.5 + max_seqs * a.vocab * 4 / GB,
               "kv_cache": a.kv_bytes(b.max_model_len, nbytes) / tp / GB,  # one sequence at max_model_len at least
               "limit": dev.memory_gb * b.gpu_memory_utilization}
        free = mem["limit"] - mem["weights"] - mem["runtime"]
        conc = max(0, min(max_seqs, int(free / (a.kv_bytes(seq, nbytes) / tp / GB))))
    else:
        conc = b.batch_size * g.n_samples
        mem = {"weights": a.params * nbytes / GB, "runtime": 0.5 + conc * a.vocab * 4 / GB,
               "kv_cache": conc * a.kv_bytes(seq, nbytes) / GB, "limit": dev.memory_gb * cfg.plan.headroom}
    mem["total"] = mem["weights"] + mem["runtime"] + mem["kv_cache"]
    return mem, conc


def train_memory(a: Arch, t: TrainConfig, dev: Device, limit: float) -> dict:
    """GB per training worker by part, and its limit."""
    nbytes = 2 if t.bf16 and not dev.cpu else 4
    shard = t.num_workers if t.strategy == "fsdp" else 1
    tokens = t.batch_size // t.num_workers * t.max_seq_len
    mem = {"weights": a.params * nbytes / shard / GB,
           "lora_states": a.lora_params(t.lora.r, t.lora.target_modules) * 16 / shard / GB,
           "activations": a.activation_bytes(tokens, nbytes, t.gradient_checkpointing) / GB,
           "logits": 3 * LOSS_CHUNK_ROWS * a.vocab * 4 / GB, "runtime": 0.0 if dev.cpu else 1.0}
    mem["total"] = sum(mem.values())
    mem["limit"] = limit
    return mem


def train_fixes(a: Arch, t: TrainConfig, dev: Device, limit: float) -> list[str]:
    """The overrides (fewest changes first) under which a training worker fits."""
    n = max(w for w in range(1, dev.count + 1) if t.batch_size % w == 0)  # the most workers the batch divides among
    gc, fsdp = {"gradient_checkpointing": True}, {"strategy": "fsdp", "num_workers": n}
    tries = ([gc] if not t.gradient_checkpointing else []) + ([fsdp] if n > 1 else [])
    tries += [{**gc, **fsdp}] if n > 1 and not t.gradient_checkpointing else []
    fits = []
    for change in tries:
        if train_memory(a, replace(t, **change), dev, limit)["total"] <= limit:
            fits.append(" ".join(f"train.{k}={str(v).lower()}" for k, v in change.items()))
    return fits


def _prompt_tokens(p: RunGraph, job: GenJob, cache: dict) -> tuple[int, bool]:
    """The prompt set's tokens as the backends count them (chat template, no extra specials), with the teacher's
    tokenizer when it is on this machine; else estimated at 4 characters a token (False)."""
    from cascade.chat import prompt_messages, render_prompt

    ps = p.prompts[job.data]
    tok = _tokenizer(p, job.teacher.name, job.teacher.model, cache)
    if tok is None:
        return int(sum(len(m["content"]) for pr in ps for m in pr.messages) / 4), False
    texts = [render_prompt(tok, prompt_messages(pr.messages, job.teacher.system)) for pr in ps]
    return sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]), True


def _tokenizer(p: RunGraph, teacher: str, model: str, cache: dict) -> Any:
    """The teacher's tokenizer from its directory, or (a stage trained in this run: not made yet) its stage's base
    model's, which training does not change; from the HF cache for a hub id; None when nowhere on this machine."""
    base = next((sp.base_model for sp in p.stages if sp.name == teacher.removesuffix("-base")), model)
    made = next((sp.phases[-1].model for sp in p.stages if sp.phases and sp.final_model == model), None)
    if made is not None and p.rd.committed(made) is None:  # not made yet, or made from another model: not its own
        model = base
    for src in dict.fromkeys((model, base)):
        if src not in cache:
            from transformers import AutoTokenizer

            try:
                cache[src] = AutoTokenizer.from_pretrained(src, local_files_only=True,
                                                           trust_remote_code=p.cfg.models.trust_remote_code)
            except (OSError, ValueError):
                cache[src] = None
        if cache[src] is not None:
            return cache[src]
    return None


class Plan:
    """Every step still to run with what it needs and takes; `problems` lists what cannot fit."""

    def __init__(self, p: RunGraph, dev: Device) -> None:
        cfg = self.cfg = p.cfg
        self.p, self.dev, self.rows, self.problems, self.toks, self.started = p, dev, [], [], {}, set()
        self.arch = {sp.name: Arch.of(model_config(cfg, sp.name)) for sp in p.stages}
        # the identity of each model this plan runs: a measured rate counts only for the same one
        self.keys = {f"t/{sp.name}": sp.base_key for sp in p.stages}
        self.keys |= {f"g/{j.teacher.name}": j.teacher.key for sp in p.stages for j in sp.gen_jobs}
        src = RunDir(cfg.plan.measured_from) if cfg.plan.measured_from else p.rd
        self.m = Measured.read(src, cfg.generation.max_new_tokens, dev)
        pending = set(p.pending())
        for sp in p.stages:
            for job in sp.gen_jobs:
                if job.step.name in pending:
                    pending.discard(job.step.name)  # a teacher's answers are shared by the stages that learn from it
                    self.rows.append(self._generate(job))
            self.rows += [self._curate(sp, ph) for ph in sp.phases if ph.dataset.name in pending]
            self.rows += [self._train(sp, ph) for ph in sp.phases if ph.model.name in pending]
            self.rows += [self._evaluate(sp)] if sp.eval and sp.eval.name in pending else []
            self.rows += [self._release(sp)] if sp.release and sp.release.name in pending else []

    def _generate(self, job: GenJob) -> dict:
        cfg, dev, g, b = self.cfg, self.dev, self.cfg.generation, self.cfg.backend
        who, a = job.teacher.name, self.arch[job.teacher.name.removesuffix("-base")]
        n = len(self.p.prompts[job.data])
        prompt_tokens, exact = _prompt_tokens(self.p, job, self.toks)
        nbytes, tp = _nbytes(b.dtype, dev), b.tensor_parallel_size if b.name == "vllm" else 1
        mem, conc = replica_memory(a, cfg, dev, nbytes, prompt_tokens / n)
        if mem["total"] > mem["limit"]:
            need = next((k for k in (2, 4, 8) if replica_memory(a, replace(cfg, backend=replace(
                b, tensor_parallel_size=k)), dev, nbytes, prompt_tokens / n)[0]["total"] <= mem["limit"] * k), 0)
            fix = f"backend.tensor_parallel_size={need}" if need and b.name == "vllm" else "a GPU with more memory"
            self.problems.append(f"{job.step.name}: a replica of {who} needs {mem['total']:.1f} GB, "
                                 f"{mem['limit']:.1f} GB available; would fit: {fix}")
        budget_new = n * g.n_samples * g.max_new_tokens
        fills = self.m.gen_fill
        fill = fills.get(who, sum(fills.values()) / len(fills) if fills else 1.0)  # measured share of max_new_tokens
        expected = int(budget_new * min(1.0, fill))
        ctx = prompt_tokens / n + g.max_new_tokens / 2
        rate, source = self._rate(cfg.plan.generate_tokens_per_s, self.m.gen_rate, "g", who,
                                  lambda: _decode_rate(a, dev, nbytes, tp, max(1, conc), ctx, cfg.plan))
        prefill = prompt_tokens * g.n_samples * 2 * a.text_params / (dev.tflops * 1e12 * tp * cfg.plan.train_mfu)
        # the engine starts once per teacher: its sets share one pool of replicas
        fixed = 0.0 if who in self.started else self.m.gen_start.get(who, self._overhead("generate"))
        self.started.add(who)
        seconds = (expected / rate + prefill) / g.replicas + fixed
        units = g.replicas * (tp if b.name == "vllm" else max(1, math.ceil(b.num_gpus)))  # GPUs, or replicas on CPU
        work = {"prompts": n, "samples": n * g.n_samples, "prompt_tokens": prompt_tokens,
                "prompt_tokens_exact": exact, "max_new_tokens": budget_new, "expected_new_tokens": expected,
                "concurrency": conc}
        return self._row(job.step.name, "generate", who, a, units, mem, work, rate, source, seconds)

    def _train(self, sp: StageGraph, ph: Any) -> dict:
        cfg, dev, t, a = self.cfg, self.dev, self.cfg.train, self.arch[sp.name]
        limit = dev.memory_gb * cfg.plan.headroom / (t.num_workers if dev.cpu else 1)
        mem = train_memory(a, t, dev, limit)
        if mem["total"] > limit:
            fixes = train_fixes(a, t, dev, limit)
            self.problems.append(
                f"{ph.model.name}: a training worker needs {mem['total']:.1f} GB ({t.strategy}, "
                f"gradient_checkpointing={t.gradient_checkpointing}), {limit:.1f} GB available; would fit: "
                + (" | ".join(fixes) if fixes else f"none on {dev.count} x {dev.memory_gb:.0f} GB: more GPUs, or "
                   "a smaller train.max_seq_len / train.batch_size"))
        seqs = ph.iters * t.batch_size * t.grad_accum
        flops = (6 if t.gradient_checkpointing else 4) * a.params
        rate, source = self._rate(cfg.plan.train_tokens_per_s, self.m.train_rate, "t", sp.name,
                                  lambda: t.num_workers * dev.tflops * 1e12 * cfg.plan.train_mfu / flops)
        seconds = seqs * t.max_seq_len / rate + self.m.train_fixed.get(sp.name, self._overhead("train"))
        work = {"steps": ph.iters, "sequences": seqs, "token_slots": seqs * t.max_seq_len}
        return self._row(ph.model.name, "train", sp.name, a, t.num_workers, mem, work, rate, source, seconds,
                         gpus=t.use_gpu)

    def _curate(self, sp: StageGraph, ph: Any) -> dict:
        """On the driver's CPU, seconds at most: the answers it filters (one teacher's per prompt)."""
        n = len(self.p.prompts[ph.data])
        work = {"prompts": n, "answers_at_most": n * self.cfg.generation.n_samples}
        return self._row(ph.dataset.name, "curate", sp.name, self.arch[sp.name], 0, {}, work, 0, "", 0.0)

    def _evaluate(self, sp: StageGraph) -> dict:
        held = sum(1 for ph in self.cfg.curriculum for p in self.p.prompts[ph.data] if p.heldout)
        work = {"heldout_prompts_at_most": held, "models_scored": 2}
        units = 2 * math.ceil(self.cfg.backend.num_gpus)
        return self._row(sp.eval.name, "evaluate", sp.name, self.arch[sp.name], units, {}, work, 0, "", 0.0)

    def _release(self, sp: StageGraph) -> dict:
        a = self.arch[sp.name]
        sizes = {t: round(a.params * gguf.BITS.get(t, 16) / 8 / GB, 2) for t in ["F16", *self.cfg.release.gguf]}
        # host memory: the float32 reference (transformers) and llama.cpp's F16 file, loaded together to compare
        mem = {"host_ram": a.params * (4 + 2) / GB, "limit": 0.0}
        work = {"gguf_gb": sizes, "probes": self.cfg.release.probes}
        return self._row(sp.release.name, "release", sp.name, a, 0, mem, work, 0, "", 0.0)

    def _overhead(self, kind: str) -> float:
        return self.cfg.plan.overhead_s.get(kind, OVERHEAD_S["cpu" if self.dev.cpu else "gpu"][kind])

    def _rate(self, given: dict, measured: dict, kind: str, who: str, estimate: Any) -> tuple[float, str]:
        """Given, else measured for this very model (the identity this plan has for it, on the kind of device
        planned for: Measured.read), else measured for the nearest such model in size, scaled by the parameters
        (time per token grows with them), else estimated."""
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

    def _row(self, step: str, kind: str, model: str, a: Arch, units: int, mem: dict, work: dict, rate: float,
             source: str, seconds: float, gpus: bool = True) -> dict:
        return {"step": step, "kind": kind, "model": model, "params": a.params, "units": units,
                "memory_gb": {k: round(v, 3) for k, v in mem.items()},
                "fits": not mem or not mem.get("limit") or mem["total"] <= mem["limit"], "work": work,
                "tokens_per_s": round(rate, 1), "rate_source": source, "hours": seconds / 3600,
                "gpu_hours": seconds / 3600 * units if gpus and not self.dev.cpu else 0.0}

    def totals(self) -> dict:
        return {"hours": sum(r["hours"] for r in self.rows), "gpu_hours": sum(r["gpu_hours"] for r in self.rows),
                "generate_new_tokens_max": sum(r["work"].get("max_new_tokens", 0) for r in self.rows),
                "train_token_slots": sum(r["work"].get("token_slots", 0) for r in self.rows)}


def _decode_rate(a: Arch, dev: Device, nbytes: int, tp: int, conc: int, ctx: float, plan: Any) -> float:
    """Tokens/s of one replica: a decode step reads the weights and every running sequence's KV cache (memory
    bound), or does 2 x params FLOPs per sequence (compute bound), whichever is slower."""
    read = (a.params * nbytes + conc * a.kv_bytes(ctx, nbytes)) / (dev.bandwidth_gbs * GB * plan.decode_efficiency * tp)
    compute = 2 * a.text_params * conc / (dev.tflops * 1e12 * tp * plan.train_mfu)
    return conc / (max(read, compute) + DECODE_STEP_S)


def _count_problems(b: Plan) -> None:
    cfg, dev = b.cfg, b.dev
    if dev.cpu:
        return
    if cfg.train.use_gpu and cfg.train.num_workers > dev.count:
        b.problems.append(f"train.num_workers={cfg.train.num_workers} workers need a GPU each; {dev.count} GPUs")
    tp = cfg.backend.tensor_parallel_size if cfg.backend.name == "vllm" else 1
    if cfg.generation.replicas * tp > dev.count:
        b.problems.append(f"generation.replicas={cfg.generation.replicas} x tensor_parallel_size={tp} GPUs; "
                          f"{dev.count} GPUs")


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def render(b: Plan) -> str:
    d = b.dev
    lines = [f"plan for +stage={b.cfg.target}: {d.count} x {d.kind} ({d.memory_gb:.0f} GB), {d.source}; "
             f"{len(b.rows)} steps to run", ""]
    head = f"{'step':34} {'model':7} {'params':>7} {'units':>5} {'memory GB (per unit)':34} {'fits':4}  work"
    lines += [head, "-" * len(head)]
    for r in b.rows:
        m = r["memory_gb"]
        mem = " + ".join(f"{v:.1f} {k}" for k, v in m.items() if k not in ("total", "limit") and v >= 0.05)
        mem = f"{m['total']:.1f}/{m['limit']:.0f} ({mem})" if m.get("limit") else mem
        w = r["work"]
        if r["kind"] == "generate":
            work = (f"{w['prompts']} prompts, {w['samples']} samples, {'' if w['prompt_tokens_exact'] else '~'}"
                    f"{_fmt(w['prompt_tokens'])} prompt tok, <= {_fmt(w['max_new_tokens'])} new tok")
        elif r["kind"] == "train":
            work = f"{w['steps']} steps, {w['sequences']} seqs, {_fmt(w['token_slots'])} token slots"
        else:
            work = ", ".join(f"{k} {v}" for k, v in w.items())
        rate = (f"; {_fmt(r['tokens_per_s'])} tok/s ({r['rate_source']}), {duration(r['hours'] * 3600)}"
                if r["hours"] else "")
        lines.append(f"{r['step']:34} {r['model']:7} {_fmt(r['params']):>7} {r['units']:>5} {mem:34} "
                     f"{'yes' if r['fits'] else 'NO':4}  {work}{rate}")
    t = b.totals()
    lines += ["", f"total: {duration(t['hours'] * 3600)} wall (steps one after another), "
              f"{t['gpu_hours']:.1f} GPU-hours; "
              f"<= {_fmt(t['generate_new_tokens_max'])} tokens to generate, {_fmt(t['train_token_slots'])} to train"]
    lines += [f"does not fit: {p}" for p in b.problems]
    return "\n".join(lines)


def make(cfg: Config) -> Plan:
    b = Plan(build_graph(cfg, weights=False), device(cfg))
    _count_problems(b)
    return b


def main(cfg: Config, *flags: str) -> None:
    """`python -m cascade +stage=<s> plan=true [--json]`: print the budget; exit 2 when a step cannot fit."""
    b = make(cfg)
    if "--json" in flags:
        print(json.dumps({"target": cfg.target, "device": vars(b.dev), "steps": b.rows, "totals": b.totals(),
                          "problems": b.problems}, indent=1))
    else:
        print(render(b))
    if b.problems:
        sys.exit(2)

"""Step 3 of a stage: the sandwich curriculum, each phase a LoRA trained by Ray Train and fused into the weights.

    python -m cascade +stage=4b models=tiny train.num_workers=1

One TorchTrainer job per stage runs the phases not yet committed, in order (one job, not one per phase: a Ray
Train start costs ~12 s here). Per phase, every worker: loads the previous phase's fused model (the stage's base
model for P0), wraps it in a PEFT LoRA (all linear layers by default), trains `iters` optimizer steps with loss
on response tokens only (prompt tokens masked), then rank 0 merges the adapter into the weights and commits the
fused model (a plain HF directory: config.json, safetensors, tokenizer, chat template) by renaming it into place,
once stages/fuse.py has shown that the saved model's logits equal base + adapter on held-out prompts.
The driver records each committed phase in the manifest. Every train.save_every optimizer steps the workers
write a checkpoint (cascade/checkpoints.py: adapter, optimizer, scheduler, RNG states, data position); after a
kill of the driver (the same command again) or of a worker (Ray Train restarts the group, train.max_failures
times) the phase resumes from the newest one and ends with the same adapter as a run never stopped (bitwise on
CPU).

Data order: optimizer step s, micro-step m, global row j reads sample perm_e[(s*accum + m)*B + j mod N], where
B = train.batch_size (global) and perm_e is the permutation of epoch e drawn from (seed, phase); worker r of W
takes rows [r*B/W, (r+1)*B/W). The order is the same for any worker count, so W is a resource, not an identity.
With train.strategy=fsdp the model is sharded (FSDP2, one unit per decoder layer) instead of replicated; at the
end of a phase the adapter is gathered whole and rank 0 fuses it into a freshly loaded base.

With train.distill_weight > 0 the loss adds, at every response token, the cross-entropy of the student's
distribution against the teacher's stored top-k distribution (renormalised over its k tokens); the response is
then the teacher's own sampled tokens, so that positions line up (curate checked the tokenizers match).

The loop is written by hand (about 60 lines) rather than TRL's SFTTrainer: the data order above must not depend
on the worker count, each phase must fuse and commit inside the same Ray Train job, and a Trainer's set-up
per phase costs more than the tiny phases themselves on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import ray

from cascade.config import Config
from cascade.driver import StagePlan
from cascade.rundir import RunDir

log = logging.getLogger(__name__)


def run(rd: RunDir, cfg: Config, sp: StagePlan) -> None:
    """Train the phases of `sp` that are not committed (driver side)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    todo = []
    for ph in sp.phases:
        name = f"{sp.name}/train/{ph.name}"
        rec = rd.committed(ph.path, ph.key)
        if rec is not None and not todo:
            log.info("[skip] %s (committed, key %s)", name, ph.key)
            rd.mark(name, "done", key=ph.key, path=ph.path, summary=rec["summary"])
        else:
            todo.append(ph)
            rd.mark(name, "running", key=ph.key, path=ph.path)
    if not todo:
        return
    first = todo[0].index
    start_model = sp.phases[first - 1].path if first > 0 else sp.base_model
    t = cfg.train
    loop_config = {
        "stage": sp.name,
        "run_dir": rd.url,
        "start_model": start_model,
        "revision": sp.revision if first == 0 else None,
        "phases": [
            {"index": p.index, "name": p.name, "iters": p.iters, "lr": p.lr, "key": p.key, "path": p.path,
             "data": f"{p.dataset_path}/train.jsonl"}
            for p in todo
        ],
        "train": dataclasses.asdict(t),
        "seed": cfg.seed,
        "trust_remote_code": cfg.models.trust_remote_code,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
        ),
        run_config=RunConfig(name=f"{sp.name}-{todo[0].key}", storage_path=rd.path(sp.name, "train", "_work"),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
    trainer.fit()
    for ph in todo:
        rec = rd.committed(ph.path, ph.key)
        if rec is None:
            raise RuntimeError(f"{sp.name}/train/{ph.name}: training ended without committing {ph.path}")
        rd.mark(f"{sp.name}/train/{ph.name}", "done", key=ph.key, path=ph.path, summary=rec["summary"])


# -- the worker loop ----------------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cascade.chat import encode_example
    from cascade.checkpoints import Checkpoints, full_adapter, fully_shard_model
    from cascade.generation.backend import cpu_threads
    from cascade.packing import collate_packed, pack

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cpu_threads())
    t = config["train"]
    rd = RunDir(config["run_dir"])
    device = ray.train.torch.get_device()
    dtype = torch.bfloat16 if (t["bf16"] and device.type == "cuda" and torch.cuda.is_bf16_supported()) else torch.float32
    model_path, revision = config["start_model"], config["revision"]
    tok = AutoTokenizer.from_pretrained(model_path, revision=revision, trust_remote_code=config["trust_remote_code"])

    for ph in config["phases"]:
        if rd.committed(ph["path"], ph["key"]):  # committed before a worker restart
            model_path, revision = ph["path"], None
            continue
        t0 = time.time()
        seed = config["seed"] * 1_000 + ph["index"]
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(
            model_path, revision=revision, dtype=dtype, use_safetensors=True,
            trust_remote_code=config["trust_remote_code"],
        )
        mcfg = model.config
        if t["gradient_checkpointing"]:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        lcfg = t["lora"]
        targets = lcfg["target_modules"]
        lora = LoraConfig(r=lcfg["r"], lora_alpha=lcfg["alpha"], lora_dropout=lcfg["dropout"], task_type="CAUSAL_LM",
                          target_modules="all-linear" if targets == ["all-linear"] else targets)
        model = get_peft_model(model, lora)
        distill = t["distill_weight"]
        examples = _load_examples(rd, ph["data"], tok, t["max_seq_len"], encode_example, distill > 0)
        lengths = [len(e["input_ids"]) for e in examples]
        units = pack(lengths, t["max_seq_len"]) if t["packing"] else [[i] for i in range(len(examples))]
        fsdp = t["strategy"] == "fsdp"
        # DDP when world > 1, or FSDP2 (each decoder layer sharded; the optimizer then sees the shards)
        model = fully_shard_model(model, device) if fsdp else ray.train.torch.prepare_model(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ph["lr"],
                                weight_decay=t["weight_decay"])
        warm = max(1, t["warmup_steps"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        ckpt = Checkpoints(rd, config["stage"], ph, t["keep_checkpoints"], rank, fsdp)
        state = ckpt.restore(model, opt, sched)  # mid-phase resume: adapter, optimizer, scheduler, RNG, position
        order = _Order(len(units), seed)
        board = _Board(rd, config["stage"], ph["name"]) if rank == 0 else None
        t_loop = time.time()
        b, accum = t["batch_size"] // world, t["grad_accum"]  # batch_size is global: the same order on any world
        losses, kd_losses, real, slots = state["losses"], state.get("distill_losses", []), 0, 0
        model.train()
        for step in range(state["step"], ph["iters"]):
            step_loss = step_kd = 0.0
            for m in range(accum):
                base = (step * accum + m) * b * world
                rows = [[examples[i] for i in units[order[base + rank * b + j]]] for j in range(b)]
                batch = collate_packed(rows, tok.pad_token_id, getattr(mcfg, "layer_types", None),
                                       getattr(mcfg, "sliding_window", None), device)
                out = model(**{k: batch[k] for k in ("input_ids", "labels", "position_ids", "attention_mask")})
                loss = out.loss
                if distill > 0:
                    kd = distill_loss(out.logits, batch["labels"], batch["kd_ids"], batch["kd_lp"])
                    loss = loss + distill * kd
                    step_kd += kd.item() / accum
                (loss / accum).backward()
                step_loss += loss.item() / accum
                real, slots = real + batch["real_tokens"], slots + batch["slots"]
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["max_grad_norm"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
            if distill > 0:
                kd_losses.append(step_kd)
            if rank == 0 and state["step"] and step == state["step"]:  # first new step after a resume
                rd.write_json(f"{ckpt.dir}/resumed.json", {"step": step + 1, "time": time.time()})
            if board:
                board.log(step, step_loss, sched.get_last_lr()[0], real * world / (time.time() - t_loop), ph["index"])
            if t["save_every"] and (step + 1) % t["save_every"] == 0 and step + 1 < ph["iters"]:
                ckpt.save(model, opt, sched, step + 1, losses, state["tokens"] + real * world, world, kd_losses)
        seconds, train_seconds = time.time() - t0, time.time() - t_loop
        if board:
            board.close()
        summary = {
            "phase": ph["name"], "steps": ph["iters"], "loss_first": losses[0], "loss_last": losses[-1],
            "loss_mean_last": sum(losses[-5:]) / len(losses[-5:]), "losses": losses, "examples": len(examples),
            "tokens": state["tokens"] + real * world, "seconds": seconds, "train_seconds": train_seconds,
            "tokens_per_s": real * world / train_seconds, "real_token_fraction": real / max(1, slots),
            "packing": t["packing"], "workers": world, "resumed_from_step": state["step"],
        }
        if distill > 0:
            summary.update(distill_weight=distill, distill_losses=kd_losses, distill_loss_first=kd_losses[0],
                           distill_loss_last=kd_losses[-1])
        if fsdp:  # rank 0 rebuilds base + adapter whole: the adapter gathered from its shards, the base reloaded
            adapter = full_adapter(model)
            if rank == 0:
                model = AutoModelForCausalLM.from_pretrained(model_path, revision=revision, dtype=dtype,
                                                             use_safetensors=True,
                                                             trust_remote_code=config["trust_remote_code"])
                model = get_peft_model(model, lora).to(device)
                missing = set(adapter) - set(model.state_dict())
                if missing:
                    raise RuntimeError(f"FSDP adapter keys not in the rebuilt model: {sorted(missing)[:3]}")
                model.load_state_dict(adapter, strict=False)
        if rank == 0:
            heldout = ph["data"].replace("train.jsonl", "heldout.jsonl")
            probe = _load_examples(rd, heldout, tok, t["max_seq_len"], encode_example) or examples
            _fuse_and_commit(rd, model, tok, ph, summary, config["stage"], probe)
        if world > 1:
            dist.barrier()
        ray.train.report({"phase": ph["index"], "loss": losses[-1], "tokens_per_s": summary["tokens_per_s"]})
        model_path, revision = ph["path"], None


def _fuse_and_commit(rd: RunDir, model: Any, tok: Any, ph: dict, summary: dict, stage: str, probe: list) -> None:
    """Merge the LoRA into the weights, verify the saved model (stages/fuse.py), commit it at ph['path']."""
    from stages.fuse import fuse

    peft_model = model.module if hasattr(model, "module") else model
    staging = rd.staging(f"{stage}-{ph['name']}")
    summary["fusion_max_abs_logit_diff"] = fuse(peft_model, tok, probe, rd.as_local(staging))
    rd.commit_dir(staging, ph["path"], f"{stage}/train/{ph['name']}", ph["key"], summary, record=False)


class _Board:
    """Per-step loss, learning rate, tokens/s: TensorBoard under <stage>/train/_work/tensorboard/<phase> and Ray
    metrics (cascade_train_loss, _lr, _tokens_per_s, _phase, _step; tagged by stage) for the dashboard."""

    def __init__(self, rd: RunDir, stage: str, phase: str) -> None:
        from ray.util.metrics import Gauge
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(rd.local(stage, "train", "_work", "tensorboard", phase)))
        self.tags = {"stage": stage}
        self.gauges = {k: Gauge(f"cascade_train_{k}", f"training {k}", tag_keys=("stage",))
                       for k in ("loss", "lr", "tokens_per_s", "phase", "step")}

    def log(self, step: int, loss: float, lr: float, tok_s: float, phase: int) -> None:
        for k, v in (("loss", loss), ("lr", lr), ("tokens_per_s", tok_s)):
            self.writer.add_scalar(f"train/{k}", v, step)
        for k, v in (("loss", loss), ("lr", lr), ("tokens_per_s", tok_s), ("phase", phase), ("step", step)):
            self.gauges[k].set(v, tags=self.tags)

    def close(self) -> None:
        self.writer.close()


def _load_examples(rd: RunDir, path: str, tok: Any, max_len: int, encode: Any, distill: bool = False) -> list[dict]:
    if not rd.exists(path):
        return []
    with rd.fs.open(path, "r") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    if distill:
        files: dict[str, Any] = {}
        return [_encode_distill(rd, tok, r, max_len, files) for r in recs]
    return [encode(tok, r["messages"], r["response"], max_len) for r in recs]


def _encode_distill(rd: RunDir, tok: Any, rec: dict, max_len: int, files: dict[str, Any]) -> dict:
    """A record as the teacher generated it: prompt (masked) + the sampled tokens, and at each response position
    the teacher's top-k token ids and log-probabilities from the shard's .npz."""
    import io

    import numpy as np

    from cascade.chat import IGNORE_INDEX, render_prompt

    lp = rec["logprobs"]
    if lp["file"] not in files:
        with rd.fs.open(lp["file"], "rb") as f:
            files[lp["file"]] = dict(np.load(io.BytesIO(f.read())))
    z, at = files[lp["file"]], slice(lp["offset"], lp["offset"] + lp["length"])
    prompt = tok(render_prompt(tok, rec["messages"]), add_special_tokens=False)["input_ids"]
    response = z["sampled"][at].tolist()
    k, n = z["token_ids"].shape[1], len(prompt)
    return {"input_ids": (prompt + response)[:max_len], "labels": ([IGNORE_INDEX] * n + response)[:max_len],
            "kd_ids": ([[0] * k] * n + z["token_ids"][at].tolist())[:max_len],
            "kd_lp": ([[0.0] * k] * n + z["logprobs"][at].astype(np.float32).tolist())[:max_len]}


def distill_loss(logits: Any, labels: Any, kd_ids: Any, kd_lp: Any) -> Any:
    """Mean over response tokens of -sum_k q_k log p_student(id_k), q the teacher's top-k distribution
    renormalised over its k tokens. Position t's targets describe the token at t, predicted from t - 1."""
    import torch

    from cascade.chat import IGNORE_INDEX

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    q = torch.softmax(kd_lp[:, 1:].float(), dim=-1)
    per_token = -(q * logp.gather(-1, kd_ids[:, 1:])).sum(-1)
    keep = labels[:, 1:] != IGNORE_INDEX
    return per_token[keep].mean() if bool(keep.any()) else logits.sum() * 0.0


class _Order:
    """Sample index for a global position: epoch-wise permutations drawn from the seed."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.perms = n, seed, {}

    def __getitem__(self, pos: int) -> int:
        import torch

        e = pos // self.n
        if e not in self.perms:
            self.perms[e] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e)).tolist()
        return self.perms[e][pos % self.n]


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

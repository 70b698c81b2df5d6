"""What runs in every Ray Train worker of a stage's training job (stages/train.py starts the job):
the phases of a `TrainJob` in order, each a `PhaseTrainer` - setup (the previous phase's fused
model, a PEFT LoRA, the newest mid-phase checkpoint), steps (the loss of the phase's kind,
cascade/phases/, on response tokens), finish (rank 0 fuses, checks, commits the phase; after the
stage's last, scores the model it read back for the evaluation, as the first phase does the base:
cascade/scoring.py). The step's docstring tells the whole story."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray

from cascade import loads, phases, preemption, scoring
from cascade.config_train import TrainConfig
from cascade.graph import PhaseGraph, Teacher
from cascade.progress import Board
from cascade.rundir import RunDir
from cascade.storage import local_model

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    """What every Ray Train worker of a stage receives: the phases to run and how."""

    stage: str
    run_dir: str
    start_model: str  # the model the first phase of `phases` starts from
    revision: str | None
    phases: list[PhaseGraph]
    train: TrainConfig
    seed: int
    trust_remote_code: bool = False
    model_key: str = ""  # the stage's base model's identity (the planner's rates are per model)
    lease: tuple[int, str] | None = None  # the driver's fencing token, checked before commits
    teachers: list[Teacher] = dataclasses.field(default_factory=list)  # kinds that score with them
    kernel: str | None = None  # the kernel's text (kinds that put it in a teacher's context)
    vllm: Any = None  # backend.vllm's settings (kinds that run vLLM engines in the workers)
    scorers: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # teacher -> replicas
    scorer_timeout_s: float = 600.0  # how long a lost scoring replica is waited for
    scores: list[dict] = dataclasses.field(default_factory=list)  # the evaluation's (scoring.plan)


# -- the worker ------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    """Every phase of the job not yet committed, in order; each starts from the previous one's fused
    model."""
    import torch
    from transformers import AutoTokenizer

    from cascade.cluster import cpu_threads

    job: TrainJob = config["job"]
    torch.set_num_threads(cpu_threads())
    rd = RunDir(job.run_dir)
    if job.lease:  # a worker of a driver that lost its lease commits nothing
        from cascade.lease import check_fence

        rd.fence = functools.partial(check_fence, rd, job.lease)
    model_path, revision = local_model(job.start_model), job.revision
    tok = AutoTokenizer.from_pretrained(model_path, revision=revision,
                                        trust_remote_code=job.trust_remote_code)
    device = ray.train.torch.get_device()
    start = None  # the last phase's fused model as its fusion check read it back (rank 0)
    for ph in job.phases:
        if preemption.stop_requested(rd, device):
            return
        if not rd.committed(ph.model):  # a phase committed before a worker restart is not redone
            trainer, start = PhaseTrainer(job, rd, ph, tok, model_path, revision, start), None
            try:
                trained = trainer.steps()
            finally:
                if hasattr(trainer.kind, "close"):  # the kind's engines (on_policy's vLLM)
                    trainer.kind.close(trainer.opts, trainer)
            if not trained or not trainer.finish():
                return
            start = trainer.kept
            del trainer  # its model and optimizer freed before the next phase's
        model_path, revision = local_model(ph.model.path), None
        if start is not None:  # named as a load of it would be
            start.config._name_or_path = start.name_or_path = model_path


# Ray's pre-emption notice is asked for at most this often (rank 0's clock, agreed with the stop
# flag): asking is a barrier across the workers (~5 ms), a notice gives 30 s to 2 min (spot)
NOTICE_EVERY_S = 5.0


class PhaseTrainer:
    """One phase on one worker: setup (model, LoRA, data, optimizer, resume), steps, finish (fuse
    and commit)."""

    def __init__(self, job: TrainJob, rd: RunDir, ph: PhaseGraph, tok: Any, model_path: str,
                 revision: str | None, start: Any = None) -> None:
        # start: the model at model_path already in memory (the last phase's, read back), or None
        import torch

        from cascade.checkpoints import Checkpoints
        from cascade.modeling import load_model, with_lora

        ctx = ray.train.get_context()
        self.job, self.rd, self.ph, self.tok, self.t = job, rd, ph, tok, job.train
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.model_path, self.revision, self.t0 = model_path, revision, time.time()
        self.device = ray.train.torch.get_device()
        bf16 = self.t.bf16 and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.seed = job.seed * 1_000 + ph.index
        self.kind = phases.load(ph.kind)
        self.opts = phases.options(ph.kind, ph.options, ph.model.name)
        torch.manual_seed(self.seed)
        loads.process = "train"
        model = (start if start is not None else
                 load_model(model_path, revision, self.dtype, job.trust_remote_code))
        self.kept: Any = None  # this phase's fused model, read back (rank 0): the next one's start
        self.mcfg = model.config
        if self.rank == 0:  # the stage's base, scored for the evaluation where it is (first phase)
            scoring.in_worker(job.scores, rd, ph.index, "before", model, tok, self.device)
        if self.t.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model = with_lora(model, self.t.lora)
        self._data()
        self.model = self._distribute(model)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                     lr=ph.lr, weight_decay=self.t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: self.t.lr_factor(s, ph.iters))
        self.ckpt = Checkpoints(rd, rd.checkpoints(job.stage, ph.index, ph.name, ph.model.key),
                                self.t.keep_checkpoints, self.rank, self.t.strategy == "fsdp")
        # mid-phase resume: adapter, optimizer, scheduler, RNG, data position (checkpoints from
        # before phase kinds: old)
        self.state = self.ckpt.restore(self.model, self.opt, self.sched)
        self.losses, old = self.state["losses"], {"distill": self.state.get("distill_losses", [])}
        self.metrics = {m: self.state.get("metrics", old).get(m, []) for m in self.kind.METRICS}
        self.real = self.slots = 0
        # Ray's pre-emption notice: seen (and acted on) in this phase; asked
        self.noticed, self.asked = False, 0.0

    def _distribute(self, model: Any) -> Any:
        """DDP when world > 1 (Ray Train's prepare_model), or FSDP2: each decoder layer sharded."""
        from cascade.checkpoints import fully_shard_model

        if self.t.strategy == "fsdp":
            return fully_shard_model(model, self.device)
        return ray.train.torch.prepare_model(model)

    def _data(self) -> None:
        from cascade.packing import DataOrder, pack

        split = self.rd.dataset_file(self.job.stage, self.ph.name, "train")
        self.examples, self.too_long = phases.load_examples(self.rd, split, self.tok,
                                                            self.t.max_seq_len, self.kind,
                                                            self.opts)
        if not self.examples:
            raise ValueError(f"{split}: no example has a response token within train.max_seq_len="
                             f"{self.t.max_seq_len} ({self.too_long} dropped): raise it, or "
                             "shorten the prompts")
        lengths = [len(e["input_ids"]) for e in self.examples]
        own = hasattr(self.kind, "batch")  # its own batches (on_policy): never packed
        self.units = (pack(lengths, self.t.max_seq_len) if self.t.packing and not own
                      else [[i] for i in range(len(lengths))])
        self.order = DataOrder(len(self.units), self.seed)

    def collate(self, rows: list[list[dict]]) -> dict:
        """Model inputs for rows of encoded examples, on this worker's device (collate_packed)."""
        from cascade.packing import collate_packed

        return collate_packed(rows, self.tok.pad_token_id, getattr(self.mcfg, "layer_types", None),
                              getattr(self.mcfg, "sliding_window", None), self.device)

    def _micro_step(self, step: int, m: int) -> tuple[float, dict[str, float]]:
        """Forward and backward of one micro-batch (this worker's rows): (loss, its metrics)."""
        b, accum = self.t.batch_size // self.world, self.t.grad_accum  # batch_size is global
        base = (step * accum + m) * b * self.world
        rows = [[self.examples[i] for i in self.units[self.order[base + self.rank * b + j]]]
                for j in range(b)]
        if hasattr(self.kind, "batch"):
            # the kind's own micro-batch from these rows (on_policy's rollouts)
            batch = self.kind.batch(self.opts, self, rows, step, m)
        else:
            batch = self.collate(rows)
        loss, metrics = self.kind.loss(self.opts, self.model, batch)
        (loss / accum).backward()
        self.real, self.slots = self.real + batch["real_tokens"], self.slots + batch["slots"]
        return loss.item(), metrics

    def steps(self) -> bool:
        """The optimizer steps left in the phase, checkpointing every train.save_every; False when
        the run was pre-empted (checkpointed at the step it was in)."""
        import torch

        board = (Board(self.rd, self.job.stage, self.ph, self.state["step"]) if self.rank == 0
                 else None)
        self.t_loop, start, accum, stop = time.time(), self.state["step"], self.t.grad_accum, False
        self.model.train()
        for step in range(start, self.ph.iters):
            parts = [self._micro_step(step, m) for m in range(accum)]
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.max_grad_norm)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.losses.append(sum(p[0] / accum for p in parts))
            for name, values in self.metrics.items():
                values.append(sum(p[1][name] / accum for p in parts))
            if self.rank == 0 and start and step == start:  # first new step after a resume
                self.ckpt.mark_resumed(step + 1)
            if board:
                board.log(step, self.losses[-1], self.sched.get_last_lr()[0],
                          self.real * self.world / (time.time() - self.t_loop),
                          self.real * self.world)
            last = step + 1 == self.ph.iters
            due = self.rank == 0 and not self.noticed and time.time() - self.asked >= NOTICE_EVERY_S
            stop, ask = preemption.agreed(self.device, not last and preemption.requested(self.rd),
                                          not last and due)
            # after Ray's notice, a checkpoint at every step until the node goes: at most one step
            # is redone
            notice = not stop and not last and (self.noticed
                                                or (ask and self._preemption_notice(step + 1)))
            if stop or notice or (self.t.save_every and (step + 1) % self.t.save_every == 0
                                  and not last):
                self.ckpt.save(self.model, self.opt, self.sched, step + 1, self.losses,
                               self.state["tokens"] + self.real * self.world, self.world,
                               self.metrics,
                               reason="sigterm" if stop else "preemption-notice" if notice
                               else "periodic")
            if stop:
                log.warning("pre-empted: checkpointed at step %d of %s", step + 1,
                            self.ph.model.name)
                break
        # the loop's end: what comes after (TensorBoard's flush, fusion) is not training
        self.t_end = time.time()
        if board:
            board.close()
        return not stop

    def _preemption_notice(self, step: int) -> bool:
        """Ray's pre-emption notice (a node of this worker group is being drained, e.g. a spot
        reclaim), once: from then on a checkpoint is saved at every step and training goes on; when
        the node goes, Ray Train restarts the group and it resumes from the last one. Every rank
        calls this the same number of times (Ray agrees the value)."""
        self.asked = time.time()
        info = ray.train.get_preemption_info()
        if info is None:
            return False
        self.noticed = True
        log.warning("pre-emption notice (nodes %s, ranks %s, deadline %s ms): checkpoint at step "
                    "%d of %s",
                    info.preempted_node_ids, info.preempted_ranks, info.deadline_ms, step,
                    self.ph.model.name)
        return True

    def summary(self) -> dict:
        import torch

        from cascade.cluster import device_name

        seconds, train_seconds = self.t_end - self.t0, self.t_end - self.t_loop
        losses = self.losses
        out = {"phase": self.ph.name, "kind": self.ph.kind, "options": self.ph.options,
               "steps": self.ph.iters, "loss_first": losses[0], "loss_last": losses[-1],
               "loss_mean_last": sum(losses[-5:]) / len(losses[-5:]), "losses": losses,
               "examples": len(self.examples), "examples_without_response": self.too_long,
               "tokens": self.state["tokens"] + self.real * self.world, "seconds": seconds,
               "train_seconds": train_seconds,
               "tokens_per_s": self.real * self.world / train_seconds,
               "real_token_fraction": self.real / max(1, self.slots), "packing": self.t.packing,
               "workers": self.world, "threads": torch.get_num_threads(), "device": device_name(),
               "model_key": self.job.model_key, "resumed_from_step": self.state["step"],
               "resumed_from_reason": self.state.get("reason")}
        for name, values in self.metrics.items():
            out.update({f"{name}_losses": values, f"{name}_loss_first": values[0],
                        f"{name}_loss_last": values[-1]})
        return out

    def finish(self) -> bool:
        """Rank 0 fuses the adapter into the weights, verifies and commits the fused model; all
        report. A failed fusion check is deterministic: rank 0 leaves it in rd.train_failure (the
        driver raises it) and the job ends without an error, so Ray Train's failure policy does not
        run the phase again; False then."""
        from cascade.modeling import FusionError

        summary, model, error = self.summary(), self.model, ""
        if self.t.strategy == "fsdp":
            model = self._gathered()
        if self.rank == 0:
            heldout = self.rd.dataset_file(self.job.stage, self.ph.name, "heldout")
            probe = phases.load_examples(self.rd, heldout, self.tok, self.t.max_seq_len,
                                         self.kind, self.opts)[0]
            probe = probe or self.examples
            try:
                self._fuse_and_commit(model, summary, probe)
            except FusionError as e:
                log.error("%s: %s", self.ph.model.name, e)
                error = f"{self.ph.model.name}: {e}"
                self.rd.write_json(self.rd.train_failure(self.job.stage), {"error": error})
        # also the barrier after rank 0's commit
        failed = preemption.agreed(self.device, bool(error))[0]
        ray.train.report({"phase": self.ph.index, "loss": self.losses[-1],
                          "tokens_per_s": summary["tokens_per_s"]})
        return not failed

    def _gathered(self) -> Any:
        """FSDP: the adapter gathered from its shards (a collective), and on rank 0 base + adapter
        rebuilt whole."""
        from cascade.checkpoints import full_adapter
        from cascade.modeling import load_model, with_lora

        adapter = full_adapter(self.model)
        if self.rank != 0:
            return None
        model = load_model(self.model_path, self.revision, self.dtype, self.job.trust_remote_code)
        model = with_lora(model, self.t.lora).to(self.device)
        missing = set(adapter) - set(model.state_dict())
        if missing:
            raise RuntimeError(f"FSDP adapter keys not in the rebuilt model: {sorted(missing)[:3]}")
        model.load_state_dict(adapter, strict=False)
        return model

    def _fuse_and_commit(self, model: Any, summary: dict, probe: list) -> None:
        """Merge the LoRA into the weights, verify the saved model (cascade.modeling.fuse), commit
        it."""
        from cascade.modeling import fuse

        peft_model = model.module if hasattr(model, "module") else model
        staging = self.rd.staging(f"{self.job.stage}-{self.ph.name}")
        kept: dict = {}
        summary["fusion"] = fuse(peft_model, self.tok, probe, self.rd.as_local(staging), kept)
        summary["fusion_max_abs_logit_diff"] = summary["fusion"]["max_abs_logit_diff"]
        # rank 0's loads (each worker's are the same), the fusion check's named as its step's
        staged, step = loads.name_of(self.rd.as_local(staging)), loads.name_of(self.ph.model.path)
        summary["loads"] = [{**r, "model": step} if r["model"] == staged else r
                            for r in loads.taken()]
        # before the commit: a committed last phase always has its score
        scoring.in_worker(self.job.scores, self.rd, self.ph.index, "after", kept.get("model"),
                          self.tok, self.device)
        self.rd.commit_dir(staging, self.ph.model, summary, record=False)
        self.kept = kept.get("model")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

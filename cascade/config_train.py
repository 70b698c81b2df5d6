"""The `train` section of the schema (cascade/config.py): how every phase of a stage is trained,
whatever its kind (cascade/phases/). Below the rest of the config so that the model code can use it
without importing the whole."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from cascade.validate import custom_resources, fail, number


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def check(self) -> None:
        number("train.lora.r", self.r, 1)
        number("train.lora.alpha", self.alpha, 0, lo_open=True)
        number("train.lora.dropout", self.dropout, 0, 1, hi_open=True)
        if not self.target_modules:
            fail("train.lora.target_modules is empty (all-linear: every linear layer)")


@dataclass
class TrainConfig:
    lora: LoraSpec = field(default_factory=LoraSpec)
    batch_size: int = 4  # sequences per micro-step, all workers together (divisible by num_workers)
    grad_accum: int = 4
    max_seq_len: int = 1024
    num_workers: int = 1  # Ray Train workers (DDP: gloo on CPU, nccl on GPU)
    # ddp: every worker holds the whole model; fsdp: each decoder layer's weights sharded over the
    # workers (torch FSDP2, fully_shard) for students too large for one device (12b, 27b)
    strategy: str = "ddp"
    use_gpu: bool = False
    # CPUs (and torch threads) of each worker; None: the cluster's CPUs shared out among the workers
    # (cascade.cluster.worker_cpus). The thread count changes float summation order, so fused
    # weights are bitwise reproducible for a fixed count; set it to pin a run's bytes across
    # machines of different sizes.
    cpus_per_worker: Optional[int] = None
    # custom Ray resources of each worker (a pool's label: {training: 1}, declared by the nodes'
    # `ray start --resources` or cluster.resources); CPUs and GPUs come from the settings above
    resources: dict[str, float] = field(default_factory=dict)
    # a stage's first phases train while its teachers answer its later phases' prompt sets, when the
    # cluster holds both at once (cascade/overlap.py); false: one step after another
    overlap: bool = True
    bf16: bool = True  # used only where the hardware supports it
    gradient_checkpointing: bool = False
    warmup_steps: int = 0
    # the learning rate after warmup, over each phase's iters: constant, or decayed to
    # min_lr_ratio x the phase's lr by a cosine or a straight line (TRL's lr_scheduler_type)
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    packing: bool = True  # minimum-slack packing of whole examples, block-diagonal attention
    save_every: int = 50  # mid-phase checkpoint every N optimizer steps (0: none)
    keep_checkpoints: int = 2  # last K mid-phase checkpoints kept per phase
    # Ray Train restarts of a failed worker group (resuming from the last checkpoint)
    max_failures: int = 2
    # the training's own seed (data order, adapter init, on-policy samples); None: the run's `seed`.
    # Set it to re-train a stage with other noise without regenerating or rebuilding anything.
    seed: Optional[int] = None

    def check(self) -> None:
        for k in ("batch_size", "grad_accum", "max_seq_len", "num_workers", "keep_checkpoints"):
            number(f"train.{k}", getattr(self, k), 1)
        if self.cpus_per_worker is not None:
            number("train.cpus_per_worker", self.cpus_per_worker, 1)
        for k in ("warmup_steps", "save_every", "max_failures", "weight_decay"):
            number(f"train.{k}", getattr(self, k), 0)
        number("train.max_grad_norm", self.max_grad_norm, 0, lo_open=True)
        if self.batch_size % self.num_workers:
            fail(f"train.batch_size ({self.batch_size}) must be divisible by train.num_workers "
                 f"({self.num_workers})")
        if self.lr_schedule not in SCHEDULES:
            fail(f"train.lr_schedule {self.lr_schedule!r}: valid schedules: {', '.join(SCHEDULES)}")
        number("train.min_lr_ratio", self.min_lr_ratio, 0, 1)
        if self.strategy not in ("ddp", "fsdp"):
            fail(f"train.strategy {self.strategy!r}: valid strategies: ddp, fsdp")
        custom_resources("train.resources", self.resources, "train.cpus_per_worker, use_gpu")
        self.lora.check()

    def lr_factor(self, step: int, iters: int) -> float:
        """The phase's lr multiplier at optimizer step `step` (0-based) of `iters`: a linear warmup
        over warmup_steps, then lr_schedule."""
        warm = max(1, self.warmup_steps)
        if step < warm or self.lr_schedule == "constant":
            return min(1.0, (step + 1) / warm)
        done = min(1.0, (step + 1 - warm) / max(1, iters - warm))
        shape = (0.5 * (1 + math.cos(math.pi * done)) if self.lr_schedule == "cosine"
                 else 1 - done)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape

    def identity(self) -> dict:
        """What of this section determines what a phase trains (its key: cascade/graph.py)."""
        # resources, recomputation and fault tolerance do not (so `+stage=27b`, which turns
        # gradient checkpointing on, reuses the lower stages a `+stage=4b` run trained)
        out = dataclasses.asdict(dataclasses.replace(
            self, num_workers=1, use_gpu=False, cpus_per_worker=1, save_every=0,
            keep_checkpoints=0, max_failures=0, gradient_checkpointing=False))
        # a setting before phase kinds (now distill's option): keys stay as they were
        out["distill_weight"] = 0.0
        del out["seed"]  # train.seed: keyed as the seed it resolves to (Config.train_seed)
        del out["resources"], out["overlap"]  # where and when it trains, not what
        if self.lr_schedule == "constant":  # keys from before the schedules stay as they were
            del out["lr_schedule"], out["min_lr_ratio"]
        return out


SCHEDULES = ("constant", "cosine", "linear")

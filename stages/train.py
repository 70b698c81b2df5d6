"""Step 3 of a stage: the sandwich curriculum, each phase a LoRA trained by Ray Train and fused into the weights.

    python -m cascade +stage=4b models=tiny train.num_workers=1

One TorchTrainer job per stage runs the phases not yet committed, in order (one job, not one per phase: a Ray
Train start costs ~12 s here). Its workers receive a `TrainJob` (typed; Ray pickles it). Per phase, every worker
(`PhaseTrainer`): `setup` loads the previous phase's fused model (the stage's base model for P0), wraps it in a
PEFT LoRA (all linear layers by default) and restores the newest mid-phase checkpoint; `steps` trains `iters`
optimizer steps with loss on response tokens only (prompt tokens masked), writing a checkpoint every
train.save_every steps (cascade/checkpoints.py: adapter, optimizer, scheduler, RNG states, data position);
`finish` has rank 0 merge the adapter into the weights and commit the fused model (a plain HF directory) by
renaming it into place, once cascade.modeling.fuse has shown that the saved model's logits equal base + adapter on
held-out prompts. The driver records each committed phase in the manifest. After a kill of the driver (the same
command again) or of a worker (Ray Train restarts the group, train.max_failures times) the phase resumes from
the newest checkpoint and ends with the same adapter as a run never stopped (bitwise on CPU).

Data order: cascade.packing.DataOrder (seeded by (seed, phase)); worker r of W takes rows [r*B/W, (r+1)*B/W) of
each global micro-batch of B = train.batch_size rows, so W is a resource, not an identity. With
train.strategy=fsdp the model is sharded (FSDP2, one unit per decoder layer) instead of replicated; at the end of
a phase the adapter is gathered whole and rank 0 fuses it into a freshly loaded base. With train.distill_weight > 0
the loss adds the cross-entropy against the teachers' stored top-k distributions (cascade/logprobs.py).

The loop is written by hand rather than TRL's SFTTrainer: the data order above must not depend on the worker
count, each phase must fuse and commit inside the same Ray Train job, and a Trainer's set-up per phase costs more
than the tiny phases themselves on CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading


from cascade import preemption
from cascade.config import Config
from cascade.graph import StageGraph
from cascade.rundir import RunDir
from cascade.trainer import TrainJob, failure_file, train_loop_per_worker

log = logging.getLogger(__name__)


def run(rd: RunDir, cfg: Config, sp: StageGraph, cpus: int, lease: tuple[int, str] | None = None) -> None:
    """Train the phases of `sp` that are not committed (driver side), `cpus` CPUs (torch threads) per worker."""
    todo = []
    for ph in sp.phases:
        if todo:  # after a phase that must run, every later one runs too (it starts from that one's output)
            rd.mark(ph.model.name, "running", key=ph.model.key, path=ph.model.path)
            todo.append(ph)
        elif rd.begin(ph.model) is None:
            todo.append(ph)
    if not todo:
        return
    first = todo[0].index
    job = TrainJob(sp.name, rd.url, sp.phases[first - 1].model.path if first > 0 else sp.base_model,
                   sp.revision if first == 0 else None, todo, dataclasses.replace(cfg.train, cpus_per_worker=cpus),
                   cfg.seed, cfg.models.trust_remote_code, sp.base_key, lease)
    try:
        fit(job, rd, f"{sp.name}-{todo[0].model.key}")
    except Exception as e:  # a failed fusion check, workers out of restarts: `cascade status` says which and why
        for ph in todo:
            if rd.committed(ph.model) is None:
                rd.mark(ph.model.name, "failed", key=ph.model.key, path=ph.model.path, error=f"{type(e).__name__}: "
                        f"{str(e)[:500]}")
        raise
    if preemption.requested(rd):  # the workers checkpointed and stopped; the driver stops next
        return
    for ph in todo:
        rec = rd.committed(ph.model)
        if rec is None:
            raise RuntimeError(f"{ph.model.name}: training ended without committing {ph.model.path}")
        rd.mark_done(ph.model, rec)


def fit(job: TrainJob, rd: RunDir, name: str) -> None:
    """Run `job` as one Ray Train job (train.num_workers workers); Ray Train's storage is the run directory's
    <stage>/train/_work (on an object store through the run directory's own fsspec filesystem)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t, (storage_path, storage_fs) = job.train, rd.ray_storage(rd.train_work(job.stage))
    failed = failure_file(rd, job.stage)
    if rd.exists(failed):  # a previous run's
        rd.remove(failed)
    # Ray Train's fit() installs a Ctrl-C handler that holds its controller's handle, which keeps the finished
    # controller and its dataset manager alive (~0.75 GB, waking every second on the driver's node) until the
    # next fit or the driver's exit: putting the previous handler back lets Ray reclaim them as fit() returns.
    sigint = signal.getsignal(signal.SIGINT)
    # Ray Train's controller polls its workers every 2 s by default: a phase's end (or a worker's death) is seen
    # up to 2 s late, several times a stage. Ray Train passes this on to its controller; a user's value is kept.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    try:
        TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                         resources_per_worker={"CPU": t.cpus_per_worker or 1}),
            run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                                 failure_config=FailureConfig(max_failures=t.max_failures)),
        ).fit()
    finally:
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
    failure = rd.read_json(failed)
    if failure:  # deterministic (a failed fusion check): written by rank 0 rather than raised, so never retried
        from cascade.modeling import FusionError

        raise FusionError(failure["error"])

"""Step 3 of a stage: the sandwich curriculum, each phase a LoRA trained by Ray Train and fused into
the weights.

    python -m cascade +stage=4b models=tiny train.num_workers=1

One TorchTrainer job per stage runs the phases not yet committed, in order (one job, not one per
phase: a Ray Train start costs ~12 s here). Its workers receive a `TrainJob` (typed; Ray pickles
it). Per phase, every worker (`PhaseTrainer`): `setup` loads the previous phase's fused model (the
stage's base model for P0), wraps it in a PEFT LoRA (all linear layers by default) and restores the
newest mid-phase checkpoint; `steps` trains `iters` optimizer steps with loss on response tokens
only (prompt tokens masked), writing a checkpoint every train.save_every steps
(cascade/checkpoints.py: adapter, optimizer, scheduler, RNG states, data position); `finish` has
rank 0 merge the adapter into the weights and commit the fused model (a plain HF directory) by
renaming it into place, once cascade.modeling.fuse has shown that the saved model's logits equal
base + adapter on held-out prompts. The driver records each committed phase in the manifest. After a
kill of the driver (the same command again) or of a worker (Ray Train restarts the group,
train.max_failures times) the phase resumes from the newest checkpoint and ends with the same
adapter as a run never stopped (bitwise on CPU).

Data order: cascade.packing.DataOrder (seeded by (seed, phase)); worker r of W takes rows [r*B/W,
(r+1)*B/W) of each global micro-batch of B = train.batch_size rows, so W is a resource, not an
identity. With train.strategy=fsdp the model is sharded (FSDP2, one unit per decoder layer) instead
of replicated; at the end of a phase the adapter is gathered whole and rank 0 fuses it into a
freshly loaded base. The loss is the phase's kind's (cascade/phases/: sft, or distill adding the
cross-entropy against the teachers' stored top-k distributions).

The loop is written by hand rather than TRL's SFTTrainer: the data order above must not depend on
the worker count, each phase must fuse and commit inside the same Ray Train job, and a Trainer's
set-up per phase costs more than the tiny phases themselves on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from cascade.graph import Context, Work
from cascade.rundir import RunDir, Step
from cascade.steps import Made

if TYPE_CHECKING:  # the trainer imports Ray: loaded when a job runs, not when the planner costs one
    from cascade.trainer import TrainJob

log = logging.getLogger(__name__)


def run(ctx: Context, w: Work, todo: list[Step]) -> dict[str, Made]:
    """Train the phases of `todo` (driver side) in one Ray Train job; rank 0 commits each phase's
    fused model inside it (the next phase starts from it), so nothing is handed back: the driver
    checks and records them."""
    from cascade.trainer import TrainJob

    cfg, sp, phs = ctx.cfg, w.stage, w.phases(todo)
    first = phs[0].index
    # started first: the replicas load while Ray Train starts its workers
    pools, cpus = _scorers(ctx, sp, phs)
    job = TrainJob(sp.name, ctx.rd.url,
                   sp.phases[first - 1].model.path if first > 0 else sp.base_model,
                   sp.revision if first == 0 else None, phs,
                   dataclasses.replace(cfg.train, cpus_per_worker=cpus),
                   cfg.train_seed, cfg.models.trust_remote_code, sp.base_key, ctx.lease,
                   sp.teachers, ctx.graph.kernel, cfg.backend.vllm,
                   {t: p.names for t, p in pools.items()}, cfg.generation.restart_timeout_s,
                   _scores(ctx, sp))
    try:
        # SIGTERM: the workers checkpoint at their next optimizer step and stop, then the driver
        # stops
        with ctx.stop.deferred() if ctx.stop else contextlib.nullcontext():
            fit(job, ctx.rd, f"{sp.name}-{phs[0].model.key}")
    finally:
        for pool in pools.values():
            pool.shutdown()
    return {}


def _scores(ctx: Context, sp: Any) -> list[dict]:
    """The evaluation's scores rank 0 makes where the models are (cascade/scoring.py): the last
    phase's fused model (and the teachers' divergence from both students, eval.reverse_kl), and
    the base as the first phase loads it unless the driver scores it while training runs (CPUs to
    spare: ctx.spare); none while a later phase's dataset is not committed (its held-out records
    are the evaluation's too)."""
    from cascade import scoring
    from stages.evaluate import teachers_of

    if not scoring.heldout_ready(ctx.rd, sp):
        return []  # later phases' answers still being made (cascade/overlap.py): evaluate scores
    records, kw = scoring.heldout_records(ctx.cfg, ctx.rd, sp), scoring.settings(ctx.cfg)
    last, teachers = sp.phases[-1], teachers_of(sp) if kw["divergence"] else []
    out = [scoring.plan(ctx.rd, sp.name, "after", last.index, last.model.key, records, kw,
                        teachers, sp.base_key, ctx.cfg.models.trust_remote_code)]
    if not ctx.spare:
        out.append(scoring.plan(ctx.rd, sp.name, "before", sp.phases[0].index, sp.base_key,
                                records, kw))
    return out


def _scorers(ctx: Context, sp: Any, phs: list) -> tuple[dict[str, Any], int]:
    """With a phase that scores on its teachers' replicas (on_policy's scorer pool): each teacher's
    replicas (`score/<stage>/<teacher>/<i>`, the generation pool's backend and resources), and the
    CPUs each training worker may take beside them; else none, and the context's CPUs."""
    from cascade import cluster, phases

    cfg = ctx.cfg
    opts = [phases.options(ph.kind, ph.options, ph.model.name) for ph in phs]
    top_k = max((o.top_k for o in opts if getattr(o, "scorer", "") == "pool"), default=0)
    if not top_k:
        return {}, ctx.cpus
    from cascade import generation
    from cascade.generation.pool import ReplicaPool
    from cascade.graph import backend_kwargs, sampling

    b = dataclasses.replace(cfg.backend, **{
        cfg.backend.name: generation.load(cfg.backend.name).scoring(cfg.backend.options, top_k)})

    n = len(sp.teachers) * cfg.generation.replicas
    left = cluster.cpus() - n * cfg.backend.num_cpus
    cpus = cfg.train.cpus_per_worker or int(left // cfg.train.num_workers)
    if cpus < 1 or left < cpus * cfg.train.num_workers:
        raise RuntimeError(f"{sp.name}: on_policy's scorer pool: {n} teacher replicas of "
                           f"backend.num_cpus={cfg.backend.num_cpus} leave {left:g} of the "
                           f"cluster's {cluster.cpus()} CPUs, not enough for "
                           f"{cfg.train.num_workers} training worker(s)")
    pools: dict[str, Any] = {}
    try:
        for t in sp.teachers:
            names = [f"score/{sp.name}/{t.name}/{r}" for r in range(cfg.generation.replicas)]
            pools[t.name] = ReplicaPool(names, t.model, backend_kwargs(cfg, t), b,
                                        cfg.generation, sampling(cfg), t.system)
            log.info("scoring replicas %s: %s backend, model %s", names, cfg.backend.name,
                     t.model)
    except BaseException:
        for pool in pools.values():
            pool.shutdown()
        raise
    return pools, cpus


def cost(est: Any, w: Work, todo: list[Step]) -> list[dict]:
    """Per phase: a worker's memory (refused when it cannot fit, with the placements that would),
    the phase kind's token slots, the training rate (given, measured, or the device's peak at
    plan.train_mfu) and seconds."""
    from cascade import phases
    from cascade.costs import train_fixes, train_memory

    cfg, dev, t, a, sp = est.cfg, est.dev, est.cfg.train, est.arch[w.stage.name], w.stage
    limit = dev.memory_gb * cfg.plan.headroom / (t.num_workers if dev.cpu else 1)
    rows = []
    for ph in w.phases(todo):
        mem = train_memory(a, t, dev, limit)
        if mem["total"] > limit:
            fixes = train_fixes(a, t, dev, limit)
            est.problems.append(
                f"{ph.model.name}: a training worker needs {mem['total']:.1f} GB ({t.strategy}, "
                f"gradient_checkpointing={t.gradient_checkpointing}), {limit:.1f} GB available; "
                "would fit: "
                + (" | ".join(fixes) if fixes
                   else f"none on {dev.count} x {dev.memory_gb:.0f} GB: more GPUs, or "
                   "a smaller train.max_seq_len / train.batch_size"))
        work = phases.load(ph.kind).cost(phases.options(ph.kind, ph.options, ph.model.name), t,
                                         ph.iters)
        flops = (6 if t.gradient_checkpointing else 4) * a.params
        rate, source = est.rate(
            cfg.plan.train_tokens_per_s,
            est.m.train_rate,
            "t",
            sp.name,
            lambda: t.num_workers * dev.tflops * 1e12 * cfg.plan.train_mfu / flops,
        )
        seconds = work["token_slots"] / rate + est.m.train_fixed.get(sp.name, est.overhead("train"))
        rows.append(est.row(ph.model.name, "train", sp.name, a, t.num_workers, mem, work, rate,
                            source, seconds, gpus=t.use_gpu))
    return rows


def fit(job: TrainJob, rd: RunDir, name: str) -> None:
    """Run `job` as one Ray Train job (train.num_workers workers); Ray Train's storage is the run
    directory's <stage>/train/_work (on an object store through the run directory's own fsspec
    filesystem)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cascade.trainer import train_loop_per_worker

    t, (storage_path, storage_fs) = job.train, rd.ray_storage(rd.train_work(job.stage))
    failed = rd.train_failure(job.stage)
    if rd.exists(failed):  # a previous run's
        rd.remove(failed)
    # Ray Train's fit() installs a Ctrl-C handler that holds its controller's handle, which keeps
    # the finished controller and its dataset manager alive (~0.75 GB, waking every second on the
    # driver's node) until the next fit or the driver's exit: putting the previous handler back lets
    # Ray reclaim them as fit() returns.
    sigint = signal.getsignal(signal.SIGINT)
    # Ray Train's controller polls its workers every 2 s by default: a phase's end (or a worker's
    # death) is seen up to 2 s late, several times a stage. Ray Train passes this on to its
    # controller; a user's value is kept.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    try:
        TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                         resources_per_worker={"CPU": t.cpus_per_worker or 1,
                                                               **t.resources}),
            run_config=RunConfig(name=name, storage_path=storage_path,
                                 storage_filesystem=storage_fs,
                                 failure_config=FailureConfig(max_failures=t.max_failures)),
        ).fit()
    finally:
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
    failure = rd.read_json(failed)
    if failure:
        # deterministic (a failed fusion check): written by rank 0 rather than raised, so never
        # retried
        from cascade.modeling import FusionError

        raise FusionError(failure["error"])

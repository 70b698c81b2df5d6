"""The single controller: plan every step of the cascade (cascade/graph.py), then run each step not
yet committed.

    python -m cascade +stage=4b models=tiny  # plans 1b -> 4b, runs what is missing, skips the rest

Per stage, as in the seed's cascade table:

    generate (stages/generate.py) -> curate (stages/curate.py) -> train + fuse (stages/train.py)
    -> evaluate (stages/evaluate.py) -> gate (stages/gate.py) -> release (stages/release.py, with
    release.enabled)

A stage starts only when each of its trained teachers was promoted by its gate (gate.enforce).

The driver owns the loop and all run state (the manifest); Ray actors and Ray Train workers only
hold weights.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from cascade import cluster, overlap
from cascade.config import Config
from cascade.lease import Lease, LeaseLost
from cascade.graph import Context, RunGraph, StageGraph, Work, build_graph
from cascade.preemption import Preempted, Preemption
from cascade.rundir import RunDir, Step
from cascade.steps import execute

log = logging.getLogger("cascade.driver")


def run(cfg: Config) -> list[StageGraph]:
    """Validate inputs, plan, and run every missing step up to cfg.target. Returns the plans."""
    # every input file is read and checked here, before Ray starts or a model loads
    p = build_graph(cfg)
    _log_to_file(p.rd)
    todo = p.pending()
    if not todo:
        log.info("nothing to do: every step up to stage %s is committed in %s", cfg.target,
                 p.rd.url)
        from cascade import tracking

        tracking.sync(p)  # tracking.mlflow turned on for a finished run, or a half-logged step
        _report(p)
        return p.stages
    log.info("stages %s; %d steps to run: %s", [s.name for s in p.stages], len(todo),
             ", ".join(todo))
    from stages.gate import require_promoted

    pending = {w.stage.name for w in p.work() if any(s.name in todo for s in w.steps)}
    for sp in p.stages:  # a teacher already refused by its gate: stop before Ray starts
        if sp.name in pending:
            require_promoted(p, sp, committed_only=True)
    if any(sp.release and not p.rd.committed(sp.release) for sp in p.stages):
        from cascade.gguf import check_tools

        # llama-cpp-python and llama.cpp's converter are installed, the GGUF types exist
        check_tools(list(cfg.release.gguf))
    if cfg.cluster.auth:
        # before the first `import ray`; refuses an inherited RAY_AUTH_MODE=disabled
        cluster.ensure_auth_token()
    with Lease(p.rd, cfg.lease_ttl_s) as lease:
        # one driver per run directory; every commit fenced by it
        try:
            _prepare(p)
            _run_steps(p, lease.token)
        except KeyboardInterrupt:
            # the lease's heartbeat interrupts the driver when the lease is lost
            if lease.lost:
                raise LeaseLost(lease.lost) from None
            raise
        finally:
            # an object store's copy of the log (a filesystem run directory's is the log itself)
            p.rd.upload(p.rd.driver_log(), p.rd.path("logs", "driver.log"))
    _report(p)
    return p.stages


def _run_steps(p: RunGraph, lease: tuple[int, str]) -> None:
    """Each entry of the run's table in order (cascade.steps.execute skips what is committed), Ray
    started for the first that needs it (a gate reads committed figures only: a changed threshold
    starts no cluster), the table then re-cut for the stages that overlap (cascade/overlap.py); a
    stage starts only when its teachers were promoted; the report rebuilt after every stage."""
    from cascade import report, tracking
    from stages.gate import require_promoted

    rd, ctx, table, i = p.rd, Context(p, lease), p.work(), 0
    try:
        while i < len(table):
            w = table[i]
            if i == 0 or table[i - 1].stage is not w.stage:
                require_promoted(p, w.stage)  # its teachers' gates, committed by now
            if ctx.stop is None and w.kind != "gate" and not all(map(rd.committed, w.steps)):
                if lapped := _start(ctx):  # every entry before this one is committed, in both
                    table = p.work(lapped)
                    i = next(k for k, x in enumerate(table) if not all(map(rd.committed, x.steps)))
                    continue
            side = []
            while w.kind == "train" and i + 1 + len(side) < len(table) \
                    and table[i + 1 + len(side)].beside:
                side.append(table[i + 1 + len(side)])
            _execute(ctx, w, side)
            i += 1 + len(side)
            if i == len(table) or table[i].stage is not w.stage:
                report.refresh(p)  # <run_dir>/report/, after every stage
                tracking.sync(p)  # tracking.mlflow
    finally:
        if ctx.stop is not None:
            cluster.stop()


def _execute(ctx: Context, w: Work, side: list[Work]) -> None:
    """Run `w`; the work listed beside it (its stage's later prompt sets: cascade/overlap.py) in a
    thread meanwhile when `w` has steps to run, else after it. A failure of either is raised once
    both have stopped; SIGTERM or a failure here stops the thread at its next answer. Replicas
    kept up for the work beside (ctx.pools) are stopped at the end."""
    import stages
    from cascade import scoring
    from stages import evaluate

    rd = ctx.rd
    if w.kind == "train" and ctx.spare and not rd.committed(w.stage.eval) \
            and scoring.heldout_ready(rd, w.stage) and w.stage.name not in ctx.before:
        ctx.before[w.stage.name] = evaluate.start_before(ctx.cfg, w.stage, rd)
    if not side:
        return execute(ctx, w, stages.load(w.kind))
    try:
        if all(map(rd.committed, w.steps)):
            for x in [w, *side]:
                execute(ctx, x, stages.load(x.kind))
        else:
            _beside(ctx, w, side)
    finally:
        for pool in ctx.pools.values():  # replicas kept up for work that had none left to do
            pool.shutdown()
        ctx.pools.clear()


def _beside(ctx: Context, w: Work, side: list[Work]) -> None:
    """`w` in this thread, `side` in another; a failure of either raised once both stopped."""
    import threading

    import stages

    errors: list[BaseException] = []

    def beside() -> None:
        try:
            for x in side:
                execute(ctx, x, stages.load(x.kind))
        except BaseException as e:  # raised by the driver's thread once training has ended
            if not isinstance(e, Preempted):
                log.error("%s failed beside training (raised when %s ends: what it trains is "
                          "kept): %s: %s", x.steps[0].name, w.steps[0].name, type(e).__name__, e)
            errors.append(e)

    log.info("%s trains beside %s", w.steps[0].name, ", ".join(s.name for x in side
                                                                 for s in x.steps))
    thread = threading.Thread(target=beside, name="beside", daemon=True)
    thread.start()
    try:
        execute(ctx, w, stages.load(w.kind))
    except BaseException:
        ctx.stop.halt()  # the thread stops at its next answer, saving what it has
        raise
    finally:
        _join(thread, ctx)
    if errors:
        raise errors[0]


def _join(thread: Any, ctx: Context) -> None:
    """Wait for the thread; SIGTERM meanwhile (raised here) halts it first, then is raised."""
    stopped: BaseException | None = None
    while thread.is_alive():
        try:
            thread.join()
        except BaseException as e:
            ctx.stop.halt()
            stopped = stopped or e
    if stopped is not None:
        raise stopped


def _start(ctx: Context) -> set[str]:
    """Ray up (cascade/cluster.py), SIGTERM deferred to the pre-emption handler, staging cleaned;
    the CPUs a training worker gets, and whether evaluation has CPUs of its own beside them. Returns
    the stages whose curriculum overlaps with their teachers' answers (cascade/overlap.py)."""
    p, cfg, rd = ctx.graph, ctx.cfg, ctx.rd
    ctx.stop = Preemption(rd)
    if cfg.cache_max_gb:
        # this node's Ray workers inherit it (another node: set in its own environment)
        os.environ.setdefault("CASCADE_CACHE_MAX_GB", str(cfg.cache_max_gb))
    cluster.start(cfg.cluster)
    ctx.stop.install()  # after Ray's own SIGTERM handler
    rd.clean_staging()
    if cfg.cache_max_gb:
        from cascade.storage import evict, node_cache

        for gone in evict(node_cache() / "runs" / "models", cfg.cache_max_gb * 1e9):
            log.info("node cache over cache_max_gb=%s: removed %s (least recently used)",
                     cfg.cache_max_gb, gone)
    # the base student's score does not wait for the curriculum: it runs while the first phase
    # trains on the CPUs training leaves free; when training takes every CPU
    # (train.cpus_per_worker=null shares them all out), it is scored after training, with the
    # trained student, in one task on a worker's CPUs
    ctx.cpus = cluster.worker_cpus(cfg.train.num_workers, cfg.train.cpus_per_worker)
    ctx.spare = cluster.cpus() - ctx.cpus * cfg.train.num_workers >= cfg.eval.num_cpus
    for sp in p.stages:
        if not sp.trains:
            log.info("stage %s: teacher %s used as is", sp.name, sp.base_model)
    lapped = overlap.stages(cfg, p.stages, cluster.totals(), ctx.cpus, ctx.spare)
    if lapped:
        log.info("stages %s: the first phases train while the teachers answer the other prompt "
                 "sets (train.overlap)", sorted(lapped))
    return lapped


def _prepare(p: RunGraph) -> None:
    """Before Ray: the resolved config saved, the presets' models built, the hub token in place."""
    from omegaconf import OmegaConf

    cfg = p.cfg
    # no secret: tokens come from the environment
    p.rd.save_config(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if cfg.models.preset == "tiny":
        from cascade.tiny import build_preset

        build_preset(cfg)  # cached; committed by rename
    if any(cfg.stages[sp.name].model.startswith("gemma3-270m:") for sp in p.stages):
        from cascade import gemma3_270m

        gemma3_270m.build_preset(cfg, [sp.name for sp in p.stages])  # cached; committed by rename
    _ship_models(p)
    token = os.environ.get(cfg.hf_token_env)
    if token:
        # workers inherit it; never written to config or logs
        os.environ.setdefault("HF_TOKEN", token)


def _ship_models(p: RunGraph) -> None:
    """A run directory on an object store: base models that are directories on this node (the tiny
    preset, a local checkpoint) are committed once to <run_dir>/models/<key>/ and every step loads
    them from there (pulled into each node's cache), so no node needs a disk shared with the driver.
    Their keys, and so every step's key, are unchanged."""
    import shutil

    rd = p.rd
    if rd.is_local:
        return
    moved: dict[str, str] = {}
    for sp in p.stages:
        if os.path.isdir(sp.base_model):
            step = Step(f"models/{sp.name}", sp.base_key, rd.path("models", sp.base_key))
            if rd.begin(step) is None:
                staging = rd.staging(step.name)
                shutil.copytree(sp.base_model, staging, dirs_exist_ok=True)
                rd.commit_dir(staging, step, {"source": sp.base_model})
            moved[sp.base_model], sp.base_model = step.path, step.path
    for sp in p.stages:
        for t in sp.teachers + [j.teacher for j in sp.gen_jobs]:
            t.model = moved.get(t.model, t.model)


def _log_to_file(rd: RunDir) -> None:
    path = rd.driver_log()  # on an object store: this node's mirror, uploaded when the driver ends
    path.parent.mkdir(parents=True, exist_ok=True)
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(h)


def _report(p: RunGraph) -> None:
    from cascade import report

    if not p.rd.exists(p.rd.report("index.html")):  # a run directory made before reports were
        report.refresh(p)
    for sp in p.stages:
        if sp.trains:
            metrics = p.rd.read_json(p.rd.metrics(sp.name)) or {}
            log.info("stage %s: student %s; agreement %s", sp.name, sp.final_model,
                     metrics.get("agreement", {}))

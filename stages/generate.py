"""Step 1 of a stage: every teacher answers every prompt set its curriculum uses, shard by shard.

    python -m cascade +stage=4b models=tiny       # runs this step for teacher 1b, among the others

Prompts are cut into fixed shards (generation.shard_size, in file order); a driver-side queue hands the next
shard to whichever replica is free. Each finished shard is written to generations/<teacher>/<data>/<key>/shards/
atomically, so a re-run after a kill skips it; when all shards of a prompt set are in, its step.json (counts and
checksums) commits the set. A replica that dies has its shard re-queued (Ray restarts the actor); a shard that
fails generation.max_shard_failures times stops the step with the shard and the cause named.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import time
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from cascade.config import Config
from cascade.driver import GenJob, StagePlan, Teacher
from cascade.generation.actor import spawn
from cascade.generation.backend import Request, Sampling
from cascade.prompts import Prompt
from cascade.rundir import RunDir, stable_hash

log = logging.getLogger(__name__)


class ShardFailed(RuntimeError):
    pass


def shard_path(job: GenJob, i: int) -> str:
    return f"{job.path}/shards/shard-{i:05d}.jsonl"


def prompt_seed(cfg: Config, teacher: Teacher, data: str, prompt_id: str) -> int:
    return int(stable_hash("seed", cfg.seed, teacher.key, data, prompt_id)[:8], 16)


def _backend_kwargs(cfg: Config, teacher: Teacher) -> dict[str, Any]:
    b = cfg.backend
    kw = dict(dtype=b.dtype, revision=teacher.revision, trust_remote_code=cfg.models.trust_remote_code)
    if b.name == "hf":
        return {**kw, "batch_size": b.batch_size}
    return {**kw, "tensor_parallel_size": b.tensor_parallel_size, "gpu_memory_utilization": b.gpu_memory_utilization,
            "max_model_len": b.max_model_len, "enforce_eager": b.enforce_eager, "engine_kwargs": dict(b.engine_kwargs),
            "seed": cfg.seed}


def _records(cfg: Config, job: GenJob, info: dict, completions: list[dict]) -> list[dict]:
    g = cfg.generation
    sampling = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p, "n": g.n_samples}
    return [
        {
            **c,
            "data": job.data,
            "teacher": job.teacher.name,
            "teacher_key": job.teacher.key,
            "system_in_context": job.teacher.system is not None,
            "sampling": sampling,
            "seed": prompt_seed(cfg, job.teacher, job.data, c["prompt_id"]),
            **info,
        }
        for c in completions
    ]


def run(rd: RunDir, cfg: Config, sp: StagePlan, prompts: dict[str, list[Prompt]]) -> None:
    for teacher in sp.teachers:
        jobs = [j for j in sp.gen_jobs if j.teacher is teacher]
        _run_teacher(rd, cfg, sp.name, teacher, jobs, prompts)


def _run_teacher(rd: RunDir, cfg: Config, stage: str, teacher: Teacher, jobs: list[GenJob],
                 prompts: dict[str, list[Prompt]]) -> None:
    g = cfg.generation
    queue: collections.deque[tuple[GenJob, int, list[Prompt]]] = collections.deque()
    open_jobs = []
    for job in jobs:
        name = f"generate/{teacher.name}/{job.data}"
        if rd.committed(job.path, job.key):
            log.info("[skip] %s (committed, key %s)", name, job.key)
            rd.mark(name, "done", key=job.key, path=job.path)
            continue
        rd.mark(name, "running", key=job.key, path=job.path)
        open_jobs.append(job)
        ps = prompts[job.data]
        for i in range(0, (len(ps) + g.shard_size - 1) // g.shard_size):
            if not rd.exists(shard_path(job, i)):
                queue.append((job, i, ps[i * g.shard_size : (i + 1) * g.shard_size]))
    compute = _generate(rd, cfg, stage, teacher, queue) if queue else {}
    for job in open_jobs:
        _commit(rd, cfg, job, len(prompts[job.data]), compute.get(job.data, 0.0))


def _generate(rd: RunDir, cfg: Config, stage: str, teacher: Teacher, queue: collections.deque) -> dict[str, float]:
    """Run the queued shards on fresh replicas; returns engine seconds per prompt set."""
    g, b = cfg.generation, cfg.backend
    total = len(queue)
    replicas = [
        spawn(f"gen/{stage}/{teacher.name}/{r}", b.name, teacher.model, _backend_kwargs(cfg, teacher),
              num_cpus=b.num_cpus, num_gpus=b.num_gpus, max_restarts=g.max_actor_restarts)
        for r in range(g.replicas)
    ]
    log.info("replicas %s: %s backend, model %s", [f"gen/{stage}/{teacher.name}/{r}" for r in range(g.replicas)],
             b.name, teacher.model)
    info = ray.get(replicas[0].info.remote())
    sampling = Sampling(g.max_new_tokens, g.temperature, g.top_p, g.n_samples)
    failures: collections.Counter = collections.Counter()
    inflight: dict[Any, tuple[int, tuple]] = {}
    free = list(range(len(replicas)))
    done, tokens, t0 = 0, 0, time.time()
    compute: dict[str, float] = {}
    try:
        while queue or inflight:
            while queue and free:
                r = free.pop(0)
                item = queue.popleft()
                job, i, shard = item
                reqs = [Request(p.id, p.messages, prompt_seed(cfg, teacher, job.data, p.id)) for p in shard]
                inflight[replicas[r].generate.remote(reqs, sampling, teacher.system)] = (r, item)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            r, item = inflight.pop(ready[0])
            free.append(r)
            job, i, shard = item
            try:
                result = ray.get(ready[0])
            except (RayActorError, RayTaskError) as e:
                failures[(job.data, i)] += 1
                n = failures[(job.data, i)]
                log.warning("shard %s/%s/%05d failed (%d/%d): %s", teacher.name, job.data, i, n,
                            g.max_shard_failures, type(e).__name__)
                if n >= g.max_shard_failures:
                    raise ShardFailed(
                        f"shard {teacher.name}/{job.data}/shard-{i:05d} failed {n} times; last cause: {e}"
                    ) from e
                queue.appendleft(item)
                continue
            recs = _records(cfg, job, info, result["completions"])
            compute[job.data] = compute.get(job.data, 0.0) + result["seconds"]
            rd.write_bytes(shard_path(job, i), "".join(json.dumps(x) + "\n" for x in recs).encode())
            done += 1
            tokens += sum(x["completion_tokens"] for x in recs)
            rate = tokens / max(1e-9, time.time() - t0)
            log.info("generate %s/%s: shard %d done (%d/%d shards, %.0f tok/s)", teacher.name, job.data, i, done,
                     total, rate)
    finally:
        for a in replicas:
            ray.kill(a)
    return compute


def _commit(rd: RunDir, cfg: Config, job: GenJob, n_prompts: int, compute_s: float) -> None:
    """Write step.json once every shard is in: record counts and checksums."""
    g = cfg.generation
    shards = []
    for i in range((n_prompts + g.shard_size - 1) // g.shard_size):
        with rd.fs.open(shard_path(job, i), "rb") as f:
            data = f.read()
        shards.append({"shard": i, "records": data.count(b"\n"), "sha256": hashlib.sha256(data).hexdigest()[:16]})
    summary = {"prompts": n_prompts, "records": sum(s["records"] for s in shards), "shards": shards,
               "compute_seconds": compute_s}  # engine time of this invocation (0 for shards made earlier)
    rec = {"step": f"generate/{job.teacher.name}/{job.data}", "key": job.key, "summary": summary,
           "time": time.time(), "teacher": dataclasses.asdict(job.teacher) | {"system": bool(job.teacher.system)}}
    rd.write_json(f"{job.path}/step.json", rec)
    rd.mark(rec["step"], "done", key=job.key, path=job.path, summary={"records": summary["records"]})

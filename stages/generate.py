"""Step 1 of a stage: every teacher answers every prompt set its curriculum uses, shard by shard.

    python -m cascade +stage=4b models=tiny       # runs this step for teacher 1b, among the others

Prompts are cut into fixed shards (in file order; size: cascade.driver.shard_size_for); a driver-side queue hands
the next shard to whichever replica is free. Each finished shard is written to
generations/<teacher>/<data>/<key>/shards/ atomically, so a re-run after a kill skips it; when all shards of a
prompt set are in, its step.json (counts and checksums) commits the set. Each replica holds
generation.shards_in_flight shards at once, so its engine never waits on the driver, and streams answers back as
they finish; the driver keeps them until their shard is whole. A replica that dies has its shards in flight re-
queued with only their missing prompts (Ray restarts the actor); a shard that fails generation.max_shard_failures
times stops the step with the shard and the cause named.
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
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

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
            "seed": cfg.seed, "warmup_prompts": b.warmup_prompts}


def _records(cfg: Config, job: GenJob, info: dict, completions: list[dict]) -> list[dict]:
    g = cfg.generation
    sampling = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p, "n": g.n_samples}
    return [
        {
            **{k: v for k, v in c.items() if g.logprobs or k not in ("top_ids", "top_logprobs", "token_ids")},
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
        n = job.shard_size
        for i in range(0, (len(ps) + n - 1) // n):
            if not rd.exists(shard_path(job, i)):
                queue.append((job, i, ps[i * n : (i + 1) * n]))
    stats = _generate(rd, cfg, stage, teacher, queue) if queue else {"compute": {}}
    for job in open_jobs:
        timing = {k: v for k, v in stats.items() if k != "compute"}
        _commit(rd, job, len(prompts[job.data]), stats["compute"].get(job.data, 0.0), timing)


def _generate(rd: RunDir, cfg: Config, stage: str, teacher: Teacher, queue: collections.deque) -> dict[str, Any]:
    """Run the queued shards on fresh replicas; returns engine seconds per prompt set and the step's timing.

    A replica that fails more often than Ray will restart it (generation.max_actor_restarts) leaves the pool;
    the step stops when a shard has failed generation.max_shard_failures times or no replica is left.
    """
    g, b = cfg.generation, cfg.backend
    names = [f"gen/{stage}/{teacher.name}/{r}" for r in range(g.replicas)]
    replicas = [
        spawn(n, b.name, teacher.model, _backend_kwargs(cfg, teacher), num_cpus=b.num_cpus, num_gpus=b.num_gpus,
              max_restarts=g.max_actor_restarts, tensor_parallel_size=b.tensor_parallel_size,
              shards_in_flight=g.shards_in_flight)
        for n in names
    ]
    log.info("replicas %s: %s backend, model %s", names, b.name, teacher.model)
    t_start = time.time()
    info = ray.get(replicas[0].info.remote())
    timing = {"engine_start_s": time.time() - t_start}
    sampling = Sampling(g.max_new_tokens, g.temperature, g.top_p, g.n_samples, g.logprobs)
    shard_failures: collections.Counter = collections.Counter()
    replica_failures: collections.Counter = collections.Counter()
    inflight: dict[Any, tuple[int, tuple]] = {}  # a shard's answer stream (or a probe) -> (replica, item)
    got: dict[tuple[str, int], dict[str, list[dict]]] = {}  # (job path, shard) -> prompt id -> its answers
    # one entry per free slot, replicas interleaved so that work spreads over them first
    free = [r for _ in range(g.shards_in_flight) for r in range(len(replicas))]
    dead: set[int] = set()
    probing: dict[int, float] = {}  # replica -> when its restart began
    compute: dict[str, float] = {}
    busy_until = [0.0] * len(replicas)
    progress = Progress(stage, teacher.name, len(queue))

    def probe(r: int) -> None:  # hand a restarting replica work again once it answers
        probing.setdefault(r, time.time())
        inflight[replicas[r].info.remote()] = (r, None)

    def requeue(r: int) -> None:  # every shard in flight on r goes back to the queue's front, in order
        refs = [ref for ref, (rr, it) in inflight.items() if rr == r and it is not None]
        items = [inflight.pop(ref)[1] for ref in refs]
        queue.extendleft(sorted(items, key=lambda it: (it[0].data, it[1]), reverse=True))
        free[:] = [x for x in free if x != r]

    def lost(r: int) -> None:  # its actor died under a call: Ray restarts it up to max_actor_restarts times
        replica_failures[r] += 1
        if replica_failures[r] > g.max_actor_restarts:
            dead.add(r)
            probing.pop(r, None)
        else:
            probe(r)

    t_gen = time.time()
    try:
        while queue or any(item is not None for _, item in inflight.values()):  # probes alone: done
            while queue and free:
                r = free.pop(0)
                item = queue.popleft()
                job, i, shard = item
                have = got.setdefault((job.path, i), {})  # answers already streamed in survive a replica's loss
                reqs = [Request(p.id, p.messages, prompt_seed(cfg, teacher, job.data, p.id))
                        for p in shard if p.id not in have]
                stream = replicas[r].generate.options(num_returns="streaming").remote(reqs, sampling, teacher.system)
                inflight[stream] = (r, item)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
            if not ready:
                _expire_probes(inflight, probing, dead, names, g.restart_timeout_s)
                _check_alive(dead, replicas, queue, g)
                continue
            r, item = inflight.pop(ready[0])
            if item is None:  # a probe of a restarting replica
                try:
                    ray.get(ready[0])
                    probing.pop(r, None)
                    free.extend([r] * g.shards_in_flight)
                except ActorUnavailableError:
                    time.sleep(1.0)
                    probe(r)
                except RayActorError:
                    lost(r)
                _check_alive(dead, replicas, queue, g)
                continue
            job, i, shard = item
            where = f"{teacher.name}/{job.data}/shard-{i:05d}"
            have = got[(job.path, i)]
            try:
                chunk = ray.get(next(ready[0]))
            except StopIteration:  # the stream ended: every answer of the shard is in
                chunk = None
            except ActorUnavailableError:  # restarting: not the shard's fault; wait until the replica is back
                log.warning("shard %s re-queued (%d of %d answers kept): %s is restarting", where, len(have),
                            len(shard), names[r])
                inflight[ready[0]] = (r, item)
                requeue(r)
                probe(r)
                continue
            except (RayActorError, RayTaskError) as e:
                shard_failures[where] += 1
                n = shard_failures[where]
                log.warning("shard %s failed on %s (%d/%d, %d of %d answers kept): %s", where, names[r], n,
                            g.max_shard_failures, len(have), len(shard), type(e).__name__)
                if n >= g.max_shard_failures:
                    raise ShardFailed(f"shard {where} failed {n} times; last cause: {e}") from e
                if isinstance(e, RayActorError):  # the replica is gone: its other shards in flight go back too
                    inflight[ready[0]] = (r, item)
                    requeue(r)
                    lost(r)
                else:
                    queue.appendleft(item)
                    free.append(r)
                _check_alive(dead, replicas, queue, g, e)
                continue
            if chunk is not None:
                for c in chunk["completions"]:
                    have.setdefault(c["prompt_id"], []).append(c)
                t0, t1 = chunk["interval"]  # engine-busy seconds: overlapping calls on a replica counted once
                compute[job.data] = compute.get(job.data, 0.0) + max(0.0, t1 - max(t0, busy_until[r]))
                busy_until[r] = max(busy_until[r], t1)
                inflight[ready[0]] = (r, item)  # read on
                log.debug("shard %s: %d of %d answers in", where, len(have), len(shard))
                continue
            free.append(r)
            missing = [p.id for p in shard if p.id not in have]
            if missing:
                raise ShardFailed(f"shard {where}: {names[r]} ended its stream without answers for {missing[:3]}")
            del got[(job.path, i)]
            done = [c for p in shard for c in sorted(have[p.id], key=lambda c: c["sample"])]
            recs = _records(cfg, job, info, done)
            if g.logprobs:  # written first: the JSONL file is what commits the shard
                rd.write_bytes(shard_path(job, i)[: -len(".jsonl")] + ".logprobs.npz", _pack_logprobs(recs, i))
            rd.write_bytes(shard_path(job, i), "".join(json.dumps(x) + "\n" for x in recs).encode())
            progress.shard_done(job.data, i, sum(x["completion_tokens"] for x in recs))
    finally:
        progress.close()
        for a in replicas:
            ray.kill(a)
    timing["generate_wall_s"] = time.time() - t_gen  # engine start excluded
    return {"compute": compute, **timing}


def _expire_probes(inflight: dict, probing: dict[int, float], dead: set[int], names: list[str],
                   timeout: float) -> None:
    """A replica that has not come back within `timeout` seconds (no node has room for it) counts as dead."""
    for ref, (r, item) in list(inflight.items()):
        if item is None and time.time() - probing.get(r, time.time()) > timeout:
            log.warning("%s did not come back within %.0f s: dropped from the pool", names[r], timeout)
            inflight.pop(ref)
            probing.pop(r, None)
            dead.add(r)


def _check_alive(dead: set[int], replicas: list, queue: collections.deque, g: Any,
                 cause: BaseException | None = None) -> None:
    """Stop, naming the next shard, when work is left and every replica is gone for good."""
    if len(dead) == len(replicas) and queue:
        job, i, _ = queue[0]
        raise ShardFailed(f"shard {job.teacher.name}/{job.data}/shard-{i:05d}: no live replica left "
                          f"({len(replicas)} died, max_actor_restarts={g.max_actor_restarts})"
                          + (f"; last cause: {cause}" if cause else "")) from cause


class Progress:
    """Shards done / total and tokens/s: a log line per shard, a progress bar on a terminal, Ray metrics
    (cascade_generation_tokens, cascade_generation_tokens_per_s, cascade_generation_shards_done/_total, tagged
    by stage and teacher) for the Ray dashboard's metrics view."""

    def __init__(self, stage: str, teacher: str, total: int) -> None:
        from ray.util.metrics import Counter, Gauge
        from tqdm import tqdm

        keys = ("stage", "teacher")
        self.tags = {"stage": stage, "teacher": teacher}
        self.tokens_metric = Counter("cascade_generation_tokens", "tokens generated by teachers", tag_keys=keys)
        self.rate_metric = Gauge("cascade_generation_tokens_per_s", "teacher generation throughput", tag_keys=keys)
        self.done_metric = Gauge("cascade_generation_shards_done", "shards committed", tag_keys=keys)
        total_metric = Gauge("cascade_generation_shards_total", "shards to generate", tag_keys=keys)
        total_metric.set(total, tags=self.tags)
        self.bar = tqdm(total=total, desc=f"generate {stage}/{teacher}", unit="shard", disable=None)
        self.teacher, self.total, self.done, self.tokens, self.t0 = teacher, total, 0, 0, time.time()

    def shard_done(self, data: str, shard: int, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        elapsed = time.time() - self.t0
        rate = self.tokens / max(1e-9, elapsed)
        eta = elapsed / self.done * (self.total - self.done)
        self.tokens_metric.inc(tokens, tags=self.tags)
        self.rate_metric.set(rate, tags=self.tags)
        self.done_metric.set(self.done, tags=self.tags)
        self.bar.update(1)
        log.info("generate %s/%s: shard %d done (%d/%d shards, %.0f tok/s, ETA %.0f s)", self.teacher, data, shard,
                 self.done, self.total, rate, eta)

    def close(self) -> None:
        self.bar.close()


def _pack_logprobs(recs: list[dict], shard: int) -> bytes:
    """Top-k log-probabilities of a shard as one .npz (top-k token ids int32 [T, k], their log-probs float16
    [T, k], the sampled token ids int32 [T]); each record keeps {file, offset, length} into it instead of lists."""
    import io

    import numpy as np

    ids, lps, sampled, offset = [], [], [], 0
    for r in recs:
        top_ids, top_lps = r.pop("top_ids") or [], r.pop("top_logprobs") or []
        tokens = r.pop("token_ids", None) or []
        r["logprobs"] = {"file": f"shard-{shard:05d}.logprobs.npz", "offset": offset, "length": len(top_ids)}
        ids += top_ids
        lps += top_lps
        sampled += tokens[: len(top_ids)]
        offset += len(top_ids)
    buf = io.BytesIO()
    np.savez_compressed(buf, token_ids=np.asarray(ids, dtype=np.int32), logprobs=np.asarray(lps, dtype=np.float16),
                        sampled=np.asarray(sampled, dtype=np.int32))
    return buf.getvalue()


def _commit(rd: RunDir, job: GenJob, n_prompts: int, compute_s: float, timing: dict) -> None:
    """Write step.json once every shard is in: record counts and checksums."""
    shards, tokens = [], 0
    for i in range((n_prompts + job.shard_size - 1) // job.shard_size):
        with rd.fs.open(shard_path(job, i), "rb") as f:
            data = f.read()
        shards.append({"shard": i, "records": data.count(b"\n"), "sha256": hashlib.sha256(data).hexdigest()[:16]})
        tokens += sum(json.loads(line)["completion_tokens"] for line in data.splitlines())
    # compute_seconds: engine time of this invocation; timing: this invocation's, shared by the teacher's sets
    summary = {"prompts": n_prompts, "records": sum(s["records"] for s in shards), "shards": shards,
               "completion_tokens": tokens, "compute_seconds": compute_s, **timing}
    rec = {"step": f"generate/{job.teacher.name}/{job.data}", "key": job.key, "summary": summary,
           "time": time.time(), "teacher": dataclasses.asdict(job.teacher) | {"system": bool(job.teacher.system)}}
    rd.write_json(f"{job.path}/step.json", rec)
    rd.mark(rec["step"], "done", key=job.key, path=job.path, summary={"records": summary["records"]})

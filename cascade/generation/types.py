"""What a generation backend is: its requests, sampling parameters, completions and protocol.

A backend owns one model and answers requests; it knows nothing of shards, storage or Ray. The
backends: cascade/generation/hf_backend.py (transformers) and cascade/generation/vllm_backend.py
(the only module of cascade that imports vllm); cascade/generation/actor.py picks one by name,
importing only that one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol


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
    # the sampled tokens (stop token included) when Sampling.logprobs
    token_ids: list[int] | None = None


def in_request_order(requests: list[Request],
                     chunks: Iterator[list[Completion]]) -> list[Completion]:
    """A stream's chunks gathered into one list in request order (then sample order): generate() of
    a backend."""
    order = {r.prompt_id: k for k, r in enumerate(requests)}
    return sorted((c for chunk in chunks for c in chunk),
                  key=lambda c: (order[c.prompt_id], c.sample))


class Backend(Protocol):
    def generate(self, requests: list[Request], sampling: Sampling,
                 system: str | None) -> list[Completion]: ...

    def stream(self, requests: list[Request], sampling: Sampling,
               system: str | None) -> Iterator[list[Completion]]: ...  # chunks as requests finish

    def info(self) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...  # free the engine (its processes, memory) before returning

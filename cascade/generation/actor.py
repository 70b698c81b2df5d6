"""The generation replica: a thin, named Ray actor that builds its backend in __init__ and forwards
calls.

Its name (gen/<stage>/<teacher>/<replica>) is what the Ray dashboard shows. It holds weights, not
run state: the driver decides what to generate and commits what comes back.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import ray

from cascade.generation.types import Backend, Request, Sampling


class GenerationWorker:
    def __init__(self, name: str, backend: str, model: str, options: Any,
                 common: dict[str, Any]) -> None:
        """The backend `backend` (cascade/generation/__init__.py: only its module is imported, vllm
        only when asked for) with its options and the kwargs every backend takes
        (graph.backend_kwargs)."""
        from cascade import generation, loads
        from cascade.storage import local_model

        self.name = name
        path = local_model(model)
        with loads.timed(path, "generate"):  # the engine's start, its weights' load included
            self.backend: Backend = generation.load(backend).create(path, options, **common)

    def __repr__(self) -> str:  # Ray prefixes the actor's log lines with this
        return self.name

    def info(self) -> dict[str, Any]:
        from cascade.cluster import device_name

        return {**self.backend.info(), "device": device_name()}

    def loads(self) -> list[dict]:
        """This replica's weight loads since the last call (cascade/loads.py)."""
        from cascade import loads

        return loads.taken()

    def node(self) -> str:
        """The id of the node this replica runs on (the pool checks it against Ray's node table)."""
        return ray.get_runtime_context().get_node_id()

    def shutdown(self) -> None:
        """Stop the engine; its processes have exited when this returns (the actor is killed next).
        """
        self.backend.shutdown()

    def score(self, seqs: list[list[int]], starts: list[int], k: int,
              vocab: int) -> list[list[list[tuple[int, float]]]]:
        """The teacher's top k (id, log-probability) at every position from each sequence's start
        (the backend's top_logprobs): kind on_policy's scores of the student's samples."""
        from cascade.failpoints import failpoint

        failpoint("score")
        return self.backend.top_logprobs(seqs, starts, k, vocab)

    def generate(self, requests: list[Request], sampling: Sampling,
                 system: str | None) -> Iterator[dict[str, Any]]:
        """A Ray streaming generator: chunks of completions (as dicts) as their requests finish,
        each with the interval it covers (calls in flight together overlap: the driver counts the
        union of these intervals as the engine's busy time). What has streamed out survives this
        actor's death."""
        t0 = time.time()
        for chunk in self.backend.stream(requests, sampling, system):
            t1 = time.time()
            yield {"completions": [dataclasses.asdict(c) for c in chunk], "interval": (t0, t1)}
            t0 = t1


def spawn(name: str, backend: str, model: str, options: Any, common: dict[str, Any], *,
          num_cpus: float,
          num_gpus: float, max_restarts: int, tensor_parallel_size: int = 1,
          shards_in_flight: int = 1, resources: dict[str, float] | None = None) -> Any:
    """Start one named replica (restarted by Ray up to max_restarts times; the driver re-queues its
    shards).

    It runs up to `shards_in_flight` generate() streams at once, in threads (see the backends for
    how they share the engine).

    Replicas spread over nodes. With tensor_parallel_size > 1 a replica first reserves a placement
    group of that many {GPU: 1} bundles with STRICT_PACK (one node, never spanning two), runs inside
    it, and the backend's workers (vLLM's Ray executor) are placed in the same group. `resources`:
    its custom Ray resources (a pool's label; with tensor parallelism, in the group's first bundle).
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cls = ray.remote(GenerationWorker)
    opts: dict[str, Any] = dict(name=name, max_restarts=max_restarts, max_task_retries=0,
                                max_concurrency=max(1, shards_in_flight) + 1)  # + 1: info() probes
    if tensor_parallel_size > 1:
        bundles = [{"GPU": 1, "CPU": 1} for _ in range(tensor_parallel_size)]
        bundles[0].update(resources or {})
        pg = ray.util.placement_group(bundles, strategy="STRICT_PACK", name=f"{name}/pg")
        ray.get(pg.ready())
        opts.update(num_cpus=0, num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_capture_child_tasks=True))
    else:
        opts.update(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy="SPREAD",
                    **({"resources": resources} if resources else {}))
    return cls.options(**opts).remote(name, backend, model, options, common)

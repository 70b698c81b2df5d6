"""Teacher generation: backends (hf, vllm) behind one small interface (types.py), the thin Ray actor
that owns one (actor.py) and the pool of replicas (pool.py).

A backend is one module, registered in BACKENDS; everything else (the schema, the step graph, the
generation step, the replica, the planner) asks it through `load` and never compares its name. The
module declares:

    Options                             a dataclass: its settings, the config's `backend.<name>`
                                        section (conf/backend/<name>.yaml), checked before Ray
                                        starts
    create(model, opts, dtype, revision, trust_remote_code, seed) -> Backend
                                        the engine, in the replica
    batch_capacity(opts) -> int         sequences one engine batch holds (the shard size, when auto)
    sample_identity(opts) -> JSON       what of its settings changes the samples (part of the step's
                                        key)
    tensor_parallel(opts) -> int        GPUs one replica spans in a placement group (1: none)
    gpus(opts, num_gpus) -> int         devices the planner counts per replica
    context(opts, model_context) -> int
                                        the longest prompt + answer it takes
    memory(opts, arch, g, nbytes, prompt_len, device_bytes, headroom)
                                        ({weights, runtime, kv_cache, limit: bytes per device},
                                        sequences decoded at once)
    fix(opts, fits) -> str | None       a setting that makes a replica fit, given fits(opts) -> bool
    scoring(opts, top_k) -> opts        its settings for a replica that also gives top_k
                                        log-probabilities per position (on_policy's scorer pool)

    python -m cascade +stage=4b models=tiny backend=vllm backend.vllm.max_model_len=1024
"""

from __future__ import annotations

import importlib
from dataclasses import field, make_dataclass
from types import ModuleType

BACKENDS = {"hf": "cascade.generation.hf_backend", "vllm": "cascade.generation.vllm_backend"}
DECLARES = ("Options", "create", "batch_capacity", "sample_identity", "tensor_parallel", "gpus",
            "context", "memory", "fix", "scoring")


def load(name: str) -> ModuleType:
    """A backend's module (imports only that one: vllm only when it is asked for)."""
    from cascade.validate import fail

    if name not in BACKENDS:
        fail(f"backend.name {name!r}: valid backends: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def with_sections(name: str, base: type) -> type:
    """The dataclass `base` with one more field per backend, its Options: the schema's
    `backend.<name>` sections."""
    fields = [(b, load(b).Options, field(default_factory=load(b).Options)) for b in BACKENDS]
    cls = make_dataclass(name, fields, bases=(base,))
    cls.__module__ = base.__module__
    return cls

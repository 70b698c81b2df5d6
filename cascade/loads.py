"""Every weight load, recorded: which model, its bytes, the seconds it took, the kind of process
that loaded it, and where its bytes came from. What a stage costs beyond its compute is mostly
this, at the seed's sizes (a 27B student is ~54 GB in bf16).

    model = load_model(path)              # cascade.modeling: recorded in this process
    loads.taken()                         # this process's records since the last call

A load is recorded where it happens: `cascade.modeling.load_model` (training workers, evaluation
tasks, the fusion check, the release's reference), the generation replicas and the on-policy vLLM
engines (an engine's start, its weights' load included). Not recorded: the harness's loads inside
lm-eval, and llama.cpp's loads of the release's GGUF files (not separable from their scoring). The
step that caused them puts them in its summary (`loads`: a list of records); `cascade status` and
the report sum them per stage and model.

A record: {model: the model's name (a run directory's step, e.g. 4b/train/02-p2_ethics, or the
last two parts of its path), bytes: its weight files' size, seconds, process: train | eval |
generate | release | driver, where: local (a directory on this node: a local run directory or the
model cache) | node cache (an object store's step pulled earlier into this node's cache) | object
store (pulled for this load; cascade.storage.local_model)}.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt")
_LOADS: list[dict] = []
_WHERE: dict[str, tuple[str, str]] = {}  # local path -> (where its bytes came from, its name)
process = "driver"  # set by the entry point of each kind of process


def pulled(local: str, where: str, name: str) -> None:
    """cascade.storage.local_model: `local` is a copy of the object store's `name`, pulled now
    (where="object store") or earlier (where="node cache")."""
    _WHERE[str(local)] = (where, name)


def name_of(path: str | Path) -> str:
    """A readable name: a run directory's step (<stage>/train/<NN-phase>) or the path's last two
    parts."""
    parts = Path(str(path).rstrip("/")).parts
    return "/".join(parts[-3:] if len(parts) >= 3 and parts[-2] == "train" else parts[-2:])


def weight_bytes(path: str | Path) -> int:
    """The size of the weight files in a model directory, or of a hub id's snapshot in the local HF
    cache (0: neither)."""
    p = Path(path)
    if not p.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(str(path), "config.json")
        except Exception:  # noqa: BLE001 - not a repo id: its size is not known
            found = None
        if not isinstance(found, str):
            return 0
        p = Path(found).parent
    return sum(f.stat().st_size for f in p.iterdir() if f.name.endswith(WEIGHTS) and f.is_file())


@contextlib.contextmanager
def timed(path: str | Path, kind: str | None = None) -> Iterator[None]:
    """Record the load of the model at `path` (a local directory or a hub id) that the body does."""
    t0 = time.perf_counter()
    yield
    where, name = _WHERE.get(str(path), ("local", name_of(path)))
    _LOADS.append({"model": name, "bytes": weight_bytes(path),
                   "seconds": round(time.perf_counter() - t0, 3), "process": kind or process,
                   "where": where})


def taken() -> list[dict]:
    """This process's load records since the last call (and forgets them)."""
    out = list(_LOADS)
    _LOADS.clear()
    return out


def add(records: list[dict]) -> None:
    """Records made in another process this one stands for (on_policy's scoring replicas, their
    loads carried by the phase's rank 0)."""
    _LOADS.extend(records)


def per_model(records: list[dict]) -> dict[str, dict]:
    """{model: {loads, bytes, seconds, processes: {process: loads}}} of a list of records."""
    out: dict[str, dict] = {}
    for r in records:
        m = out.setdefault(r["model"], {"loads": 0, "bytes": 0, "seconds": 0.0, "processes": {}})
        m["loads"] += 1
        m["bytes"] += r["bytes"]
        m["seconds"] = round(m["seconds"] + r["seconds"], 3)
        m["processes"][r["process"]] = m["processes"].get(r["process"], 0) + 1
    return out


def per_stage(p: Any) -> dict[str, list[dict]]:
    """{stage: the load records in the committed summaries of its steps} of a run graph (a
    teacher's generation steps counted with the first stage they answer for)."""
    out, seen = {}, set()
    for sp in p.stages:
        steps = [j.step for j in sp.gen_jobs] + [s for s in p.steps()
                                                 if s.name.startswith(f"{sp.name}/")]
        recs = []
        for step in steps:
            if step.name in seen:
                continue
            seen.add(step.name)
            rec = p.rd.committed(step) or {}
            recs += (rec.get("summary") or {}).get("loads") or []
        out[sp.name] = recs
    return out


def describe(pm: dict[str, dict]) -> str:
    """One line of per_model's figures: loads, models, GB, seconds, then each model's loads."""
    n = sum(v["loads"] for v in pm.values())
    gb = sum(v["bytes"] for v in pm.values()) / 1e9
    secs = sum(v["seconds"] for v in pm.values())
    each = ", ".join(f"{m} x{v['loads']}" for m, v in sorted(pm.items()))
    return f"{n} of {len(pm)} models, {gb:.3f} GB, {secs:.1f} s ({each})"

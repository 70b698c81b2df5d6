"""Overlap: a stage's first phases train while its teachers answer the prompt sets of its later
phases, when the cluster holds both at once. No Ray here: the driver decides with the live
cluster's resources, the planner with the ones it plans for.

    python -m cascade +stage=4b train.overlap=false     # one step after another, always

A stage's curriculum is cut after its leading phases that train on the first phase's prompt set
(the sandwich: P0 on ethics; P2, on ethics too, is curated before P0 trains but trains after P1).
Its teachers answer that set first and the leading phases train as one Ray Train job, while, beside
it, the teachers answer the other sets and their phases' datasets are curated; then a second job
trains the rest from the last phase committed (what a resumed run does: the same bytes). A stage
overlaps when train.overlap is on, its curriculum uses more than one prompt set, no leading phase
scores on its teachers' replicas (on_policy's scorer pool takes the pool's resources), and one
teacher's replicas (generation.replicas x backend.num_cpus, num_gpus, backend.resources) fit beside
the training workers (train.num_workers x their CPUs, a GPU each with train.use_gpu,
train.resources), and the evaluation's task when it scores the base during training, within the
cluster's totals. Custom resources (cluster.resources on a local Ray, `ray start --resources` on a
cluster) stand for pools: `backend.resources={inference: 1}`, `train.resources={training: 1}`. On
this 2-core machine training takes every CPU (train.cpus_per_worker unset) and nothing overlaps.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from cascade.config import Config


def split(sp: Any) -> tuple[int, list[str]] | None:
    """(how many leading phases train first, the prompt sets answered beside them, in curriculum
    order), or None: nothing to overlap (one prompt set)."""
    if not sp.phases:
        return None
    first = sp.phases[0].data
    lead = next((i for i, ph in enumerate(sp.phases) if ph.data != first), len(sp.phases))
    rest = list(dict.fromkeys(ph.data for ph in sp.phases if ph.data != first))
    return (lead, rest) if rest else None


def needs(cfg: Config, cpus_per_worker: int, spare: bool) -> Counter:
    """What training one stage's phases and one teacher's replicas take at once."""
    t, b, r = cfg.train, cfg.backend, cfg.generation.replicas
    need: Counter = Counter()
    need["CPU"] += t.num_workers * cpus_per_worker + r * b.num_cpus
    need["GPU"] += (t.num_workers if t.use_gpu else 0) + r * b.num_gpus
    for k, v in t.resources.items():
        need[k] += t.num_workers * v
    for k, v in b.resources.items():
        need[k] += r * v
    if spare:  # the base student scored while training runs (stages/evaluate.py)
        need["CPU"] += cfg.eval.num_cpus
        need["GPU"] += cfg.eval.num_gpus
    return need


def fits(need: Counter, totals: dict[str, float]) -> bool:
    """Whether `need` fits the cluster's totals (a resource they do not name: none of it)."""
    return all(v <= totals.get(k, 0.0) + 1e-9 for k, v in need.items() if v > 0)


def stages(cfg: Config, plans: list[Any], totals: dict[str, float], cpus_per_worker: int,
           spare: bool) -> set[str]:
    """The stages whose curriculum overlaps with its teachers' answers."""
    from cascade import phases

    if not cfg.train.overlap or not fits(needs(cfg, cpus_per_worker, spare), totals):
        return set()
    out = set()
    for sp in plans:
        cut = split(sp)
        if cut is None or not sp.teachers:
            continue
        lead = sp.phases[: cut[0]]
        if any(getattr(phases.options(ph.kind, ph.options, ph.model.name), "scorer", "") == "pool"
               for ph in lead):
            continue
        out.add(sp.name)
    return out

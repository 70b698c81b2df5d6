"""The steps of a stage, one module each, in run order (cascade.graph.RunGraph.work lists a run's):

    generate -> curate -> train (+ fuse) -> evaluate -> gate -> release

Each module declares the same two things, its side of the step contract:
- `run(ctx, work, todo) -> {step name: Made}`: make the outputs of `todo` (the work's steps not yet
  committed, in order) and hand each back to be committed (cascade.steps.Made: a staged directory,
  or files written in place). A step whose worker must publish it inside its own job (a training
  phase: the next phase starts from it) is left out; the protocol (cascade.steps.execute) checks and
  records it. `ctx` (cascade.graph.Context): the plan and the driver's handles.
- `cost(planner, work, todo) -> [row]`: what each step of `todo` needs and takes (cascade/plan.py
  prints them). A step's identity is its key (cascade/graph.py), computed before any step runs.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STEPS = {kind: f"stages.{kind}" for kind in ("generate", "curate", "train", "evaluate", "gate",
                                                    "release")}
DECLARES = ("run", "cost")


def load(kind: str) -> ModuleType:
    return importlib.import_module(STEPS[kind])

"""The step contract (stages/__init__.py says what each step module declares): what a step's run
hands back to be committed (Made), and the protocol every step is run and committed by (execute),
the driver's and the tests'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cascade.graph import Context, Work
from cascade.rundir import Step


@dataclass
class Made:
    """What a step's run made for one of its steps: its summary, and the directory it staged
    (RunDir.staging) to be published at the step's path, or None when its files were written in
    place, each atomically (a teacher's shards)."""

    summary: dict
    staging: str | None = None
    extra: dict = field(default_factory=dict)  # more fields of its step.json


def execute(ctx: Context, w: Work, step: Any) -> None:
    """Begin each of the work's steps (a committed one is skipped; one built from a step that runs
    again runs too), run the step's module (`step.run`) on the rest, commit what it made (a staged
    directory: RunDir.commit_dir; files in place: RunDir.commit_files, step.json last), check and
    record what its workers published. A failure marks the steps it did not commit as failed
    (`cascade status` says which and why)."""
    rd, todo, again = ctx.rd, [], set()
    for s in w.steps:
        if again & set(s.inputs):  # it starts from the output of a step that runs again
            rd.mark(s.name, "running", key=s.key, path=s.path)
        elif rd.begin(s) is not None:
            continue
        todo.append(s)
        again.add(s.path)
    if not todo:
        return
    try:
        made: dict[str, Made] = step.run(ctx, w, todo)
    except Exception as e:
        for s in todo:
            if rd.committed(s) is None:
                rd.mark(s.name, "failed", key=s.key, path=s.path,
                        error=f"{type(e).__name__}: {str(e)[:500]}")
        raise
    for s in todo:
        _commit(ctx, s, made.get(s.name))


def _commit(ctx: Context, s: Step, made: Made | None) -> None:
    rd = ctx.rd
    if made is not None and made.staging is not None:
        rd.commit_dir(made.staging, s, made.summary)
    elif made is not None:
        rd.commit_files(s, made.summary, **made.extra)
    elif (rec := rd.committed(s)) is not None:  # published by its worker inside the step's job
        rd.mark_done(s, rec)
    else:
        raise RuntimeError(f"{s.name}: its step ended without committing {s.path}")

"""The planner against real runs of the tiny preset: planned vs measured time, planned vs reported
counts.

    .venv/bin/python benchmarks/plan.py          # ~10 minutes on 2 CPU cores

1. `+stage=4b models=tiny plan=true` for a fresh run directory: nothing measured yet, the device's
   estimates;
2. the run itself, then each step's measured time (`cascade status`: a step's own seconds) and
   counts;
3. `+stage=27b models=tiny plan=true` on that run directory: 4b's steps are done; the rest is
   planned with the rates the 4b run measured (1b's generation, 4b's training), scaled by parameters
   for the other models;
4. the 27b run, compared the same way. Prints, per run, planned and measured seconds by kind of step
   and their ratio, and whether every planned count (prompts, samples, prompt tokens, optimizer
   steps) equals the run's, and peak resident memory (MB) by kind of process over both runs
   (cascade/peakmem.py). One JSON object on its last line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = ["models=tiny", "cluster.include_dashboard=false"]


def _cli(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "cascade", *args], check=True, capture_output=True,
                          text=True).stdout


def _json(text: str) -> dict:
    return json.loads(text[text.index("{\n"):])


def compare(plan: dict, status: dict, manifest: dict) -> dict:
    """Planned vs measured seconds by kind of step, and the counts planned vs reported."""
    measured = {r["step"]: r["elapsed_s"] or 0.0 for r in status["steps"]}
    by_kind: dict[str, list[float]] = {}
    counts_equal, teachers = True, set()
    for row in plan["steps"]:
        k = by_kind.setdefault(row["kind"], [0.0, 0.0])
        k[0] += row["hours"] * 3600
        if row["kind"] != "generate" or row["model"] not in teachers:
            # a teacher's sets share one timing
            k[1] += measured.get(row["step"], 0.0)
        if row["kind"] == "generate":
            teachers.add(row["model"])
        s, w = manifest[row["step"]]["summary"], row["work"]
        if row["kind"] == "generate":
            counts_equal &= (w["prompts"], w["samples"], w["prompt_tokens"]) == (
                s["prompts"],
                s["records"],
                s["prompt_tokens"],
            )
        elif row["kind"] == "train":
            counts_equal &= w["steps"] == s["steps"]
    out = {kind: {"planned_s": round(p, 1), "measured_s": round(m, 1),
                  "ratio": round(p / m, 2) if m else None}
           for kind, (p, m) in by_kind.items() if kind in ("generate", "train")}
    out["rate_sources"] = sorted({r["rate_source"] for r in plan["steps"] if r["rate_source"]})
    out["counts_equal"] = counts_equal
    return out


def main() -> None:
    from cascade.peakmem import PeakMemory

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as peak:
        run = Path(tmp) / "run"
        for stage in ("4b", "27b"):
            args = [f"+stage={stage}", f"run_dir={run}", *ARGS]
            plan = _json(_cli("plan", *args, "--json"))
            t0 = time.perf_counter()
            _cli(*args)
            wall = time.perf_counter() - t0
            status = _json(_cli("status", *args, "--json"))
            manifest = json.loads((run / "manifest.json").read_text())["steps"]
            out[f"stage_{stage}"] = {**compare(plan, status, manifest), "planned_total_s": round(
                plan["totals"]["hours"] * 3600, 1), "wall_s": round(wall, 1)}
    # the runs' drivers and workers, the planner's and status's processes
    out["peak_rss_mb"] = peak.megabytes()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

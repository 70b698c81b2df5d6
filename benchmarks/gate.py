"""Does the promotion gate (stages/gate.py) catch the students it should, and only those?

    .venv/bin/python benchmarks/gate.py               # 10 seeds, ~90 minutes on 2 CPU cores
    .venv/bin/python benchmarks/gate.py --fast        # the tests' short curriculum, ~35 minutes
    .venv/bin/python benchmarks/gate.py --seeds 3
    .venv/bin/python benchmarks/gate.py --fast --from 6    # seeds 6 to 10
    # a threshold chosen on seeds 1-10, checked on seeds it was not chosen on
    .venv/bin/python benchmarks/gate.py --fast --from 11 --seeds 20 --kinds healthy,shuffled \
        --set gate.min_conditioning_gain=0.05
    # models=gemma3-270m as the preset runs (its root, the chat model, used as is): a healthy and
    # a shuffled 4b (one seed)
    .venv/bin/python benchmarks/gate.py --real
    .venv/bin/python benchmarks/gate.py --real --build-root   # the root built first (+root=build)
    .venv/bin/python benchmarks/gate.py --real --root-run outputs/cascade   # a root built already

One tiny `+stage=4b` run directory (the preset's own curriculum, release off): the teacher's answers
are generated once; then, per seed (train.seed: the data order and the adapter's initialisation;
nothing else is rebuilt), the 4b student is trained again four ways and judged by the gate at its
default thresholds (conf/config.yaml):

    healthy      the preset's recipe
    shuffled     every phase on answers shuffled among the prompts of its data set (a seeded
                 derangement: tests/seeded_bad.py)
    lr_x100      every phase at 100 x the preset's learning rate
    contradict   every phase on answers contradicting the LEK-1 kernel, written for the test
                 (tests/data/contradicting_answers.json)

A bad student is caught when its verdict is not PROMOTE, or when its stage failed before its gate (a
training that diverged fails its fusion check: it never teaches either; counted apart); a healthy
one wrongly rejected when it is not PROMOTE. The goal: each bad kind caught in every seed, no
healthy one rejected. Prints a line per run (its verdict and the figures the gate read), then one
JSON object: caught per kind, healthy_rejected, and the settings. """

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _seeded_bad():
    """tests/seeded_bad.py: the kind of the bad students and the overrides that make each."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("seeded_bad", ROOT / "tests/seeded_bad.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["seeded_bad"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


SEEDED = _seeded_bad()
KINDS = SEEDED.KINDS
BASE = ["cluster.include_dashboard=false", "release.enabled=false"]


# --fast: tests/conftest.py's FAST curriculum (each phase at lr 1e-3, 16/16/6 steps, batch 4)
FAST = {"iters": (16, 16, 6), "lr": 1e-3, "batch_size": 4}


def _curriculum(fast: bool, preset: str) -> list[dict]:
    phases = yaml.safe_load((ROOT / f"conf/models/{preset}.yaml").read_text())["curriculum"]
    if fast:
        phases = [{**ph, "iters": n, "lr": FAST["lr"]} for ph, n in zip(phases, FAST["iters"])]
    return phases


def _args(kind: str, seed: int, fast: bool, preset: str) -> list[str]:
    """The overrides of one run: the curriculum (--fast: its steps, batch and lr) and the kind's."""
    phases = _curriculum(fast, preset)
    out = [f"models={preset}"]
    if fast:
        out += [f"train.batch_size={FAST['batch_size']}"]
        out += [f"curriculum.{i}.iters={ph['iters']}" for i, ph in enumerate(phases)]
        if kind != "lr_x100":  # which sets its own
            out += [f"curriculum.{i}.lr={ph['lr']:g}" for i, ph in enumerate(phases)]
    if kind in SEEDED.MODES:  # the phase's kind replaced: the preset's options for its own go
        out += [f"~curriculum.{i}.options.{k}" for i, ph in enumerate(phases)
                for k in ph.get("options", {})]
    return out + SEEDED.overrides(kind, seed, [ph["lr"] for ph in phases])


def _cascade(stage: str, run: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"),
                                                         os.environ.get("PYTHONPATH", "")])}
    flags = [a for i, a in enumerate(args) if a == "--config-dir" or
             (i and args[i - 1] == "--config-dir")]  # before the overrides, for Hydra's parser
    return subprocess.run([sys.executable, "-m", "cascade", *flags, *BASE, f"+stage={stage}",
                           f"run_dir={run}", *[a for a in args if a not in flags]],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def _verdict(run: Path, stage: str) -> dict:
    v = json.loads((run / f"{stage}/gate/verdict.json").read_text())
    return {"verdict": v["verdict"], "figures": {c["name"]: c["value"] for c in v["criteria"]},
            "failed": [c["name"] for c in v["criteria"] if c["passed"] is False]}


def judge(run: Path, kind: str, seed: int, args: list[str]) -> dict:
    t0 = time.perf_counter()
    r = _cascade("4b", run, args)
    if r.returncode:  # the stage failed before its gate (a diverged training's fusion check)
        said = [x for x in (r.stdout + r.stderr).splitlines() if "error" in x.lower()]
        return {"kind": kind, "seed": seed, "verdict": f"FAILED (exit {r.returncode})",
                "figures": {}, "failed": [], "error": (said or ["?"])[-1][-400:],
                "seconds": round(time.perf_counter() - t0, 1)}
    return {"kind": kind, "seed": seed, **_verdict(run, "4b"),
            "seconds": round(time.perf_counter() - t0, 1)}


def built_root(d: Path, extra: list[str], given: Path | None) -> tuple[list[str], dict]:
    """--real: the 270M preset's root teacher as the preset has it (the chat model, used as is);
    --build-root: built once (`+stage=1b +root=build`, kernel context distillation at the preset's
    curriculum) and judged by its own gate; every student after is taught by that model, read as
    a local directory. (The seeded kinds corrupt every phase of the curriculum, which the root's
    build shares: built per kind, the root would be bad too.) --root-run DIR: the root a run
    directory of `+root=build` already built (its curriculum, from its config.yaml, is in the JSON
    line)."""
    if given is None:
        root = {"stage": "1b", "as_is": "gemma3-270m:chat (the preset's root)"}
        print(json.dumps(root), flush=True)
        return [], root
    run = d / "root" if given == BUILD else given
    t0 = time.perf_counter()
    r = _cascade("1b", run, [f"models={PRESETS[True]}", "+root=build", *extra]) if (
        given == BUILD) else None
    if r is not None and r.returncode:
        raise SystemExit(f"the root's build failed (exit {r.returncode}):\n{r.stdout[-3000:]}"
                         f"\n{r.stderr[-3000:]}")
    last = sorted((run / "1b/train").glob("[0-9][0-9]-*"))[-1]
    built_by = yaml.safe_load((run / "config.yaml").read_text())["curriculum"]
    root = {"stage": "1b", **_verdict(run, "1b"), "model": str(last.relative_to(run)),
            "run_dir": None if r else str(given), "curriculum": built_by,
            "seconds": round(time.perf_counter() - t0, 1) if r else None}
    print(json.dumps(root), flush=True)
    return _local_root(d, str(last)), root


def _local_root(d: Path, model: str) -> list[str]:
    """The overrides that make `model` the root teacher, used as is. A stage's key path starts
    with a digit, which Hydra's command line refuses: a YAML."""
    (d / "conf/local").mkdir(parents=True)
    (d / "conf/local/root.yaml").write_text(
        f"# @package _global_\nstages:\n  1b: {{model: {json.dumps(model)}, build: false}}\n")
    return ["--config-dir", str(d / "conf"), "+local=root"]


PRESETS = {False: "tiny", True: "gemma3-270m"}
BUILD = Path("build")


def main() -> None:
    real = "--real" in sys.argv
    seeds = int(sys.argv[sys.argv.index("--seeds") + 1]) if "--seeds" in sys.argv else 10
    fast = "--fast" in sys.argv
    first = int(sys.argv[sys.argv.index("--from") + 1]) if "--from" in sys.argv else 1
    kinds = (sys.argv[sys.argv.index("--kinds") + 1].split(",") if "--kinds" in sys.argv
             else ["healthy", "shuffled"] if real else KINDS)
    if real and "--seeds" not in sys.argv:
        seeds = first
    # --set K=V ...: overrides every run takes (e.g. a gate threshold)
    extra = [a for i, a in enumerate(sys.argv) if i and sys.argv[i - 1] == "--set"]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"--kinds: {sorted(unknown)} not among {KINDS}")
    rows, preset, root = [], PRESETS[real], None
    with tempfile.TemporaryDirectory() as d:
        run = Path(d, "run")
        given = Path(sys.argv[sys.argv.index("--root-run") + 1]).resolve() if (
            "--root-run" in sys.argv) else BUILD if "--build-root" in sys.argv else None
        taught, root = built_root(Path(d), extra, given) if real else ([], None)
        for seed in range(first, seeds + 1):
            for kind in kinds:
                args = [*_args(kind, seed, fast, preset), *taught, *extra]
                rows.append(judge(run, kind, seed, args))
                print(json.dumps(rows[-1]), flush=True)
        thresholds = json.loads((run / "4b/gate/verdict.json").read_text())["thresholds"]
    n = seeds - first + 1
    missed = {k: sum(r["verdict"] == "PROMOTE" for r in rows if r["kind"] == k) for k in kinds}
    out = {"preset": preset, "seeds": list(range(first, seeds + 1)), "root": root,
           "caught": {k: f"{n - missed[k]}/{n}" for k in kinds if k != "healthy"},
           "failed_before_the_gate": {k: sum(r["verdict"].startswith("FAILED") for r in rows
                                             if r["kind"] == k) for k in kinds},
           "healthy_rejected": (f"{n - missed['healthy']}/{n}" if "healthy" in kinds else None),
           "all_caught": all(missed[k] == 0 for k in kinds if k != "healthy"),
           "healthy_all_promoted": missed.get("healthy") == n if "healthy" in kinds else None,
           "settings": {"command": " ".join(["+stage=4b", *BASE]), "fast": fast, "kinds": kinds,
                        "set": extra,
                        "example_args": {k: [*_args(k, first, fast, preset), *extra]
                                         for k in kinds},
                        "gate": thresholds, "curriculum": _curriculum(fast, preset),
                        "lr_x100": "every phase's lr x 100"},
           "seconds_per_run": round(sum(r["seconds"] for r in rows) / len(rows), 1)}
    print(json.dumps(out))

if __name__ == "__main__":
    main()

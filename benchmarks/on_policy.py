"""On-policy distillation (kind on_policy) against the seed's off-policy recipe (kind sft), at equal
training time, on the kernel build: the root teacher built by context distillation (`+stage=1b`,
stages.1b.build), where the teacher is the base model with the kernel in context and the student the
same base without it.

    .venv/bin/python benchmarks/on_policy.py               # tiny preset, ~6 minutes on 2 CPU cores
    # + models=gemma3-270m (long on CPU: ~90 minutes with --tune --real-iters 30)
    .venv/bin/python benchmarks/on_policy.py --real
    .venv/bin/python benchmarks/on_policy.py --real --real-iters 30    # half the 270M's steps
    .venv/bin/python benchmarks/on_policy.py --real --tune    # each recipe's lr chosen first
    .venv/bin/python benchmarks/on_policy.py --real --real-only --tune --real-iters 30  # no tiny
    .venv/bin/python benchmarks/on_policy.py --tune --lr-schedule cosine  # both recipes decay lr
    .venv/bin/python benchmarks/on_policy.py --tune --top-k 2048   # the tiny's whole vocabulary
    .venv/bin/python benchmarks/on_policy.py --real --real-only --real-iters 30 --real-lr 1.0e-4
    .venv/bin/python benchmarks/on_policy.py --tune --samples-per-prompt 2   # 2 answers a prompt

One phase on the ethics probes (the sandwich's P0), lr 1e-3 (the 270M: 5e-4, its preset's P0 lr, not
chosen on the held-out probes; 1e-3 moved both recipes away on 12-03), batch 4, seed 42, in one run
directory (the teacher's answers are generated once and reused). Off-policy trains 600 steps (60 on
the 270M) on the teacher's answers; on-policy (samples of at most 64 tokens, one per prompt, reverse
KL: beta 1, the teacher's context as in generation: the kernel) is first timed on 4 steps, then
given as many steps as fit in off-policy's training seconds, re-run with its step count corrected
until its training time is within 10 % of off-policy's (at most 3 runs, each printed). Measured by
the evaluation on the held-out probes (never used to choose a setting): the reverse KL(student ||
teacher) per token on the student's own sampled answers (before = the base, the same for both), the
log-likelihood of the teacher's held-out answers, ROUGE-L of greedy answers, the share of answers
that end by themselves, and the training seconds. The last line is one JSON object:
tiny_reverse_kl_cut (on-policy: 1 - after / before), tiny_on_vs_off (on-policy's held-out reverse KL
over off-policy's), and the same with real_ when --real ran (else null), beside every figure and the
settings.

--tune chooses each recipe's learning rate first, never on the held-out probes: the preset's
training probes only (its held-out rows dropped, `limit` applied), every fifth of them (by file
order) held out as the tuning split; each recipe trained at each lr of the preset's grid (TUNE_LRS;
off-policy its steps, then on-policy at equal time with off-policy at its chosen lr, its steps
corrected as above; before 2026-12-06 on-policy had the steps its timing run fitted in
off-policy's time at the preset's lr) and scored on the tuning split; the lr with the lower
reverse KL after is the one the comparison then runs with (a tie: the preset's). A best lr at
the edge of those tried is followed past it (LADDER's next, at most WIDEN=2 more; since
2026-12-06: the tiny grid's off-policy best had been its lowest, on-policy's its highest). Every
tuning run is printed and kept in the JSON line.

The sampled reverse KL is read on --eval-samples (4) seeded samples per held-out prompt
(eval.samples: one sample's figure moved by ~15 % between checkpoints 34 steps apart on the tiny
preset's 10 probes).
--samples-per-prompt sets on-policy's samples_per_prompt (1: one answer to each prompt a step);
with --tune it is the default of those tried (TUNE_SPP: 1, 2, 4 answers a prompt, each at the
on-policy lr chosen, timed by its own 4-step run and given the steps that fit in off-policy's time
at its lr; the lowest reverse KL on the tuning split is the one the comparison runs with).
--top-k sets on-policy's top_k (100, the kind's default): its loss compares the teacher's top k and
the tail as one outcome; 2048 is the tiny preset's whole vocabulary (the exact reverse KL).
--lr-schedule (train.lr_schedule: constant, the default, or cosine or linear down to 0 at each run's
last step) applies to both recipes, tuning runs included. """

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PHASE = "{name: p0_ethics, data: ethics, iters: %d, lr: %s%s}"
LR = {"tiny": "1.0e-3", "gemma3-270m": "5.0e-4"}  # the 270M: its preset's own P0 lr
SCHEDULE = "constant"  # train.lr_schedule of every run (--lr-schedule)
SAMPLES = 4  # eval.samples: sampled answers per held-out prompt for the reverse KL (--eval-samples)
TUNE_LRS = {"tiny": ("3.0e-3", "1.0e-3", "3.0e-4"), "gemma3-270m": ("5.0e-4", "1.0e-4")}
TUNE_SPP = (1, 2, 4)  # on-policy's samples_per_prompt tried by --tune, at its chosen lr
# where a recipe's best lr is the last of those tried in one direction, --tune tries the next of
# this ladder past it, at most WIDEN times (a best at the grid's edge says the grid was too narrow)
LADDER = ("1.0e-5", "3.0e-5", "1.0e-4", "3.0e-4", "1.0e-3", "3.0e-3", "1.0e-2", "3.0e-2")
WIDEN = 2
ON = (", kind: on_policy, options: {beta: 1.0, samples_per_prompt: %d, max_new_tokens: 64, "
      "teacher_context: teacher, top_k: %d}")
TOP_K = 100  # of the teacher's distribution in on-policy's loss (--top-k; the kind's default)
SAMPLES_PER_PROMPT = 1  # the student's answers to each prompt a step (--samples-per-prompt)


def _run(conf: Path, run: Path, preset: str, iters: int, on: bool, lr: str | None = None,
         data: Path | None = None, spp: int | None = None) -> dict:
    spp = spp or SAMPLES_PER_PROMPT
    phase = PHASE % (iters, lr or LR[preset], ON % (spp, TOP_K) if on else "")
    ethics = f"data:\n  ethics: {{path: {data}, limit: null}}\n" if data else ""
    (conf / "local" / "bench.yaml").write_text(
        f"# @package _global_\nstages:\n  1b: {{build: true}}\ncurriculum:\n  - {phase}\n{ethics}")
    args = ["--config-dir", str(conf), "+stage=1b", f"models={preset}", "+local=bench",
            f"run_dir={run}", "cluster.include_dashboard=false", "train.batch_size=4",
            "train.save_every=0", "release.enabled=false", f"train.lr_schedule={SCHEDULE}",
            f"eval.samples={SAMPLES}"]
    subprocess.run([sys.executable, "-m", "cascade", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    m = json.loads((run / "1b/eval/metrics.json").read_text())
    ph = json.loads((run / "1b/train/00-p0_ethics/step.json").read_text())["summary"]
    kl = m["reverse_kl"]["sampled"]
    return {"kind": "on_policy" if on else "sft", "iters": iters, "lr": lr or LR[preset],
            **({"samples_per_prompt": spp} if on else {}),
            "train_seconds": round(ph["train_seconds"], 1),
            "reverse_kl_before": kl["before"], "reverse_kl_after": kl["after"],
            "reverse_kl_cut": kl["cut"],
            "greedy_reverse_kl_after": m["reverse_kl"]["greedy"]["after"],
            "loglik_after": m["agreement"]["after"], "loglik_before": m["agreement"]["before"],
            "rouge_l_after": m["text_agreement"]["after"],
            "self_ended_after": m["self_ended"]["after"], "heldout": m["agreement"]["records"]}


def _tuning_split(preset: str, to: Path) -> Path:
    """The preset's training probes (its held-out rows dropped), every fifth held out: the
    tuning split."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    preset_data = yaml.safe_load((root / f"conf/models/{preset}.yaml").read_text()).get("data")
    limit = ((preset_data or {}).get("ethics") or {}).get("limit")  # the preset's data.ethics.limit
    rows = (root / "data/ethics_probes.jsonl").read_text().splitlines()
    rows = [json.loads(r) for r in rows[:limit]]
    train = [r for r in rows if r.get("split") != "heldout"]
    for i, r in enumerate(train):
        r["split"] = "heldout" if i % 5 == 4 else "train"
    to.write_text("".join(json.dumps(r) + "\n" for r in train))
    return to


def tune(preset: str, iters: int, on_iters: int, d: Path) -> tuple[dict, list[dict]]:
    """Each recipe's lr from TUNE_LRS, then on-policy's samples_per_prompt from TUNE_SPP at its lr,
    every on-policy run at equal time with off-policy at its lr (equal_time: `on_iters` a guess),
    chosen on the tuning split: ({"sft": lr, "on_policy": lr, "samples_per_prompt": n,
    "on_policy_iters": its steps}, every run)."""
    conf, run = d / "tune-conf", d / "tune-run"
    (conf / "local").mkdir(parents=True)
    data = _tuning_split(preset, d / "tuning-split.jsonl")
    runs, best, off_s = [], {}, 0.0

    def on_run(lr: str, n: int, steps: int) -> dict:  # at equal time with off-policy's best
        r, tries, _ = equal_time(lambda i: _run(conf, run, preset, i, True, lr, data, n), steps,
                                 off_s)
        print(json.dumps({"tuning": preset, **r, "tries": tries}), flush=True)
        runs.append(r)
        return r

    def off_run(lr: str) -> dict:
        runs.append(_run(conf, run, preset, iters, False, lr, data))
        print(json.dumps({"tuning": preset, **runs[-1]}), flush=True)
        return runs[-1]

    pick = _best(widened([off_run(lr) for lr in TUNE_LRS[preset]], off_run, preset), preset)
    best["sft"], off_s = pick["lr"], pick["train_seconds"]
    mine = widened([on_run(lr, SAMPLES_PER_PROMPT, on_iters) for lr in TUNE_LRS[preset]],
                   lambda lr: on_run(lr, SAMPLES_PER_PROMPT, on_iters), preset)
    best["on_policy"] = _best(mine, preset)["lr"]
    spps = {SAMPLES_PER_PROMPT: next(r for r in mine if r["lr"] == best["on_policy"])}
    for n in (n for n in TUNE_SPP if n != SAMPLES_PER_PROMPT):  # each timed by 4 steps first
        t = _run(conf, run, preset, 4, True, best["on_policy"], data, n)["train_seconds"]
        spps[n] = on_run(best["on_policy"], n, max(4, round(off_s / (t / 4))))
    n, pick = min(spps.items(),
                  key=lambda x: (x[1]["reverse_kl_after"], x[0] != SAMPLES_PER_PROMPT))
    return {**best, "samples_per_prompt": n, "on_policy_iters": pick["iters"]}, runs


def _best(runs: list[dict], preset: str) -> dict:
    """The lowest reverse KL after on the tuning split (a tie: the preset's lr)."""
    return min(runs, key=lambda r: (r["reverse_kl_after"], r["lr"] != LR[preset]))


def widened(runs: list[dict], run_at: Any, preset: str) -> list[dict]:
    """runs, and run_at(lr) at the LADDER's next lr past the best while the best is the edge of
    the lrs tried (at most WIDEN more)."""
    for _ in range(WIDEN):
        lrs = sorted({float(r["lr"]) for r in runs})
        f = float(_best(runs, preset)["lr"])  # the pick tune() makes, its tie-break too
        beyond = [x for x in LADDER if (float(x) > f if f == lrs[-1] else float(x) < f)]
        if len(lrs) < 2 or lrs[0] < f < lrs[-1] or not beyond:
            break
        runs.append(run_at(beyond[0] if f == lrs[-1] else beyond[-1]))
    return runs


def equal_time(run: Any, steps: int, seconds: float) -> tuple[dict, list[dict], float]:
    """run(steps) again, its steps corrected, until its training time is within 10 % of `seconds`
    (at most 3 runs): (the last run, each try, its time ratio)."""
    tries: list[dict] = []
    for _ in range(3):
        r = run(steps)
        tries.append({"iters": steps, "train_seconds": r["train_seconds"],
                      "reverse_kl_after": r["reverse_kl_after"]})
        ratio = r["train_seconds"] / seconds
        if abs(ratio - 1) <= 0.10:
            break
        steps = max(4, round(steps / ratio))
    return r, tries, ratio


def compare(preset: str, iters: int, tuned: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as d:
        conf, run = Path(d, "conf"), Path(d, "run")
        (conf / "local").mkdir(parents=True)
        probe = _run(conf, run, preset, 4, on=True)  # the on-policy step's time, a first guess
        off = _run(conf, run, preset, iters, on=False)
        steps = max(4, round(off["train_seconds"] / (probe["train_seconds"] / 4)))
        lrs, tuning = tune(preset, iters, steps, Path(d)) if tuned else ({}, [])
        if lrs.get("sft", LR[preset]) != LR[preset]:
            off = _run(conf, run, preset, iters, on=False, lr=lrs["sft"])
        on, tries, ratio = equal_time(
            lambda n: _run(conf, run, preset, n, on=True, lr=lrs.get("on_policy"),
                           spp=lrs.get("samples_per_prompt")),
            lrs.get("on_policy_iters", steps), off["train_seconds"])
    return {"off_policy": off, "on_policy": on, "on_policy_timing_run": probe,
            "tuned_lr": lrs or None, "tuning_runs": tuning,
            "on_policy_tries": tries, "time_ratio": round(ratio, 3),
            "reverse_kl_cut": on["reverse_kl_cut"],
            "on_vs_off": on["reverse_kl_after"] / off["reverse_kl_after"]}


def main() -> None:
    global SCHEDULE, SAMPLES, TOP_K, SAMPLES_PER_PROMPT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", action="store_true", help="also models=gemma3-270m")
    ap.add_argument("--real-only", action="store_true", help="with --real: not the tiny preset")
    ap.add_argument("--real-iters", type=int, default=60, help="off-policy's steps on the 270M")
    ap.add_argument("--tune", action="store_true", help="each recipe's lr chosen first")
    ap.add_argument("--real-lr", default=LR["gemma3-270m"],
                    help="both recipes' lr on the 270M without --tune (1.0e-4: --tune's choice)")
    ap.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine", "linear"))
    ap.add_argument("--eval-samples", type=int, default=4,
                    help="sampled answers per held-out prompt for the reverse KL (eval.samples)")
    ap.add_argument("--top-k", type=int, default=TOP_K,
                    help="on-policy's top_k: the teacher's top k and the tail in its loss")
    ap.add_argument("--samples-per-prompt", type=int, default=1,
                    help="on-policy's samples_per_prompt: the student's answers per prompt a step")
    a = ap.parse_args()
    real, SCHEDULE, SAMPLES, TOP_K = a.real, a.lr_schedule, a.eval_samples, a.top_k
    SAMPLES_PER_PROMPT = a.samples_per_prompt
    LR["gemma3-270m"] = a.real_lr
    # off-policy's steps (the 270M's: --real-iters); their time sets on-policy's
    iters = {"tiny": 600, "gemma3-270m": a.real_iters}
    out: dict = {"settings": {"stage": "1b (build: the kernel in the teacher's context)",
                              "phase": "p0_ethics",
                              "lr": LR, "lr_schedule": SCHEDULE, "eval_samples": SAMPLES,
                              "batch_size": 4, "seed": 42,
                              "on_policy": (ON % (SAMPLES_PER_PROMPT, TOP_K)).split("options: ")[1],
                              "off_policy_iters": iters,
                              "tune": {"lrs": TUNE_LRS, "samples_per_prompt": TUNE_SPP,
                                       "widen": {"ladder": LADDER, "at_most": WIDEN},
                                       "split": "every 5th training probe"}
                              if a.tune else None}}
    for preset, key in (("tiny", "tiny"), ("gemma3-270m", "real")):
        if (preset != "tiny" and not real) or (preset == "tiny" and a.real_only):
            out[f"{key}_reverse_kl_cut"] = out[f"{key}_on_vs_off"] = None
            continue
        r = compare(preset, iters[preset], a.tune)
        print(json.dumps({preset: r}, indent=1), flush=True)
        out[preset] = r
        out[f"{key}_reverse_kl_cut"], out[f"{key}_on_vs_off"] = r["reverse_kl_cut"], r["on_vs_off"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()

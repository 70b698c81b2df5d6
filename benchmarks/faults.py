"""Faults survived: one tiny cascade struck again and again, then compared with a run never struck.

    .venv/bin/python benchmarks/faults.py               # ~6 minutes on 2 CPU cores; --faults 8 --seed 0
    .venv/bin/python benchmarks/faults.py train.cpus_per_worker=null   # more overrides for every run

A reference run of `+stage=4b models=tiny` (smoke scale: small shards, answers one by one, short phases) first.
Then the same command in a fresh run directory, struck by a seeded series of faults, each while the run is under
way: kill -9 of the driver at a random moment, SIGTERM (pre-emption), the driver dying inside its Nth atomic
write, commit or manifest update (cascade/failpoints.py), a full disk at its Nth write. After each fault the
same command is started again; a run that completes (a fault came too late) is compared and the next faults
strike a fresh run directory, until --faults have struck; the last run then runs to the end. Records are compared
by id (every answer in the generation shards, every record of the curated datasets): lost = in the reference, not
in a struck run; duplicated = more than once in one file. Prints one JSON object on its last line: faults_injected,
faults_survived (those after which the run still ended with the reference's bytes), records_lost (goal 0),
records_duplicated (goal 0), bytes_identical, the faults by kind, and peak resident memory (MB) by kind of process
over every run (cascade/peakmem.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = ["+stage=4b", "models=tiny", "cluster.include_dashboard=false", "generation.shard_size=8",
        "backend.batch_size=1"] + [f"curriculum.{i}.{k}={v}" for i, n in enumerate((16, 16, 6))
                                   for k, v in (("iters", n), ("lr", 1e-3))]
DATA = ("generations/**/shard-?????.jsonl", "*/dataset/*/*.jsonl", "*/train/*/model.safetensors")


def _start(run: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cascade", *ARGS, f"run_dir={run}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def _until_done(proc: subprocess.Popen, timeout: float = 900) -> int:
    rc = proc.wait(timeout=timeout)
    time.sleep(3)  # the Ray processes of a killed driver go on their own, as in tests/conftest.py's kill9
    return rc


def _strike(run: Path, rng: random.Random, t_ref: float) -> tuple[str, int]:
    """One fault while the run is under way: (its kind, the struck run's exit code)."""
    kind = rng.choice(["kill9", "sigterm", "write", "commit", "manifest", "enospc"])
    if kind in ("kill9", "sigterm"):
        proc = _start(run)
        time.sleep(rng.uniform(0.15, 0.8) * t_ref)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kind == "kill9" else signal.SIGTERM)
        return kind, _until_done(proc)
    point = {"write": f"write:{rng.randint(4, 45)}", "commit": f"commit:{rng.randint(1, 6)}",
             "manifest": f"manifest:{rng.randint(2, 14)}", "enospc": f"write:{rng.randint(4, 45)}!enospc"}[kind]
    return f"{kind}({point})", _until_done(_start(run, {"CASCADE_FAILPOINT": point}))


def _records(run: Path) -> tuple[collections.Counter, int]:
    """(record ids over every shard and dataset file, ids seen more than once within one file)."""
    ids: collections.Counter = collections.Counter()
    dup = 0
    for pat in DATA[:2]:
        for f in sorted(run.glob(pat)):
            here = collections.Counter()
            for line in f.read_text().splitlines():
                r = json.loads(line)
                here[f"{f.relative_to(run).parent}:{r.get('id') or (r['prompt_id'], r['sample'])}"] += 1
            dup += sum(n - 1 for n in here.values() if n > 1)
            ids.update(here.keys())
    return ids, dup


def _bytes(run: Path) -> dict[str, bytes]:
    out = {}
    for pat in DATA:
        for p in sorted(run.glob(pat)):
            rel = p.relative_to(run).parts
            rel = rel[:3] + rel[4:] if rel[0] == "generations" else rel  # drop the content key
            out["/".join(rel)] = p.read_bytes()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faults", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="more config overrides for every run, e.g. train.cpus_per_worker=2")
    a = ap.parse_args()
    ARGS.extend(a.overrides)
    from cascade.peakmem import PeakMemory

    peak = PeakMemory().start()  # every run's driver and workers, struck or not
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    assert _until_done(_start(tmp / "ref")) == 0, "the reference run failed"
    t_ref = time.perf_counter() - t0
    rng, kinds = random.Random(a.seed), collections.Counter()
    ref_ids, _ = _records(tmp / "ref")
    ref_bytes = _bytes(tmp / "ref")
    injected = survived = lost = dup = episodes = 0
    identical = True
    while injected < a.faults:  # episodes: a fresh run directory struck until it completes
        struck, hits = tmp / f"struck-{episodes}", 0
        episodes += 1
        while injected < a.faults:
            kind, rc = _strike(struck, rng, t_ref)
            if rc == 0:  # the run completed before this fault struck
                break
            injected, hits = injected + 1, hits + 1
            kinds[kind.split("(")[0]] += 1
        if _until_done(_start(struck)) != 0:
            identical = False
            continue
        ids, d = _records(struck)
        same = _bytes(struck) == ref_bytes
        lost, dup, identical = lost + len(set(ref_ids) - set(ids)), dup + d, identical and same
        survived += hits if same and not d and set(ref_ids) <= set(ids) else 0
    peak.stop()
    print(json.dumps({"faults_injected": injected, "faults_survived": survived, "runs_struck": episodes,
                      "records_reference": len(ref_ids), "records_lost": lost, "records_duplicated": dup,
                      "bytes_identical": identical, "faults_by_kind": dict(kinds),
                      "reference_wall_s": round(t_ref, 1), "seed": a.seed, "peak_rss_mb": peak.megabytes()}))


if __name__ == "__main__":
    main()

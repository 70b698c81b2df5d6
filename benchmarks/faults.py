"""Faults survived: one tiny cascade struck again and again, then compared with a run never struck.

    .venv/bin/python benchmarks/faults.py  # ~6 minutes on 2 CPU cores; --faults 8 --seed 0
    # on an S3 API server behind a failing proxy
    .venv/bin/python benchmarks/faults.py --store s3 --faults 16
    .venv/bin/python benchmarks/faults.py train.cpus_per_worker=null  # more overrides for every run

A reference run of `+stage=4b models=tiny` (smoke scale: small shards, answers one by one, short
phases) first. Then the same command in a fresh run directory, struck by a seeded series of faults,
each while the run is under way: kill -9 of the driver at a random moment, SIGTERM (pre-emption),
the driver dying inside its Nth atomic write, commit or manifest update (cascade/failpoints.py), a
full disk at its Nth write, two drivers started at once on the run directory (one must be refused;
the other is killed at a random moment: twin_starts_both_running counts the times both ran, goal 0),
the driver frozen (SIGSTOP) for 2-6 s and thawed, a second driver started with its wall clock an
hour ahead while the first runs (it must be refused: clock_step_takeovers, goal 0). With --store s3
every run directory is on an S3 API server (moto's, on 127.0.0.1) reached through a proxy
(tests/store_proxy.py) that also strikes: it refuses and cuts connections, stalls them (past the
store timeout, CASCADE_STORE_TIMEOUT_S=2 here) or answers 503 SlowDown for 3-6 s while a run goes
on, and between runs a node copy of a model in the node cache is altered in place (a stale copy: it
must be pulled again, not trained on). Kinds are drawn in seeded rounds, each kind once per round,
so --faults of at least the kinds' number strikes each kind. After each fault the same command is
started again; a run that completes (a fault came too late) is compared and the next faults strike a
fresh run directory, until --faults have struck; the last run then runs to the end. Records are
compared by id (every answer in the generation shards, every record of the curated datasets): lost =
in the reference, not in a struck run; duplicated = more than once in one file. Prints one JSON
object on its last line: faults_injected, faults_survived (those after which the run still ended
with the reference's bytes), records_lost (goal 0), records_duplicated (goal 0), bytes_identical,
the faults by kind, and peak resident memory (MB) by kind of process over every run
(cascade/peakmem.py).
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
        "backend.hf.batch_size=1"] + [f"curriculum.{i}.{k}={v}" for i, n in enumerate((16, 16, 6))
                                   for k, v in (("iters", n), ("lr", 1e-3))]
DATA = ("generations/**/shard-?????.jsonl", "*/dataset/*/*.jsonl", "*/train/*/model.safetensors")


# the driver with its wall clock an hour ahead (time.time only: the lease's liveness checks use
# clock ticks)
CLOCK_AHEAD = ("import runpy, sys, time; _t = time.time; time.time = lambda: _t() + 3600; "
               "sys.argv = ['cascade', *sys.argv[1:]]; runpy.run_module('cascade', "
               "run_name='__main__')")
STORE: dict = {}  # --store s3: "env" for every run, "proxy", "fs" (straight to the server), "cache"


def _start(run: Path | str, env: dict | None = None, clock_ahead: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-c", CLOCK_AHEAD] if clock_ahead else [sys.executable, "-m", "cascade"]
    return subprocess.Popen([*cmd, *ARGS, f"run_dir={run}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, **STORE.get("env", {}), **(env or {})})


def _until_done(proc: subprocess.Popen, timeout: float = 900) -> int:
    """The driver's exit code, once it and the Ray processes it started (seen while it ran) are
    gone: a killed driver's go on their own, as in tests/conftest.py's kill9; the next run must not
    meet them."""
    import psutil

    owned = {c.pid: c for c in SIGNALLED.pop(proc.pid, [])}
    t0 = time.time()
    while proc.poll() is None:
        if time.time() - t0 > timeout:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        try:
            owned.update((c.pid, c) for c in psutil.Process(proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.5)
    psutil.wait_procs(list(owned.values()), timeout=15)
    return proc.returncode


SIGNALLED: dict[int, list] = {}  # a signalled driver's processes, seen just before the signal


def _signal(proc: subprocess.Popen, sig: int) -> None:
    import psutil

    try:
        SIGNALLED.setdefault(proc.pid, []).extend(psutil.Process(proc.pid).children(recursive=True))
    except psutil.NoSuchProcess:
        pass
    proc.send_signal(sig)


TWO_HOLDERS = []  # twin starts in which both drivers ran (goal: none)
CLOCK_TAKEOVERS = []  # drivers with a stepped clock that ran beside a live one (goal: none)
KINDS = ["kill9", "sigterm", "write", "commit", "manifest", "enospc", "twin", "pause", "clock"]
STORE_KINDS = ["outage", "stall", "slowdown", "stale"]


def _stale(rng: random.Random) -> bool:
    """A node copy of a model altered in place (one byte of one file flipped, its marker kept): True
    if one was."""
    files = sorted(f for d in sorted(STORE["cache"].glob("runs/models/*/.pulled"))
                   for f in d.parent.rglob("*")
                   if d.stat().st_mtime >= STORE["since"]  # a copy this run directory's runs used
                   and f.is_file() and f.name != ".pulled" and f.stat().st_size)
    if not files:
        return False
    f = rng.choice(files)
    data = bytearray(f.read_bytes())
    data[rng.randrange(len(data))] ^= 0x01
    f.write_bytes(bytes(data))
    return True


def _strike(run: Path | str, kind: str, rng: random.Random, t_ref: float) -> tuple[str, int, bool]:
    """One fault while the run is under way: (its kind, the struck run's exit code, whether it
    struck)."""
    if kind == "stale":  # between runs: then the run goes on and must not use the altered copy
        struck = _stale(rng)
        return kind, _until_done(_start(run)), struck
    if kind in ("outage", "stall", "slowdown"):  # the store fails for 3-6 s while the run goes on
        proc = _start(run)
        time.sleep(rng.uniform(0.15, 0.8) * t_ref)
        struck = proc.poll() is None
        if struck:
            STORE["proxy"].set({"outage": "refuse"}.get(kind, kind))
            time.sleep(rng.uniform(3, 6))
            STORE["proxy"].set("ok")
        return kind, _until_done(proc), struck
    if kind == "clock":
        # a second driver, its wall clock an hour ahead, while the first runs: refused (exit 2)
        proc = _start(run)
        time.sleep(rng.uniform(0.15, 0.8) * t_ref)
        if proc.poll() is not None:
            return kind, _until_done(proc), False
        rc = _until_done(_start(run, clock_ahead=True))
        if rc != 2 and proc.poll() is None:
            CLOCK_TAKEOVERS.append(rc)
        return kind, _until_done(proc), True
    if kind in ("kill9", "sigterm"):
        proc = _start(run)
        time.sleep(rng.uniform(0.15, 0.8) * t_ref)
        struck = proc.poll() is None
        if struck:
            _signal(proc, signal.SIGKILL if kind == "kill9" else signal.SIGTERM)
        return kind, _until_done(proc), struck
    if kind == "twin":
        # two drivers started at once on one run directory: one must be refused (exit 2)
        a, b = _start(run), _start(run)
        time.sleep(rng.uniform(0.15, 0.8) * t_ref)
        rcs = [p.poll() for p in (a, b)]
        if 2 not in rcs:
            TWO_HOLDERS.append(rcs)
        for p in (a, b):
            if p.poll() is None:
                _signal(p, signal.SIGKILL)
        # the one that held the run directory
        ran = [rc for rc in (_until_done(p) for p in (a, b)) if rc != 2]
        return kind, ran[0] if ran else 2, True
    if kind == "pause":
        # the driver frozen (SIGSTOP) for 2-6 s, then thawed: it must go on to the same bytes
        proc = _start(run)
        time.sleep(rng.uniform(0.15, 0.8) * t_ref)
        struck = proc.poll() is None
        if struck:
            proc.send_signal(signal.SIGSTOP)
            time.sleep(rng.uniform(2, 6))
            proc.send_signal(signal.SIGCONT)
        return kind, _until_done(proc), struck
    point = {"write": f"write:{rng.randint(4, 45)}", "commit": f"commit:{rng.randint(1, 6)}",
             "manifest": f"manifest:{rng.randint(2, 14)}",
             "enospc": f"write:{rng.randint(4, 45)}!enospc"}[kind]
    rc = _until_done(_start(run, {"CASCADE_FAILPOINT": point}))
    return f"{kind}({point})", rc, rc != 0


def _local(run: Path | str, tmp: Path) -> Path:
    """A run directory to read: itself, or (--store s3) a copy fetched straight from the server."""
    if isinstance(run, Path):
        return run
    dest = tmp / "fetched" / run.rsplit("/", 1)[-1]
    STORE["fs"].get(run.removeprefix("s3://"), str(dest), recursive=True)
    return dest


def _store(tmp: Path, seed: int) -> str:
    """An S3 API server and the failing proxy in front of it; returns the bucket every run directory
    goes in."""
    import importlib.util
    import socket

    import fsspec

    spec = importlib.util.spec_from_file_location(  # the tests' proxy, loaded from its file
        "store_proxy", Path(__file__).resolve().parents[1] / "tests" / "store_proxy.py")
    proxy_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proxy_mod)
    StoreProxy = proxy_mod.StoreProxy  # noqa: N806 - a class

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1"}
    # this process: straight to it
    os.environ.update({**creds, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    fs = fsspec.filesystem("s3", use_listings_cache=False)
    for _ in range(100):
        try:
            fs.ls("")
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    proxy = StoreProxy(port)
    STORE.update(server=server, proxy=proxy, fs=fs, cache=tmp / "cache",
                 env={**creds, "AWS_ENDPOINT_URL": proxy.url, "CASCADE_STORE_TIMEOUT_S": "2",
                      "CASCADE_CACHE": str(tmp / "cache")})
    bucket = f"faults-{seed}"
    fs.mkdir(bucket)
    return f"s3://{bucket}"


def _records(run: Path) -> tuple[collections.Counter, int]:
    """(record ids over every shard and dataset file, ids seen more than once within one file)."""
    ids: collections.Counter = collections.Counter()
    dup = 0
    for pat in DATA[:2]:
        for f in sorted(run.glob(pat)):
            here = collections.Counter()
            for line in f.read_text().splitlines():
                r = json.loads(line)
                here[
                    f"{f.relative_to(run).parent}:{r.get('id') or (r['prompt_id'], r['sample'])}"
                ] += 1
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
    ap.add_argument("--store", choices=("local", "s3"), default="local")
    ap.add_argument("overrides", nargs="*",
                    help="more config overrides for every run, e.g. train.cpus_per_worker=2")
    a = ap.parse_args()
    ARGS.extend(a.overrides)
    from cascade.peakmem import PeakMemory

    peak = PeakMemory().start()  # every run's driver and workers, struck or not
    tmp = Path(tempfile.mkdtemp())
    root: Path | str = tmp if a.store == "local" else _store(tmp, a.seed)
    def where(name: str) -> Path | str:
        return tmp / name if a.store == "local" else f"{root}/{name}"
    t0 = time.perf_counter()
    assert _until_done(_start(where("ref"))) == 0, "the reference run failed"
    t_ref = time.perf_counter() - t0
    rng, kinds = random.Random(a.seed), collections.Counter()
    ref = _local(where("ref"), tmp)
    ref_ids, _ = _records(ref)
    ref_bytes = _bytes(ref)
    injected = survived = lost = dup = episodes = 0
    identical = True
    all_kinds, drawn = KINDS + (STORE_KINDS if a.store == "s3" else []), []
    while injected < a.faults:  # episodes: a fresh run directory struck until it completes
        struck, hits = where(f"struck-{episodes}"), 0
        episodes += 1
        STORE["since"] = time.time()
        while injected < a.faults:
            if not drawn:  # a seeded round: every kind once, in a random order
                drawn = rng.sample(all_kinds, k=len(all_kinds))
            kind, rc, hit = _strike(struck, drawn.pop(), rng, t_ref)
            if hit:
                injected, hits = injected + 1, hits + 1
                kinds[kind.split("(")[0]] += 1
            if rc == 0:  # the run completed (before this fault struck, or through it: a pause)
                break
        if _until_done(_start(struck)) != 0:
            identical = False
            continue
        got = _local(struck, tmp)
        ids, d = _records(got)
        same = _bytes(got) == ref_bytes
        lost, dup, identical = lost + len(set(ref_ids) - set(ids)), dup + d, identical and same
        survived += hits if same and not d and set(ref_ids) <= set(ids) else 0
    peak.stop()
    if STORE:
        STORE["server"].terminate()
    print(json.dumps({"store": a.store, "store_proxy": STORE["proxy"].seen if STORE else None,
                      "faults_injected": injected, "faults_survived": survived,
                      "runs_struck": episodes,
                      "records_reference": len(ref_ids), "records_lost": lost,
                      "records_duplicated": dup,
                      "bytes_identical": identical, "faults_by_kind": dict(kinds),
                      "twin_starts_both_running": len(TWO_HOLDERS),
                      "clock_step_takeovers": len(CLOCK_TAKEOVERS),
                      "reference_wall_s": round(t_ref, 1), "seed": a.seed,
                      "peak_rss_mb": peak.megabytes()}))


if __name__ == "__main__":
    main()

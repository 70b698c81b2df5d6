"""Damaged run state: each injected fault ends in the same bytes as an undamaged run, or a clear
error; nothing half-committed. Faults here strike the files of a finished tiny run (a copy of the
shared one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import FAST, compose, copy_run, manifest, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.faults]
ARGS = [*FAST, "+stage=4b", "models=tiny"]


def _rerun(run: Path, *extra: str, env: dict | None = None):
    r = run_cli(*ARGS, f"run_dir={run}", *extra, env=env)
    assert r.returncode == 0, r.stdout[-4000:]
    assert all(s["state"] == "done" for s in manifest(run)["steps"].values())
    return r


def _one(run: Path, pattern: str) -> Path:
    found = sorted(run.glob(pattern))
    assert found, pattern
    return found[0]


def test_torn_manifest_is_treated_as_absent(tiny_4b_run, tmp_path):
    run = copy_run(tiny_4b_run, tmp_path / "run")
    (run / "manifest.json").write_text('{"version": 1, "steps": {"gener')
    r = run_cli(*ARGS, f"run_dir={run}")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout[-3000:]
    (run / "4b/eval/step.json").unlink()  # a run with work to do writes the manifest anew
    _rerun(run)
    assert {"generate/1b/ethics", "4b/dataset/p0_ethics", "4b/eval"} <= set(manifest(run)["steps"])


@pytest.mark.parametrize("fault", ["torn", "emptied"])
def test_torn_step_record_reruns_that_step_to_the_same_bytes(tiny_4b_run, tmp_path, fault):
    run = copy_run(tiny_4b_run, tmp_path / "run")
    step = run / "4b/dataset/p1_composure/step.json"
    before = (run / "4b/dataset/p1_composure/train.jsonl").read_bytes()
    step.write_text(step.read_text()[:40] if fault == "torn" else "")
    stray = run / "4b/dataset/p0_ethics/train.jsonl.tmp-0badc0de"  # an interrupted atomic write
    stray.write_text("half")
    r = _rerun(run)
    assert ("[run ] 4b/dataset/p1_composure" in r.stdout
            and "[skip] 4b/train/p1_composure" in r.stdout)
    assert (run / "4b/dataset/p1_composure/train.jsonl").read_bytes() == before
    assert json.loads(step.read_text())["files"]["train.jsonl"][0] == len(before)
    assert not stray.exists()


def test_truncated_fused_model_is_retrained_bitwise(tiny_4b_run, tmp_path):
    run = copy_run(tiny_4b_run, tmp_path / "run")
    weights = run / "4b/train/02-p2_ethics/model.safetensors"
    before = weights.read_bytes()
    weights.write_bytes(before[: len(before) // 2])
    r = _rerun(run)
    assert "committed step 4b/train/p2_ethics is damaged (model.safetensors has" in r.stdout
    assert "[skip] 4b/train/p1_composure" in r.stdout
    assert weights.read_bytes() == before


def test_bit_flip_is_found_by_verify(tiny_4b_run, tmp_path):
    run = copy_run(tiny_4b_run, tmp_path / "run")
    data = run / "4b/dataset/p0_ethics/heldout.jsonl"
    before = data.read_bytes()
    flipped = bytearray(before)
    flipped[len(flipped) // 2] ^= 0x01
    data.write_bytes(bytes(flipped))
    r = _rerun(run)  # sizes only: a same-size change is not seen without verify
    assert "nothing to do" in r.stdout
    r = _rerun(run, "verify=true")
    assert "4b/dataset/p0_ethics is damaged (heldout.jsonl does not match its sha256)" in r.stdout
    assert data.read_bytes() == before


@pytest.mark.parametrize("fault", ["truncated", "emptied", "torn-line"])
def test_damaged_shard_is_generated_again_to_the_same_bytes(tiny_4b_run, tmp_path, fault):
    run = copy_run(tiny_4b_run, tmp_path / "run")
    shard = _one(run, "generations/1b/ethics/*/shards/shard-00001.jsonl")
    before = shard.read_bytes()
    lines = before.splitlines(keepends=True)
    shard.write_bytes({"truncated": b"".join(lines[:-2]), "emptied": b"",
                       "torn-line": b"".join(lines[:-1]) + lines[-1][:10]}[fault])
    r = _rerun(run)
    assert ("generate/1b/ethics is damaged" in r.stdout
            and "generate 1b/ethics: shard 1 done" in r.stdout)
    assert shard.read_bytes() == before
    # the same answers: what was built on them stands
    assert "[skip] 4b/dataset/p0_ethics" in r.stdout


def test_a_bit_flipped_in_a_shard_before_its_set_commits_is_generated_again(tiny_4b_run,
                                                                            tmp_path):
    """A shard commits itself before its set's step.json records its checksum (a run stopped
    mid-generation): the seal written beside it finds a same-size change that still parses - an
    answer's letter - and the shard is generated again to the same bytes; so is one whose partial
    answers were altered."""
    run = copy_run(tiny_4b_run, tmp_path / "run")
    step = _one(run, "generations/1b/ethics/*/step.json")
    step.unlink()  # the set as a run stopped while generating it left it
    shards = step.parent / "shards"
    one, two = shards / "shard-00001.jsonl", shards / "shard-00002.jsonl"
    before = {f: f.read_bytes() for f in (one, two)}
    flipped = bytearray(before[one])
    at = before[one].index(b'"text": "') + len(b'"text": "')
    at += next(i for i, c in enumerate(before[one][at:]) if chr(c).isalpha())
    flipped[at] ^= 0x20  # a letter's case: the same size, still JSON
    one.write_bytes(bytes(flipped))
    # shard 2 unfinished, its answers so far saved with their seal, then one of them altered
    partial = two.with_name("shard-00002.partial.jsonl")
    answers = [{"prompt_id": json.loads(x)["prompt_id"], "sample": 0, "text": "x"}
               for x in before[two].splitlines()[:2]]
    from cascade.rundir import RunDir, jsonl

    RunDir(str(run)).write_sealed(str(partial), jsonl(answers))
    partial.write_bytes(partial.read_bytes().replace(b'"x"', b'"y"', 1))
    for f in (two, two.with_name(two.name + ".sha256")):
        f.unlink()
    r = _rerun(run)
    assert "shard-00001.jsonl does not match its seal" in r.stdout, r.stdout[-3000:]
    assert "partial shard" in r.stdout and "is damaged" in r.stdout
    assert ("generate 1b/ethics: shard 1 done" in r.stdout
            and "generate 1b/ethics: shard 2 done" in r.stdout)
    assert {f: f.read_bytes() for f in (one, two)} == before and not partial.exists()
    assert "[skip] 4b/dataset/p0_ethics" in r.stdout  # the same answers: what was built stands


# -- one writer ------------------------------------------------------------------------------------
def test_second_driver_is_refused_then_takes_over_from_a_killed_one(tiny_4b_run, tmp_path):
    import socket

    from conftest import kill9, resumable, start_cli, wait_for

    run = resumable(tiny_4b_run, tmp_path / "run")  # the first driver goes straight to P1
    (run / "config.yaml").unlink()  # written again once this run's driver holds the lease
    shutil.rmtree(run / "lease")
    proc = start_cli(*ARGS, f"run_dir={run}", log=tmp_path / "a.log")
    wait_for(lambda: any(run.glob("lease/*.json")) and (run / "config.yaml").exists(), 300, proc,
             "the lease")
    r = run_cli(*ARGS, f"run_dir={run}")
    assert r.returncode == 2, r.stdout[-3000:]
    assert f"is in use by {socket.gethostname()} pid {proc.pid}" in r.stdout
    assert proc.poll() is None  # the holder runs on, untouched
    kill9(proc)
    r = _rerun(run)
    assert "taking over the lease" in r.stdout and "that process is gone" in r.stdout
    held = [json.loads(f.read_text()) for f in sorted(run.glob("lease/*.json"))]
    # the second driver's lease, released at the end
    assert held[-1]["released"] and held[-1]["pid"] != proc.pid


def _lease(run: Path, beat: int = 0) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "lease").mkdir(exist_ok=True)
    (run / "lease/00000001.json").write_text(
        json.dumps({"id": "x", "host": "node-that-died", "node": "b00t/pid:[1]", "pid": 1,
                    "start": 0, "beat": beat, "heartbeat": 0})
    )


def test_dead_remote_holder_is_taken_over_after_its_heartbeat_stops(tiny_4b_run, tmp_path):
    run = copy_run(tiny_4b_run, tmp_path / "run")
    (run / "4b/eval/step.json").unlink()  # something to do
    _lease(run)
    r = _rerun(run, "lease_ttl_s=3")
    assert ("taking over the lease of node-that-died pid 1" in r.stdout
            and "no heartbeat for 3 s" in r.stdout)


def test_live_remote_holder_is_not_taken_over(tiny_4b_run, tmp_path):
    import threading

    run = copy_run(tiny_4b_run, tmp_path / "run")
    (run / "4b/eval/step.json").unlink()
    _lease(run)
    done = threading.Event()

    def beat() -> None:
        # a holder on another host, alive: its heartbeat moves (its clock is not ours)
        n = 0
        while not done.wait(0.5):
            n += 1
            _lease(run, n)

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    try:
        r = run_cli(*ARGS, f"run_dir={run}", "lease_ttl_s=5")
    finally:
        done.set()
        th.join()
    assert r.returncode == 2 and "is in use by node-that-died pid 1" in r.stdout, r.stdout[-3000:]
    assert not (run / "4b/eval/step.json").exists()


# -- pre-emption -----------------------------------------------------------------------------------
def _shards(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes()
            for p in sorted(run.glob("generations/**/shard-?????.jsonl"))}


def test_sigterm_in_generation_keeps_the_streamed_answers(stream_reference, tmp_path):
    import signal

    from conftest import STREAM_ARGS, open_partials, start_cli, wait_for

    # answers stream one by one, saved every 0.2 s (not part of any step's key); training cut to a
    # step a phase
    gen = [*STREAM_ARGS, "generation.partial_every_s=0.2",
           *(f"curriculum.{i}.iters=1" for i in range(3))]
    run = tmp_path / "run"
    partial: list[Path] = []
    for attempt in range(3):
        # the signal may land as the shards under way commit, none with answers: again
        proc = start_cli(*gen, f"run_dir={run}", log=tmp_path / f"a{attempt}.log")
        # a shard committed, another under way with some answers streamed in
        wait_for(lambda: any(run.glob("generations/1b/ethics/*/shards/shard-?????.jsonl"))
                 and open_partials(run / "generations"), 300, proc,
                 "a committed shard and a partial one")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
        log = (tmp_path / f"a{attempt}.log").read_text()
        assert "pre-empted (SIGTERM): what the run had is saved" in log
        partial = open_partials(run / "generations")
        if partial:
            break
    assert partial, "three signals in a row landed as the shards under way committed"
    kept = sum(len(p.read_text().splitlines()) for p in partial)
    # a run stopped between committing a shard and removing its partial answers leaves them beside
    # it: stale
    committed = sorted(run.glob("generations/1b/ethics/*/shards/shard-?????.jsonl"))[0]
    committed.with_name(committed.name.replace(".jsonl", ".partial.jsonl")).write_bytes(
        committed.read_bytes()
    )
    r = run_cli(*gen, f"run_dir={run}")
    assert r.returncode == 0, r.stdout[-3000:]
    assert "answers kept from an earlier run" in r.stdout and kept > 0
    assert not list(run.glob("generations/**/*.partial.jsonl"))
    assert _shards(run).keys() == _shards(stream_reference).keys()
    # nothing redone differently
    assert all(_shards(run)[k] == v for k, v in _shards(stream_reference).items())


# -- a process dying inside a write ----------------------------------------------------------------
def _data_files(run: Path) -> dict[str, bytes]:
    pats = ("generations/**/shard-?????.jsonl", "*/dataset/*/*.jsonl",
            "*/train/*/model.safetensors")
    return {str(p.relative_to(run)): p.read_bytes() for pat in pats for p in sorted(run.glob(pat))}


# The driver's manifest updates of a 4b run, in order (each a step boundary): 1-2 generate ethics,
# composure running; 3-4 done; 5-10 the three datasets running, done; 11-13 the three phases
# running; 14-16 done; 17-18 eval running, done. Its commits: 1-2 the generations, 3-5 the datasets,
# 6 eval (phases: the workers'). One point of each kind, struck in turn in one run directory (each
# strike costs a run; benchmarks/faults.py strikes seeded points): generation's end, a dataset's
# commit, a phase starting. A re-run skips what is committed and writes no manifest update for it,
# so its counts start at the first step it runs.
def test_driver_and_worker_deaths_and_a_full_disk_in_one_run_directory_lose_nothing(
    tiny_4b_run, tmp_path
):
    """Struck in turn in one run directory, each time the same command again: the driver process
    dies (os._exit, as under kill -9) inside an atomic write, inside a commit, inside a manifest
    update; a write fails as on a full disk (the run stops naming the file, nothing half-written); a
    training worker dies inside a checkpoint save (its staging written, not yet renamed: Ray Train
    restarts the group, which resumes from the checkpoint before). The run then ends with the same
    bytes as one never struck."""
    run = tmp_path / "run"
    steps = lambda: manifest(run)["steps"]  # noqa: E731
    r = run_cli(*ARGS, f"run_dir={run}", env={"CASCADE_FAILPOINT": "write:5"})
    assert r.returncode == 137, r.stdout[-3000:]
    assert not list(run.glob("generations/1b/*/*/step.json")), "write:5 is generation's"
    r = run_cli(*ARGS, f"run_dir={run}", env={"CASCADE_FAILPOINT": "commit:4"})
    assert r.returncode == 137, r.stdout[-3000:]
    assert (run / "4b/dataset/p0_ethics/step.json").exists(), "commit:4 is the second dataset's"
    assert not (run / "4b/dataset/p1_composure/step.json").exists(), (
        "commit:4 is the second dataset's"
    )
    r = run_cli(*ARGS, f"run_dir={run}", env={"CASCADE_FAILPOINT": "manifest:6"})
    assert r.returncode == 137, r.stdout[-3000:]
    assert (steps()["4b/train/p1_composure"]["state"] == "running"
            and "4b/train/p2_ethics" not in steps()), "manifest:6 is the third phase's start"
    r = run_cli(*ARGS, f"run_dir={run}", env={"CASCADE_FAILPOINT": "write:2!enospc"})
    assert r.returncode not in (0, 137), r.stdout[-3000:]
    assert f"[Errno 28] No space left on device: '{run}/" in r.stdout, r.stdout[-3000:]
    assert not (run / "4b/train/02-p2_ethics/step.json").exists(), "write:2 comes before P2 trains"
    # P2 (6 steps) checkpointed every 2: the worker dies inside the second save and resumes from the
    # first
    r = _rerun(run, "train.save_every=2",
               env={"CASCADE_FAILPOINT": f"checkpoint:2@{tmp_path}/once"})
    assert (tmp_path / "once").exists()  # it did strike
    assert _data_files(run) == _data_files(tiny_4b_run)


def test_failed_fusion_check_is_not_retried_and_commits_nothing(tiny_4b_run, tmp_path):
    """A damaged merge (the fuse failpoint perturbs the saved weights) fails the check once, with a
    clear error: Ray Train's failure policy (max_failures=2 here) does not run the phase again, P2
    stays uncommitted; the same command without the fault then commits it."""
    run = copy_run(tiny_4b_run, tmp_path / "run")
    p2 = run / "4b/train/02-p2_ethics"
    (p2 / "step.json").unlink()
    # the damage once only (@): a retried phase would fuse cleanly and commit
    r = run_cli(*ARGS, f"run_dir={run}", "train.max_failures=2",
                env={"CASCADE_FAILPOINT": f"fuse:1@{tmp_path / 'damaged'}!corrupt"})
    assert r.returncode == 1, r.stdout[-4000:]
    assert "fusion check failed" in r.stdout and "of the logits' scale" in r.stdout, r.stdout[
        -4000:
    ]
    # the driver's line (the worker's, forwarded by Ray's log monitor, may not arrive before exit)
    assert 1 <= r.stdout.count("differs from base + adapter") <= 2, r.stdout[-6000:]
    assert (tmp_path / "damaged").exists() and not (p2 / "step.json").exists()
    assert manifest(run)["steps"]["4b/train/p2_ethics"]["state"] == "failed"
    from cascade.status import collect  # what `cascade status` shows: the phase failed, and why

    row = {x["step"]: x
           for x in collect(compose([*ARGS, f"run_dir={run}", "train.max_failures=2"]))["steps"]}
    assert (row["4b/train/p2_ethics"]["state"] == "failed"
            and "FusionError" in row["4b/train/p2_ethics"]["error"])
    r = _rerun(run)
    assert "[run ] 4b/train/p2_ethics" in r.stdout

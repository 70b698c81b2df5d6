"""A run directory on an object store: a real S3 API server (moto's server mode) on 127.0.0.1, s3fs, the same
guarantees as a local run directory - markers last, damaged objects re-run, models pulled and checked, one
writer, and the whole tiny cascade killed -9 mid-phase and resumed to the bytes of a local run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, kill9, manifest, run_cli, s3_bucket, start_cli, wait_for


def _commit(rd, key: str, weights: bytes):
    from cascade.rundir import Step

    step = Step("4b/train/p0_ethics", key, rd.model("4b", 0, "p0_ethics"))
    staging = rd.staging(step.name)
    rd.write_json(f"{staging}/config.json", {"key": key})
    rd.write_bytes(f"{staging}/model.safetensors", weights)
    rd.begin(step)
    return step, rd.commit_dir(staging, step, {"key": key})


def test_commit_uploads_files_then_marker_and_pulls_verified(s3, tmp_path, monkeypatch):
    from cascade.rundir import RunDir, local_model
    from cascade.storage import download

    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "node"))
    rd = RunDir(s3_bucket("commit"))
    step, rec = _commit(rd, "k1", b"w" * 1000)
    assert rd.path("x").startswith("s3://") and rd.committed(step) == rec
    assert rd.manifest()["steps"][step.name]["state"] == "done"
    assert not any((tmp_path / "node").glob("runs/*/tmp/*")), "staging is dropped once uploaded"
    local = Path(local_model(step.path))  # pulled into this node's cache, checked against step.json
    assert local.is_relative_to(tmp_path / "node") and (local / "model.safetensors").read_bytes() == b"w" * 1000
    assert local_model("/some/local/dir") == "/some/local/dir"

    # a damaged object: sizes catch a truncation, --verify a bit flip; a pull refuses either
    rd.fs.pipe_file(f"{step.path}/model.safetensors", b"v" + b"w" * 999)
    assert rd.committed(step) == rec  # same size: only a hash check sees it (checked once per invocation)
    assert RunDir(rd.url, verify=True).committed(step) is None
    rd.fs.pipe_file(f"{step.path}/model.safetensors", b"w" * 10)
    assert RunDir(rd.url).committed(step) is None
    with pytest.raises(RuntimeError, match="model.safetensors does not match its record"):
        download(rd.fs, step.path, rec["files"], tmp_path / "again")

    # torn JSON on the store is absent, not fatal
    rd.fs.pipe_file(f"{step.path}/step.json", b'{"key": "k')
    assert RunDir(rd.url).committed(step) is None


_KILLED_COMMIT = """
import sys
from cascade.rundir import RunDir, Step
rd = RunDir(sys.argv[1])
step = Step("4b/train/p0_ethics", sys.argv[2], rd.model("4b", 0, "p0_ethics"))
staging = rd.staging(step.name)
rd.write_bytes(f"{staging}/model.safetensors", b"new" * 100)
rd.commit_dir(staging, step, {})
"""


def test_killed_commit_leaves_no_step_and_no_stale_one(s3, tmp_path, monkeypatch):
    """kill -9 (a failpoint's os._exit) after a step's files are uploaded, before its marker: the new key is not
    committed, and neither is the old one whose files it was replacing (its marker went first)."""
    from cascade.rundir import RunDir

    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "node"))
    rd = RunDir(s3_bucket("killed"))
    old, _ = _commit(rd, "old", b"o" * 100)
    env = {**os.environ, "CASCADE_FAILPOINT": "commit:1"}
    r = subprocess.run([sys.executable, "-c", _KILLED_COMMIT, rd.url, "new"], env=env, capture_output=True)
    assert r.returncode == 137, r.stderr[-2000:]
    assert rd.fs.exists(f"{old.path}/model.safetensors") and not rd.fs.exists(f"{old.path}/step.json")
    rd2 = RunDir(rd.url)
    assert rd2.committed(old) is None
    new, rec = _commit(rd2, "new", b"new" * 100)
    assert rd2.committed(new) == rec and sorted(rec["files"]) == ["config.json", "model.safetensors"]


def test_one_writer_on_an_object_store(s3, tmp_path, monkeypatch):
    from cascade.lease import Lease, RunDirBusy
    from cascade.rundir import RunDir

    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "node"))
    rd = RunDir(s3_bucket("lease"))
    with Lease(rd, 30):
        holder = json.loads(rd.read_bytes(rd.lease()))
        with pytest.raises(RunDirBusy, match=str(holder["pid"])):
            Lease(RunDir(rd.url), 30).acquire()
    assert not rd.exists(rd.lease())


def test_unknown_protocol_is_refused_before_ray(tmp_path):
    r = run_cli("+stage=4b", "models=tiny", "run_dir=nosuchfs://bucket/run")
    assert r.returncode == 2 and "no filesystem for nosuchfs://" in r.stdout, r.stdout[-2000:]
    r = run_cli("+stage=4b", "models=tiny", "run_dir=s3://")
    assert r.returncode == 2 and "names no bucket" in r.stdout, r.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.faults
def test_tiny_cascade_on_s3_killed_mid_phase_resumes_to_local_bytes(s3, tmp_path):
    """The whole tiny cascade with run_dir=s3://...: kill -9 of the driver while P1 trains (a P1 checkpoint is on
    the store), the same command again resumes from that checkpoint; every committed file equals a local run's."""
    import fsspec

    url = s3_bucket("cascade")
    args = [*FAST, "+stage=4b", "models=tiny", "curriculum.1.iters=60"]
    env = s3
    fs = fsspec.filesystem("s3", use_listings_cache=False)
    root = url.removeprefix("s3://")
    fs.mkdir(root.split("/")[0])  # the bucket, as a user's would exist

    proc = start_cli(*args, f"run_dir={url}", log=tmp_path / "a.log", env=env)
    wait_for(lambda: bool(fs.glob(f"{root}/4b/train/_ckpt/01-*/step-*/meta.json")), 900, proc,
             "a P1 checkpoint on the store")
    kill9(proc)
    assert not fs.exists(f"{root}/4b/train/01-p1_composure/step.json"), "the kill must land mid-phase"
    r = run_cli("status", *args, f"run_dir={url}", "--json", env=env)  # read from the store, no driver alive
    assert r.returncode == 0, r.stdout[-3000:]
    st = json.loads(r.stdout[r.stdout.index("{\n"):])
    rows = {x["step"]: x for x in st["steps"]}
    assert st["driver"] is None and rows["4b/train/p0_ethics"]["state"] == "done"
    p1 = rows["4b/train/p1_composure"]
    assert p1["state"] == "stopped" and p1["progress"]["unit"] == "steps" and 0 < p1["progress"]["done"] < 60, p1
    assert st["rerun_would_run"] == ["4b/train/p1_composure", "4b/train/p2_ethics", "4b/eval"]
    r = run_cli(*args, f"run_dir={url}", env=env)
    assert r.returncode == 0, r.stdout[-4000:]
    steps = json.loads(fs.cat_file(f"{root}/manifest.json"))["steps"]
    assert all(s["state"] == "done" for s in steps.values()), steps
    p1 = json.loads(fs.cat_file(f"{root}/4b/train/01-p1_composure/step.json"))
    assert p1["summary"]["resumed_from_step"] > 0
    assert fs.glob(f"{root}/4b/train/_work/tensorboard/p1_composure/*") and fs.exists(f"{root}/logs/driver.log")
    assert not fs.exists(f"{root}/lease.json") and not fs.exists(f"{root}/tmp")

    local = tmp_path / "local"
    r = run_cli(*args, f"run_dir={local}")
    assert r.returncode == 0, r.stdout[-3000:]
    for phase in ("00-p0_ethics", "01-p1_composure", "02-p2_ethics"):
        theirs = json.loads(fs.cat_file(f"{root}/4b/train/{phase}/step.json"))["files"]
        assert theirs == json.loads((local / f"4b/train/{phase}/step.json").read_text())["files"], phase
    for rel in ("4b/dataset/p0_ethics/train.jsonl", "4b/dataset/p1_composure/train.jsonl"):
        assert fs.cat_file(f"{root}/{rel}") == (local / rel).read_bytes(), rel
    assert manifest(local).keys() == json.loads(fs.cat_file(f"{root}/manifest.json")).keys()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_rerun_to_new_bytes_takes_its_downstream_along(s3, tmp_path, monkeypatch, caplog, where):
    """A damaged step that runs again to different bytes re-runs the steps built from it; to the same bytes (a
    deterministic re-run), they are kept."""
    from cascade.rundir import RunDir, Step

    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "node"))
    rd = RunDir(str(tmp_path / "run") if where == "local" else s3_bucket("downstream"))

    def commit(step: Step, data: bytes) -> dict:
        staging = rd.staging(step.name)
        rd.write_bytes(f"{staging}/train.jsonl", data)
        rd.begin(step)
        return rd.commit_dir(staging, step, {})

    up = Step("4b/dataset/p0", "d", rd.dataset("4b", "p0"))
    down = Step("4b/train/p0", "t", rd.model("4b", 0, "p0"), (up.path,))
    commit(up, b"one\n")
    rec = commit(down, b"weights")
    assert rec["inputs"] == {up.path: rd.contents(up.path)} and rd.committed(down) == rec
    commit(up, b"one\n")  # the same bytes again: the model built from them stands
    assert RunDir(rd.url).committed(down) == rec
    commit(up, b"two\n")  # new bytes: the model is stale
    assert RunDir(rd.url).committed(down) is None
    assert "was built from" in caplog.text and up.path in caplog.text

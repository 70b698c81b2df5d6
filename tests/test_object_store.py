"""A run directory on an object store: a real S3 API server (moto's server mode) on 127.0.0.1, s3fs,
the same guarantees as a local run directory - markers last, damaged objects re-run, models pulled
and checked, one writer, and the whole tiny cascade killed -9 mid-phase and resumed to the bytes of
a local run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import KILL_ARGS, compose, kill9, manifest, run_cli, s3_bucket, start_cli, wait_for


def _commit(rd, key: str, weights: bytes):
    from cascade.rundir import Step

    step = Step("4b/train/p0_ethics", key, rd.model("4b", 0, "p0_ethics"))
    staging = rd.staging(step.name)
    rd.write_json(f"{staging}/config.json", {"key": key})
    rd.write_bytes(f"{staging}/model.safetensors", weights)
    rd.begin(step)
    return step, rd.commit_dir(staging, step, {"key": key})


def test_commit_uploads_files_then_marker_and_pulls_verified(s3, tmp_path, monkeypatch):
    from cascade.rundir import RunDir
    from cascade.storage import local_model
    from cascade.storage import download

    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "node"))
    rd = RunDir(s3_bucket("commit"))
    step, rec = _commit(rd, "k1", b"w" * 1000)
    assert rd.path("x").startswith("s3://") and rd.committed(step) == rec
    assert rd.manifest()["steps"][step.name]["state"] == "done"
    assert not any((tmp_path / "node").glob("runs/*/tmp/*")), "staging is dropped once uploaded"
    local = Path(local_model(step.path))  # pulled into this node's cache, checked against step.json
    assert (local.is_relative_to(tmp_path / "node")
            and (local / "model.safetensors").read_bytes() == b"w" * 1000)
    assert local_model("/some/local/dir") == "/some/local/dir"

    # a damaged object: sizes catch a truncation, --verify a bit flip; a pull refuses either
    rd.fs.pipe_file(f"{step.path}/model.safetensors", b"v" + b"w" * 999)
    # same size: only a hash check sees it (checked once per invocation)
    assert rd.committed(step) == rec
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
    """kill -9 (a failpoint's os._exit) after a step's files are uploaded, before its marker: the
    new key is not committed, and neither is the old one whose files it was replacing (its marker
    went first)."""
    from cascade.rundir import RunDir

    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "node"))
    rd = RunDir(s3_bucket("killed"))
    old, _ = _commit(rd, "old", b"o" * 100)
    env = {**os.environ, "CASCADE_FAILPOINT": "commit:1"}
    r = subprocess.run([sys.executable, "-c", _KILLED_COMMIT, rd.url, "new"], env=env,
                       capture_output=True)
    assert r.returncode == 137, r.stderr[-2000:]
    assert rd.fs.exists(f"{old.path}/model.safetensors") and not rd.fs.exists(
        f"{old.path}/step.json"
    )
    rd2 = RunDir(rd.url)
    assert rd2.committed(old) is None
    new, rec = _commit(rd2, "new", b"new" * 100)
    assert rd2.committed(new) == rec and sorted(rec["files"]) == [
        "config.json",
        "model.safetensors",
    ]


@pytest.mark.faults
def test_one_writer_on_an_object_store(s3, tmp_path, monkeypatch):
    from cascade.lease import Lease, RunDirBusy, current
    from cascade.rundir import RunDir

    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "node"))
    rd = RunDir(s3_bucket("lease"))
    with Lease(rd, 30):
        gen, held = current(rd)
        with pytest.raises(RunDirBusy, match=str(held["pid"])):
            Lease(RunDir(rd.url), 30).acquire()
    assert current(rd)[1]["released"]
    with Lease(RunDir(rd.url), 30) as again:
        # a released lease is taken at once, as the next generation
        assert again.gen == gen + 1


@pytest.mark.faults
def test_a_step_committed_again_with_new_bytes_is_pulled_again(s3, tmp_path, monkeypatch):
    """The node cache is keyed by the files' sha256s: the same step key re-committed with other
    bytes of the same size (a re-run after damage) is not served from the old copy; a copy that does
    not match its record, or whose files changed after the pull (a byte flipped in place), is pulled
    again."""
    from cascade.rundir import RunDir
    from cascade.storage import local_model

    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "node"))
    rd = RunDir(s3_bucket("stale"))
    step, _ = _commit(rd, "k1", b"a" * 1000)
    first = Path(local_model(step.path))
    assert (first / "model.safetensors").read_bytes() == b"a" * 1000
    _commit(RunDir(rd.url), "k1", b"b" * 1000)
    again = Path(local_model(step.path))
    assert again != first and (again / "model.safetensors").read_bytes() == b"b" * 1000
    (again / ".pulled").write_text("{}")  # a copy whose record is not the step's: pulled again
    assert (Path(local_model(step.path)) / "model.safetensors").read_bytes() == b"b" * 1000
    # the copy altered in place, its marker kept
    (again / "model.safetensors").write_bytes(b"c" + b"b" * 999)
    assert (Path(local_model(step.path)) / "model.safetensors").read_bytes() == b"b" * 1000


@pytest.mark.faults
def test_a_recorded_name_outside_its_directory_is_refused_and_stray_pulls_are_cleaned(
    s3, tmp_path, monkeypatch
):
    import hashlib

    from cascade.rundir import RunDir
    from cascade.storage import local_model
    from cascade.storage import stray_pulls

    node = tmp_path / "node"
    monkeypatch.setenv("CASCADE_CACHE", str(node))
    rd = RunDir(s3_bucket("escape"))
    step, rec = _commit(rd, "k1", b"a" * 10)
    for bad in ("../../../escaped", "/etc/escaped", "a/../../escaped"):
        rec2 = {**rec, "files": {bad: [4, hashlib.sha256(b"evil").hexdigest()]}}
        rd.fs.pipe_file(f"{step.path}/step.json", json.dumps(rec2).encode())
        with pytest.raises(RuntimeError, match="would leave its directory"):
            local_model(step.path)
    assert not list(tmp_path.rglob("escaped"))
    dead = node / "runs/models/x-k1-y.tmp-999999999-abcd1234"  # a pull whose process died
    live = node / f"runs/models/x-k2-y.tmp-{os.getpid()}-abcd1234"  # one under way
    for d in (dead, live):
        d.mkdir(parents=True)
    assert stray_pulls(node) == [dead]
    RunDir(str(tmp_path / "run")).clean_staging()  # at every driver start
    assert not dead.exists() and live.exists()


@pytest.mark.faults
def test_a_run_dir_outside_the_allow_list_or_with_credentials_is_refused_before_ray(tmp_path):
    for scheme in ("nosuchfs", "ftp", "hdfs", "http", "memory", "gs"):
        # no atomic create for the lease here
        r = run_cli("+stage=4b", "models=tiny", f"run_dir={scheme}://bucket/run")
        assert r.returncode == 2 and f"{scheme}:// is not supported" in r.stdout, r.stdout[-2000:]
    r = run_cli("+stage=4b", "models=tiny", "run_dir=s3://AKIAKEY:s3cr3t@bucket/run")
    assert r.returncode == 2 and "carries credentials" in r.stdout and "s3cr3t" not in r.stdout, (
        r.stdout[-2000:]
    )
    r = run_cli("+stage=4b", "models=tiny", "run_dir=s3://")
    assert r.returncode == 2 and "names no bucket" in r.stdout, r.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.faults
def test_tiny_cascade_on_s3_through_outages_killed_mid_phase_resumes_to_local_bytes(
    s3, kill_reference, tmp_path
):
    """The whole tiny cascade with run_dir=s3://..., every process reaching the store through a
    proxy that fails: it refuses and cuts connections for 4 s mid-generation and again mid-commit
    (the datasets), stalls (accepts, never answers) for 6 s while P0 trains, past the store timeout
    (CASCADE_STORE_TIMEOUT_S=2 here), and throttles (503 SlowDown) for 4 s while P1 trains; the run
    waits and retries. Then kill -9 of the driver while P1 trains (a P1 checkpoint is on the store):
    the same command resumes from that checkpoint, and every committed file equals a local run's
    that nothing struck."""
    import time

    import fsspec

    from conftest import StoreProxy

    url = s3_bucket("cascade")
    args = KILL_ARGS  # the local reference: the same run, never killed (conftest.kill_reference)
    proxy = StoreProxy(int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    env = {**s3, "AWS_ENDPOINT_URL": proxy.url, "CASCADE_STORE_TIMEOUT_S": "2"}
    # the test's own view: straight to the server
    fs = fsspec.filesystem("s3", use_listings_cache=False)
    root = url.removeprefix("s3://")
    fs.mkdir(root.split("/")[0])  # the bucket, as a user's would exist

    def outage(mode: str, when, what: str, seconds: float = 4.0) -> None:
        wait_for(when, 900, proc, what)
        proxy.set(mode)
        time.sleep(seconds)
        proxy.set("ok")

    proc = start_cli(*args, f"run_dir={url}", log=tmp_path / "a.log", env=env)
    outage("refuse",
           lambda: bool(fs.glob(f"{root}/generations/1b/ethics/*/shards/shard-00000.jsonl")),
           "a shard")
    outage("refuse", lambda: fs.exists(f"{root}/4b/dataset/p0_ethics/train.jsonl"), "a dataset")
    outage("stall", lambda: fs.exists(f"{root}/progress/4b/train/p0_ethics.json"), "P0 under way",
           6.0)
    outage("slowdown", lambda: fs.exists(f"{root}/progress/4b/train/p1_composure.json"),
           "P1 under way")
    wait_for(lambda: bool(fs.glob(f"{root}/4b/train/_ckpt/01-*/step-*/meta.json")), 900, proc,
             "a P1 checkpoint on the store")
    kill9(proc)
    assert proxy.seen["refused"] and proxy.seen["throttled"] and proxy.seen["stalled"], proxy.seen
    # the outages were met, waited out, logged
    assert "retrying in" in (tmp_path / "a.log").read_text()
    assert not fs.exists(f"{root}/4b/train/01-p1_composure/step.json"), (
        "the kill must land mid-phase"
    )
    # read from the store, no driver alive
    r = run_cli("status", *args, f"run_dir={url}", "--json", env=s3)
    assert r.returncode == 0, r.stdout[-3000:]
    st = json.loads(r.stdout[r.stdout.index("{\n"):])
    rows = {x["step"]: x for x in st["steps"]}
    assert st["driver"] is None and rows["4b/train/p0_ethics"]["state"] == "done"
    p1 = rows["4b/train/p1_composure"]
    assert (p1["state"] == "stopped" and p1["progress"]["unit"] == "steps"
            and 0 < p1["progress"]["done"] < 40), p1
    assert st["rerun_would_run"] == ["4b/train/p1_composure", "4b/train/p2_ethics", "4b/eval",
                                    "4b/gate"]
    r = run_cli(*args, f"run_dir={url}", env=env)
    assert r.returncode == 0, r.stdout[-4000:]
    steps = json.loads(fs.cat_file(f"{root}/manifest.json"))["steps"]
    assert all(s["state"] == "done" for s in steps.values()), steps
    p1 = json.loads(fs.cat_file(f"{root}/4b/train/01-p1_composure/step.json"))
    assert p1["summary"]["resumed_from_step"] > 0
    assert fs.glob(f"{root}/4b/train/_work/tensorboard/p1_composure/*") and fs.exists(
        f"{root}/logs/driver.log"
    )
    leases = sorted(fs.glob(f"{root}/lease/*.json"))
    assert json.loads(fs.cat_file(leases[-1]))["released"] and not fs.exists(f"{root}/tmp")

    local = kill_reference
    for phase in ("00-p0_ethics", "01-p1_composure", "02-p2_ethics"):
        theirs = json.loads(fs.cat_file(f"{root}/4b/train/{phase}/step.json"))["files"]
        assert theirs == json.loads((local / f"4b/train/{phase}/step.json").read_text())["files"], (
            phase
        )
    for rel in ("4b/dataset/p0_ethics/train.jsonl", "4b/dataset/p1_composure/train.jsonl"):
        assert fs.cat_file(f"{root}/{rel}") == (local / rel).read_bytes(), rel
    assert manifest(local).keys() == json.loads(fs.cat_file(f"{root}/manifest.json")).keys()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_rerun_to_new_bytes_takes_its_downstream_along(s3, tmp_path, monkeypatch, caplog, where):
    """A damaged step that runs again to different bytes re-runs the steps built from it; to the
    same bytes (a deterministic re-run), they are kept."""
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


@pytest.mark.faults
def test_a_local_models_identity_is_its_bytes_hashed_once(tmp_path, monkeypatch):
    """Weights retrained in place with the same shapes (same names, same sizes) are another model:
    another key, so nothing built on the old weights is reused. Their sha256 is cached by path,
    size, mtime and inode: an unchanged 27B is not hashed again at every run."""
    from cascade import storage
    from cascade.models import model_identity

    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "node"))
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gemma3_text"}')
    (model / "model.safetensors").write_bytes(b"a" * 4096)
    cfg = compose(["+stage=4b"])
    cfg.stages["4b"].model = str(model)
    hashed = []
    real = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda fs, p: hashed.append(p) or real(fs, p))
    first = model_identity(cfg, "4b")[1]
    assert len(hashed) == 2 and model_identity(cfg, "4b")[1] == first and len(hashed) == 2  # cached
    # retrained in place: same name, same size
    (model / "model.safetensors").write_bytes(b"b" * 4096)
    assert model_identity(cfg, "4b")[1] != first


@pytest.mark.faults
def test_node_copies_are_evicted_least_recently_used_beyond_the_limit(s3, tmp_path, monkeypatch):
    """CASCADE_CACHE_MAX_GB (cache_max_gb on the driver): pulling a third model into a node cache
    that has room for two removes the least recently used copy; using a copy marks it recent."""
    from cascade.rundir import RunDir, Step
    from cascade.storage import local_model

    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "node"))
    # room for two 1000-byte models, not three
    monkeypatch.setenv("CASCADE_CACHE_MAX_GB", str(2500 / 1e9))
    rd = RunDir(s3_bucket("evict"))
    paths = []
    for i in range(3):
        step = Step(f"4b/train/p{i}", f"k{i}", rd.model("4b", i, f"p{i}"))
        staging = rd.staging(step.name)
        rd.write_bytes(f"{staging}/model.safetensors", bytes([65 + i]) * 1000)
        rd.begin(step)
        rd.commit_dir(staging, step, {})
        paths.append(step.path)
    first, second = Path(local_model(paths[0])), Path(local_model(paths[1]))
    os.utime(first / ".pulled", (0, 0))
    os.utime(second / ".pulled", (1, 1))
    assert Path(local_model(paths[0])) == first  # used again: now the most recent but for the next
    third = Path(local_model(paths[2]))  # over the limit: the least recently used goes
    assert first.exists() and not second.exists() and third.exists()

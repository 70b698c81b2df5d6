"""The run in MLflow and W&B (cascade/tracking.py): MLflow's read back through its client and
through `mlflow ui`'s REST API, W&B's offline runs through their record files (wandb's own protobuf
schema); logged once however often the command runs, a half-logged step replaced."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import FAST, copy_run, free_port, run_cli

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(__import__("importlib").util.find_spec("mlflow") is None,
                                 reason="mlflow is not installed (scripts/setup.sh)")]
STEPS = ["4b/dataset/p0_ethics", "4b/dataset/p1_composure", "4b/dataset/p2_ethics",
         "4b/eval", "4b/gate", "4b/train/p0_ethics", "4b/train/p1_composure",
         "4b/train/p2_ethics", "generate/1b/composure", "generate/1b/ethics"]


def _runs(client, exp_id: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in client.search_runs([exp_id], max_results=1000):
        name = r.data.tags.get("cascade.step") or r.data.tags["cascade.stage"]
        out.setdefault(name, []).append(r)
    return out


def test_the_run_in_mlflow_once(tiny_4b_run: Path, tmp_path: Path):
    from mlflow import MlflowClient

    run = copy_run(tiny_4b_run, tmp_path / "run")
    args = [*FAST, "+stage=4b", "models=tiny", f"run_dir={run}", "tracking.mlflow=true"]
    r = run_cli(*args)  # nothing to run: the committed steps logged, tracking just turned on
    assert r.returncode == 0 and "MLflow: 10 step runs logged" in r.stdout, r.stdout[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{run}/mlflow/mlflow.db")
    exp = client.get_experiment_by_name("cascade")
    runs = _runs(client, exp.experiment_id)
    assert sorted(runs) == sorted(STEPS + ["4b"]) and all(len(v) == 1 for v in runs.values())
    stage = runs["4b"][0]
    assert stage.data.params["curriculum"].startswith("p0_ethics:sft:16:")
    assert all(runs[s][0].data.tags["mlflow.parentRunId"] == stage.info.run_id for s in STEPS)
    summary = json.loads((run / "4b/train/00-p0_ethics/step.json").read_text())["summary"]
    history = client.get_metric_history(runs["4b/train/p0_ethics"][0].info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == list(enumerate(summary["losses"]))
    gate = runs["4b/gate"][0]
    assert gate.data.tags["cascade.verdict"] == "PROMOTE" and gate.data.params["gate.min_gain"]
    assert [a.path for a in client.list_artifacts(gate.info.run_id)] == ["verdict.json"]
    metrics = json.loads((run / "4b/eval/metrics.json").read_text())
    assert runs["4b/eval"][0].data.metrics["agreement_after"] == pytest.approx(
        metrics["agreement"]["after"])

    # the driver died while logging the evaluation's run: the next invocation replaces it; nothing
    # else is logged again
    client.delete_tag(runs["4b/eval"][0].info.run_id, "cascade.logged")
    r = run_cli(*args)
    assert r.returncode == 0 and "MLflow: 1 step runs logged" in r.stdout, r.stdout[-3000:]
    again = _runs(client, exp.experiment_id)
    assert sorted(again) == sorted(runs) and all(len(v) == 1 for v in again.values())
    assert again["4b/eval"][0].info.run_id != runs["4b/eval"][0].info.run_id
    assert all(again[s][0].info.run_id == runs[s][0].info.run_id for s in runs if s != "4b/eval")
    assert len(client.get_metric_history(again["4b/train/p0_ethics"][0].info.run_id, "loss")) == 16

    # `mlflow ui` serves the same from the run directory's store, over its REST API
    port = free_port()
    store = f"sqlite:///{run}/mlflow/mlflow.db"
    ui = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
                           store, "--host", "127.0.0.1", "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        found = _post(f"{base}/runs/search", {"experiment_ids": [exp.experiment_id],
                                              "filter": "tags.`cascade.step` = '4b/gate'"}, ui)
        assert [t["value"] for r in found["runs"] for t in r["data"]["tags"]
                if t["key"] == "cascade.verdict"] == ["PROMOTE"]
        rid = again["4b/train/p0_ethics"][0].info.run_id
        with urllib.request.urlopen(f"{base}/metrics/get-history?run_id={rid}&metric_key=loss",
                                    timeout=30) as f:
            assert len(json.load(f)["metrics"]) == 16
    finally:
        ui.terminate()
        ui.wait(timeout=60)


def _post(url: str, body: dict, proc: subprocess.Popen, wait_s: float = 120) -> dict:
    """POST JSON once the server answers (it starts in a few seconds)."""
    deadline, data = time.time() + wait_s, json.dumps(body).encode()
    while True:
        try:
            req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as f:
                return json.load(f)
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise
            time.sleep(1)


SECRET = "sk-cascade-test-0f9e8d7c"


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is None,
                    reason="wandb is not installed (scripts/setup.sh)")
def test_the_run_in_wandb_offline_once(tiny_4b_run: Path, tmp_path: Path):
    run = copy_run(tiny_4b_run, tmp_path / "run")
    args = [*FAST, "+stage=4b", "models=tiny", f"run_dir={run}", "tracking.wandb=true"]
    env = {"WANDB_API_KEY": SECRET, "HF_TOKEN": SECRET}  # offline: used by nothing, in no file
    r = run_cli(*args, env=env)
    assert r.returncode == 0 and "W&B (offline): 10 step runs logged" in r.stdout, r.stdout[-3000:]
    runs = _wandb_runs(run)
    assert sorted(runs) == sorted(STEPS)
    gate = runs["4b/gate"]
    assert gate["run"].run_group == "4b" and gate["run"].job_type == "gate"
    assert gate["summary"]["cascade.verdict"] == "PROMOTE" and "gate.min_gain" in gate["config"]
    assert "verdict.json" in gate["files"]
    summary = json.loads((run / "4b/train/00-p0_ethics/step.json").read_text())["summary"]
    history = [(h["_step"], h["loss"]) for h in runs["4b/train/p0_ethics"]["history"]]
    assert history == list(enumerate(summary["losses"]))
    metrics = json.loads((run / "4b/eval/metrics.json").read_text())
    assert runs["4b/eval"]["summary"]["agreement_after"] == pytest.approx(
        metrics["agreement"]["after"])

    # the driver died while logging the evaluation's run (its marker not yet written): the next
    # invocation logs it again, in place of the half one; nothing else is logged again
    eval_id = runs["4b/eval"]["run"].run_id
    (run / "wandb/logged" / eval_id).unlink()
    r = run_cli(*args, env=env)
    assert r.returncode == 0 and "W&B (offline): 1 step runs logged" in r.stdout, r.stdout[-3000:]
    again = _wandb_runs(run)
    assert sorted(again) == sorted(runs)
    assert all(again[s]["path"] == runs[s]["path"] for s in runs if s != "4b/eval")
    assert again["4b/eval"]["path"] != runs["4b/eval"]["path"]
    assert not any(SECRET.encode() in f.read_bytes() for f in run.rglob("*") if f.is_file())


def _wandb_runs(run: Path) -> dict[str, dict]:
    """Each offline run's records by step name: run, config, summary, history, files (its .wandb
    file: LevelDB's log format of wandb's protobuf records)."""
    out = {}
    for d in sorted((run / "wandb/wandb").glob("offline-run-*")):
        got: dict = {"path": d.name, "config": {}, "summary": {}, "history": [], "files": []}
        for rec in _records(next(d.glob("run-*.wandb"))):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                got["run"] = rec.run
                got["config"].update(_items(rec.run.config.update))
            elif kind == "summary":
                got["summary"].update(_items(rec.summary.update))
            elif kind == "history":
                got["history"].append({i.nested_key[0]: json.loads(i.value_json)
                                       for i in rec.history.item})
            elif kind == "files":
                got["files"] += [f.path for f in rec.files.files]
        assert got["run"].display_name not in out, f"{got['run'].display_name} logged twice"
        out[got["run"].display_name] = got
    return out


def _items(updates) -> dict:
    return {u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in updates}


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data, pos, part = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B", data[:8]  # and a 3-byte magic/version
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768  # 32 KiB blocks; a header never straddles two
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or kind == 0:
            pos += left
            continue
        part, pos = part + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            part = b""
            yield rec

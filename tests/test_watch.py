"""Watching a run: `cascade status` while it runs and after, the run report, Ray's Prometheus
metrics, TensorBoard.

The shared tiny run (conftest.tiny_4b_run) is watched while it goes: its Prometheus endpoint scraped
and `cascade status` taken about every second; these tests check what was seen against what the run
committed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import FAST, compose, copy_run, run_cli

ARGS = [*FAST, "+stage=4b", "models=tiny"]


def _watched(run: Path) -> dict:
    return json.loads((run.parent / "watch.json").read_text())


def _step(run: Path, rel: str) -> dict:
    return json.loads((run / rel / "step.json").read_text())


@pytest.mark.slow
def test_status_while_the_run_goes_and_after(tiny_4b_run: Path):
    """While the run went, status showed generation by shards and each phase by optimizer step with
    an ETA, the driver alive; after it, `python -m cascade status` shows every step done with its
    key, the agreement, and nothing for a re-run to do; with a changed setting, the steps it changes
    show as pending, to be re-run."""
    seen = _watched(tiny_4b_run)["status"]
    running = [r for snap in seen for r in snap["steps"] if r["state"] == "running"]
    assert all(snap["driver"] for snap in seen
               if any(r["state"] == "running" for r in snap["steps"]))
    gen = [r for r in running if r["step"].startswith("generate/") and r["progress"]]
    assert gen and {r["progress"]["unit"] for r in gen} == {"shards"}, running[:3]
    assert {r["progress"]["total"] for r in gen} <= {5, 3}  # 80 and 40 prompts in shards of 16
    phases = {r["step"]: r for r in running if "/train/" in r["step"] and r["progress"]}
    assert set(phases) == {"4b/train/p0_ethics", "4b/train/p1_composure",
                           "4b/train/p2_ethics"}, set(phases)
    mid = [r for r in running if "/train/" in r["step"] and r["progress"] and r["eta_s"] is not None
           and 0 < r["progress"]["done"] < r["progress"]["total"]]
    assert mid and all(r["progress"]["unit"] == "steps" and r["elapsed_s"] >= 0
                       for r in mid), running[-3:]

    r = run_cli("status", *ARGS, f"run_dir={tiny_4b_run}", "--json")
    assert r.returncode == 0, r.stdout[-3000:]
    st = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert st["driver"] is None and st["rerun_would_run"] == []
    manifest = json.loads((tiny_4b_run / "manifest.json").read_text())["steps"]
    assert {x["step"]: x["key"] for x in st["steps"]} == {k: v["key"] for k, v in manifest.items()}
    assert all(x["state"] == "done" and x["elapsed_s"] is not None for x in st["steps"])
    metrics = json.loads((tiny_4b_run / "4b/eval/metrics.json").read_text())
    assert st["agreement"]["4b"]["after"] == metrics["agreement"]["after"]

    from cascade.status import collect, render

    # P1 changed
    text = render(collect(compose([*ARGS, f"run_dir={tiny_4b_run}", "curriculum.1.lr=5e-4"])))
    assert re.search(r"4b/train/p1_composure\s+pending", text), text
    assert ("a re-run would execute 4 steps: 4b/train/p1_composure, 4b/train/p2_ethics, 4b/eval, "
            "4b/gate" in text)


@pytest.mark.slow
def test_the_report_is_complete(tiny_4b_run: Path, tmp_path):
    """After the stage, <run_dir>/report/index.html names the stage and every phase and shows four
    PNG plots that exist and are valid; `python -m cascade report` rebuilds it the same."""
    import matplotlib.image

    from cascade.graph import build_graph
    from cascade.report import gather

    run = copy_run(tiny_4b_run, tmp_path / "run")
    for again in (False, True):
        if again:
            shutil.rmtree(run / "report")
            r = run_cli("report", *ARGS, f"run_dir={run}")
            assert r.returncode == 0, r.stdout[-3000:]
        page = (run / "report/index.html").read_text()
        assert "4b" in page and all(
            p in page for p in ("p0_ethics", "p1_composure", "p2_ethics")
        ), page[:2000]
        images = re.findall(r'<img src="([^"]+)"', page)
        assert sorted(images) == ["funnel.png", "loss.png", "signal.png", "throughput.png"]
        for name in images:
            data = (run / "report" / name).read_bytes()
            assert (data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
                    and data[-8:-4] == b"IEND"), name
            assert matplotlib.image.imread(run / "report" / name).shape[0] > 100
    data = gather(build_graph(compose([*ARGS, f"run_dir={run}"])))
    st = data["stages"]["4b"]
    assert {ph: len(v["losses"]) for ph, v in st["phases"].items()} == {
        "p0_ethics": 16,
        "p1_composure": 16,
        "p2_ethics": 6,
    }
    assert st["agreement"]["after"] > st["agreement"]["before"]
    # the ledger: the gate's verdict and each criterion, as signal.png draws them
    assert st["gate"]["verdict"] == "PROMOTE" and "PROMOTE" in page
    assert [c["name"] for c in st["gate"]["criteria"]] == [
        "agreement", "conditioning", "conditioning_share", "self_ended", "reverse_kl_rise"]
    counts = _step(run, "4b/dataset/p0_ethics")["summary"]
    assert st["funnel"]["p0_ethics"]["1b"]["kept"] == counts["counts"]["kept"]
    assert st["funnel"]["p0_ethics"]["1b"]["generated"] == counts["by_teacher"]["1b"]["generated"]
    assert set(data["generation"]) == {"generate/1b/ethics", "generate/1b/composure"}


def _series(metrics: dict[str, float], name: str, **tags: str) -> float:
    """The sum over processes of the last value of `name` with these tags."""
    total, found = 0.0, False
    for series, value in metrics.items():
        m = re.fullmatch(r"(\w+)\{(.*)\}", series)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if m.group(1) == name and all(labels.get(k) == v for k, v in tags.items()):
            total, found = total + value, True
    assert found, (name, tags, sorted({s.split("{")[0] for s in metrics}))
    return total


@pytest.mark.slow
def test_metrics_reach_prometheus_and_agree_with_the_run(tiny_4b_run: Path):
    """Ray's Prometheus endpoint of the run (cluster.metrics_export_port) carried
    cascade_generation_* tagged by stage and teacher and cascade_train_* tagged by stage and phase,
    with the values the run committed."""
    m = _watched(tiny_4b_run)["metrics"]
    gens = [_step(tiny_4b_run,
                  f"generations/1b/{d}/{_key(tiny_4b_run, f'generate/1b/{d}')}")["summary"]
            for d in ("ethics", "composure")]
    tags = {"stage": "4b", "teacher": "1b"}
    assert _series(m, "ray_cascade_generation_tokens_total", **tags) == sum(
        g["completion_tokens"] for g in gens
    )
    assert _series(m, "ray_cascade_generation_shards_done", **tags) == 8
    assert _series(m, "ray_cascade_generation_shards_total", **tags) == 8
    assert _series(m, "ray_cascade_generation_tokens_per_s", **tags) > 0
    for i, phase in enumerate(("p0_ethics", "p1_composure", "p2_ethics")):
        s = _step(tiny_4b_run, f"4b/train/0{i}-{phase}")["summary"]
        tags = {"stage": "4b", "phase": phase}
        assert _series(m, "ray_cascade_train_step", **tags) == s["steps"]
        assert _series(m, "ray_cascade_train_loss", **tags) == pytest.approx(
            s["losses"][-1], rel=1e-6
        )
        assert _series(m, "ray_cascade_train_tokens_total", **tags) == s["tokens"]
        assert _series(m, "ray_cascade_train_lr", **tags) > 0


def _key(run: Path, step: str) -> str:
    return json.loads((run / "manifest.json").read_text())["steps"][step]["key"]


@pytest.mark.slow
def test_tensorboard_logs_are_in_the_run_directory(tiny_4b_run: Path):
    for phase in ("p0_ethics", "p1_composure", "p2_ethics"):
        events = list(
            (tiny_4b_run / "4b/train/_work/tensorboard" / phase).glob("events.out.tfevents.*")
        )
        assert events and events[0].stat().st_size > 0, phase


def test_a_driver_on_another_machine_is_alive_while_its_heartbeat_moves(tmp_path):
    """`cascade status` from another machine: the lease of a driver on another host counts as alive
    while its heartbeat is younger than lease_ttl_s, and as gone after; on this host its process is
    checked (pid and start tick), and a released lease is nobody's."""
    import os
    import time

    from cascade.lease import _gen_path, _start_ticks, holder, node_id
    from cascade.rundir import RunDir

    rd = RunDir(str(tmp_path / "run"))
    elsewhere = {"id": "x", "host": "elsewhere", "node": "other-boot/pid:[1]", "pid": 1}
    rd.write_json(_gen_path(rd, 1), {**elsewhere, "heartbeat": time.time() - 5})
    assert holder(rd, 60)["host"] == "elsewhere"
    rd.write_json(_gen_path(rd, 2), {**elsewhere, "heartbeat": time.time() - 120})
    # the highest generation is the current one, and its heartbeat is stale
    assert holder(rd, 60) is None
    here = {"id": "y", "host": "here", "node": node_id(), "heartbeat": time.time()}
    rd.write_json(_gen_path(rd, 3), {**here, "pid": 2**22 + 7, "pid_ticks": 1})
    assert holder(rd, 60) is None  # no such process here
    rd.write_json(_gen_path(rd, 4),
                  {**here, "pid": os.getpid(), "pid_ticks": _start_ticks(os.getpid()),
                                     "heartbeat": 0})
    assert holder(rd, 60)["pid"] == os.getpid()  # alive here, whatever its heartbeat says
    rd.write_json(_gen_path(rd, 5),
                  {**here, "pid": os.getpid(), "pid_ticks": _start_ticks(os.getpid()),
                                     "released": True})
    assert holder(rd, 60) is None

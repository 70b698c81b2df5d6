"""The config tree: every YAML composes into the typed schema; the real preset is the seed's
cascade."""

from __future__ import annotations


import pytest

from cascade.config import ConfigError, check
from cascade.graph import needed_stages
from cascade.config import compose
from conftest import ROOT, run_cli

CONF = ROOT / "conf"


@pytest.mark.parametrize("stage", sorted(p.stem for p in (CONF / "stage").glob("*.yaml")))
@pytest.mark.parametrize("models", ["real", "tiny"])
@pytest.mark.parametrize("backend", ["hf", "vllm"])
@pytest.mark.parametrize("cluster", ["local", "multinode"])
def test_every_yaml_composes(stage, models, backend, cluster):
    cfg = compose([f"+stage={stage}", f"models={models}", f"backend={backend}",
                   f"cluster={cluster}"])
    assert cfg.target == stage and cfg.backend.name == backend and cfg.models.preset == models


def test_every_stage_file_names_its_command():
    for p in (CONF / "stage").glob("*.yaml"):
        lines = p.read_text().splitlines()
        assert lines[0] == "# @package _global_" and f"+stage={p.stem}" in lines[1], p


def test_real_preset_is_the_seed_cascade():
    cfg = compose(["+stage=27b"])
    assert cfg.backend.name == "vllm"
    assert [(p.name, p.data, p.iters) for p in cfg.curriculum] == [
        ("p0_ethics", "ethics", 300), ("p1_composure", "composure",
                                       300), ("p2_ethics", "ethics", 100)]
    assert cfg.stages["1b"].model == "lthn/LEM-Gemma3-1B" and not cfg.stages["1b"].teachers
    assert [cfg.stages[s].model for s in ("4b", "12b", "27b")] == [
        "google/gemma-3-4b-it", "google/gemma-3-12b-it", "google/gemma-3-27b-it"]
    assert [t.stage for t in cfg.stages["4b"].teachers] == ["1b"]
    assert [t.stage for t in cfg.stages["12b"].teachers] == ["4b", "1b"]
    assert [t.stage for t in cfg.stages["27b"].teachers] == ["12b", "4b", "1b"]
    assert needed_stages(cfg) == ["1b", "4b", "12b", "27b"]
    assert (cfg.models.trust_remote_code is False and cfg.cluster.auth
            and cfg.cluster.dashboard_host == "127.0.0.1")


def test_tiny_preset_defaults():
    cfg = compose(["+stage=4b", "models=tiny"])
    assert cfg.backend.name == "hf" and cfg.models.tiny.vocab_size <= 8192
    assert needed_stages(cfg) == ["1b", "4b"]


def test_the_270m_root_is_used_as_is_and_root_build_builds_it():
    """models=gemma3-270m's root teaches as it is, as the real preset's; `+root=build` (a stage's
    key path cannot be set on Hydra's command line) turns on the seed's stage-1b build, its model
    unchanged."""
    for models in ("gemma3-270m", "tiny"):
        used = compose(["+stage=1b", f"models={models}"]).stages["1b"]
        built = compose(["+stage=1b", f"models={models}", "+root=build"]).stages["1b"]
        assert built.build and built.model == used.model
    assert not compose(["+stage=4b", "models=gemma3-270m"]).stages["1b"].build


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
    ("curriculum.0.kind=distill",
     "kind distill needs the teachers' top-k log-probabilities: set generation.logprobs"),
    ("curriculum.0.kind=nope",
     "phase kind 'nope': not a built-in kind \\(sft, distill, on_policy\\) and no module"),
    ("+curriculum.0.options.weight=1",
     "options: weight not an option of kind 'sft' \\(its options: none\\)"),
    ("generation.shards_in_flight=0", "shards_in_flight must be > 0"),
    ("+train.resources.GPU=1", "train.resources.GPU: give CPUs and GPUs by train.cpus_per_worker"),
    ("+backend.resources.inference=0", r"backend.resources.inference must be in \(0, inf\]"),
    ("gate.max_harness_drop=0.1", "gate.max_harness_drop judges the release's harness tasks: name"),
    ("gate.max_harness_drop=-1", "gate.max_harness_drop must be >= 0"),
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
    assert (r.returncode == 0 and "stage: 12b, 1b, 27b, 4b" in r.stdout
            and "models: gemma3-270m, real, tiny" in r.stdout)
    assert (r.stdout.startswith("cascade: a teacher-student distillation cascade")
            and "docs/" in r.stdout)
    for sub in ("status", "plan", "report", "serve", "harness"):
        # each named on the page, each with its own
        assert f"\n  {sub} " in r.stdout, sub
        page = run_cli(sub, "--help", cwd=tmp_path)
        assert page.returncode == 0 and page.stdout.startswith(
            f"python -m cascade {sub} +stage="
        ), page.stdout[-2000:]
        assert len(page.stdout.splitlines()) > 5, page.stdout
    r = run_cli("+stage=12b", "models=tiny", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0 and "target: 12b" in r.stdout and "model: tiny:12b" in r.stdout
    assert not any(tmp_path.iterdir()), "--cfg job must write nothing"


@pytest.mark.parametrize("override, message", [
    ("generation.temperature=nan", "generation.temperature must be a finite number, not nan"),
    ("curriculum.0.lr=-1", "curriculum phase 'p0_ethics'.lr must be in (0, inf]"),
    ("curriculum.0.lr=nan", "curriculum phase 'p0_ethics'.lr must be a finite number"),
    ("train.lora.r=0", "train.lora.r must be > 0"),
    ("train.lora.dropout=2", "train.lora.dropout must be in [0, 1)"),
    ("train.max_failures=-1", "train.max_failures must be >= 0"),
    ("train.weight_decay=nan", "train.weight_decay must be a finite number"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be > 0"),
    ("train.lr_schedule=step", "train.lr_schedule 'step': valid schedules: constant, cosine"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio must be in [0, 1]"),
    ("generation.logprobs=-1", "generation.logprobs must be >= 0"),
    ("generation.top_p=0", "generation.top_p must be in (0, 1]"),
    ("generation.restart_timeout_s=-5", "generation.restart_timeout_s must be in (0, inf]"),
    ("backend.hf.batch_size=0", "backend.hf.batch_size must be > 0"),
    ("backend.dtype=int7", "backend.dtype 'int7': valid dtypes: auto, float32, bfloat16, float16"),
    ("backend.vllm.gpu_memory_utilization=5",
     "backend.vllm.gpu_memory_utilization must be in (0, 1]"),
    ("cluster.dashboard_port=70000", "cluster.dashboard_port must be in [1, 65535]"),
    ("eval.batch_size=0", "eval.batch_size must be > 0"),
    ("eval.samples=0", "eval.samples must be > 0"),
    ("seed=-1", "seed must be in [0, 4294967295]"),
    ("seed=18446744073709551616", "seed must be in [0, 4294967295]"),
    ("curriculum.0.name=../x", "curriculum phase '../x'.name '../x': use letters, digits"),
    ("+backend.vllm.engine_kwargs.hf_token=abc",
     "backend.vllm.engine_kwargs.hf_token: looks like a credential"),
    ("+backend.vllm.engine_kwargs.x=hf_abcdefghijklmnopqrstuvwxyz0123",
     "backend.vllm.engine_kwargs.x: holds what looks"),
    ("data.ethics.path=hf_abcdefghijklmnopqrstuvwxyz0123",
     "data.ethics.path: holds what looks like a token"),
    ("hf_token_env=hf_abcdefghijklmnopqrstuvwxyz0123", "holds what looks like a token"),
], ids=lambda v: v if "=" in v else None)
def test_every_value_is_checked_before_ray_starts(override, message):
    with pytest.raises(ConfigError) as e:
        compose(["+stage=4b", "models=tiny", override])
    assert message in str(e.value)
    # a secret is named by its field, never echoed
    assert "abcdefghijklmnopqrstuvwxyz0123" not in str(e.value)


def test_names_that_become_paths_are_restricted():
    """Stage names and data keys name directories: a YAML file could set '../x', which the CLI
    cannot parse."""
    import copy

    cfg = compose(["+stage=4b", "models=tiny"])
    bad = copy.deepcopy(cfg)
    bad.data["../evil"] = bad.data["ethics"]
    with pytest.raises(ConfigError, match=r"data key '../evil': use letters, digits"):
        check(bad)
    bad = copy.deepcopy(cfg)
    bad.stages[".hidden"] = bad.stages.pop("4b")
    with pytest.raises(ConfigError, match=r"stage name '.hidden': use letters, digits"):
        check(bad)


def test_prompt_ids_that_would_make_record_ids_collide_are_refused(tmp_path):
    from cascade.config import DataSource
    from cascade.prompts import load_prompts

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "a/1b", "prompt": "one?"}\n')
    with pytest.raises(ConfigError, match=r"p.jsonl:1: id 'a/1b' must be non-empty, without '/'"):
        load_prompts(DataSource(path=str(bad)))


def test_inherited_auth_off_is_refused_and_the_token_file_made_private(tmp_path, monkeypatch):
    import stat

    from cascade import cluster

    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ConfigError,
                       match="RAY_AUTH_MODE=disabled is set in the environment while cluster.auth"):
        cluster.ensure_auth_token()
    monkeypatch.delenv("RAY_AUTH_MODE")
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("an-existing-token-0123456789")
    token.chmod(0o644)
    cluster.ensure_auth_token()
    assert (stat.S_IMODE(token.stat().st_mode) == 0o600
            and token.read_text() == "an-existing-token-0123456789")
    token.unlink()
    cluster.ensure_auth_token()  # none: a new one, private from the start
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64


def test_cli_refuses_inherited_auth_off_before_anything_runs(tmp_path):
    r = run_cli("+stage=4b", "models=tiny", f"run_dir={tmp_path}/run",
                env={"RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 2 and "RAY_AUTH_MODE=disabled is set in the environment" in r.stdout, (
        r.stdout[-2000:]
    )
    assert not (tmp_path / "run" / "config.yaml").exists() and "Ray 2." not in r.stdout


def test_training_threads_are_the_cpus_shared_out():
    """train.cpus_per_worker unset: each worker gets the most CPUs every worker can hold at once on
    the nodes."""
    from cascade.cluster import share_cpus

    assert share_cpus([2], 1) == 2 and share_cpus([2], 2) == 1 and share_cpus([1, 1], 2) == 1
    assert share_cpus([4, 1], 2) == 2 and share_cpus([3, 3], 2) == 3 and share_cpus([3, 2], 2) == 2
    assert share_cpus([], 1) == 1 and share_cpus([2], 4) == 1
    assert compose(["+stage=4b", "models=tiny"]).train.cpus_per_worker is None
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        compose(["+stage=4b", "models=tiny", "train.cpus_per_worker=0"])


def test_the_learning_rate_schedules():
    """Warmup then constant (the default: the keys of runs from before the schedules), a cosine or
    a line down to min_lr_ratio at the phase's last step; a schedule is part of what a phase
    trains (its key)."""
    from cascade.graph import build_graph

    t = compose(["+stage=4b", "models=tiny"]).train
    assert [t.lr_factor(s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    t.warmup_steps, t.lr_schedule, t.min_lr_ratio = 4, "cosine", 0.1
    f = [t.lr_factor(s, 10) for s in range(10)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(f[3:], f[4:])) and f[6] == pytest.approx(0.55)
    t.lr_schedule = "linear"
    assert t.lr_factor(6, 10) == pytest.approx(0.55) and t.lr_factor(7, 10) == pytest.approx(0.4)
    assert "lr_schedule" not in compose(["+stage=4b", "models=tiny"]).train.identity()

    def keys(*extra: str) -> dict:
        cfg = compose(["+stage=4b", "models=tiny", *extra])
        return {s.name: s.key for s in build_graph(cfg, weights=False).steps()}

    plain, cosine = keys(), keys("train.lr_schedule=cosine")
    assert plain == keys("train.min_lr_ratio=0.5")  # unused by a constant lr: the same run
    changed = {n for n in plain if plain[n] != cosine[n]}
    assert changed and all("/train/" in n or "/eval" in n or "/gate" in n for n in changed)
    assert not any("/generate/" in n or "/dataset/" in n for n in changed)

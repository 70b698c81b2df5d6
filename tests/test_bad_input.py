"""Bad input gets a clear error (exit 2) before Ray starts or a model loads, and loses nothing committed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import FAST, copy_run, manifest, run_cli


def _check_refused(r, message: str) -> None:
    assert r.returncode == 2, r.stdout[-3000:]
    assert message in r.stdout, r.stdout[-3000:]
    assert "Ray 2." not in r.stdout and "Started a local Ray" not in r.stdout, "Ray must not start on bad input"


def _conf_dir(tmp_path: Path, body: str) -> Path:
    d = tmp_path / "conf" / "local"
    d.mkdir(parents=True)
    (d / "mine.yaml").write_text("# @package _global_\n" + body)
    return tmp_path / "conf"


def test_missing_model_path_is_named(tmp_path):
    conf = _conf_dir(tmp_path, "stages:\n  4b: {model: /nonexistent/gemma-4b}\n")
    r = run_cli("--config-dir", str(conf), "+stage=4b", "models=tiny", "+local=mine", f"run_dir={tmp_path}/run")
    _check_refused(r, "stages.4b.model: model path not found (no config.json): /nonexistent/gemma-4b")


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "prompt": "one?"}\n{"id": "b", "prompt": "two?"}\n{"id": "c", "prompt": \n', ":3: malformed JSON"),
    ('{"id": "a", "prompt": "one?"}\n{"id": "b", "question": "two?"}\n',
     ":2: missing column 'prompt' (columns: id, question)"),
    ("\n", "empty prompt set: {file} has no prompts"),
], ids=["malformed-json", "missing-column", "empty-set"])
def test_bad_data_file_is_named_with_its_line(tmp_path, content, message):
    bad = tmp_path / "probes.jsonl"
    bad.write_text(content)
    r = run_cli("+stage=4b", "models=tiny", f"data.ethics.path={bad}", f"run_dir={tmp_path}/run")
    _check_refused(r, message.format(file=bad) if "{file}" in message else f"{bad}{message}")


def test_missing_data_file(tmp_path):
    r = run_cli("+stage=4b", "models=tiny", f"data.composure.path={tmp_path}/nope.jsonl", f"run_dir={tmp_path}/run")
    _check_refused(r, f"data file not found: {tmp_path}/nope.jsonl")


def _tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file() and "logs" not in p.parts:
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_bad_input_on_a_finished_run_loses_nothing(tiny_4b_run, tmp_path):
    run = copy_run(tiny_4b_run, tmp_path / "run")
    before, steps = _tree_digest(run), manifest(run)["steps"]
    bad = tmp_path / "probes.jsonl"
    bad.write_text("not json\n")
    r = run_cli(*FAST, "+stage=12b", "models=tiny", f"data.ethics.path={bad}", f"run_dir={run}")
    _check_refused(r, f"{bad}:1: malformed JSON")
    assert _tree_digest(run) == before and manifest(run)["steps"] == steps
    r = run_cli(*FAST, "+stage=4b", "models=tiny", f"run_dir={run}")
    assert r.returncode == 0 and "nothing to do" in r.stdout

"""Bad input gets a clear error (exit 2) before Ray starts or a model loads, and loses nothing
committed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import FAST, compose, copy_run, manifest, run_cli


def _check_refused(r, message: str) -> None:
    assert r.returncode == 2, r.stdout[-3000:]
    assert message in r.stdout, r.stdout[-3000:]
    assert "Ray 2." not in r.stdout and "Started a local Ray" not in r.stdout, (
        "Ray must not start on bad input"
    )


def _conf_dir(tmp_path: Path, body: str) -> Path:
    d = tmp_path / "conf" / "local"
    d.mkdir(parents=True)
    (d / "mine.yaml").write_text("# @package _global_\n" + body)
    return tmp_path / "conf"


def test_missing_model_path_is_named(tmp_path):
    conf = _conf_dir(tmp_path, "stages:\n  4b: {model: /nonexistent/gemma-4b}\n")
    r = run_cli("--config-dir", str(conf), "+stage=4b", "models=tiny", "+local=mine",
                f"run_dir={tmp_path}/run")
    _check_refused(r,
                   "stages.4b.model: model path not found (no config.json): /nonexistent/gemma-4b")


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "prompt": "one?"}\n{"id": "b", "prompt": "two?"}\n{"id": "c", "prompt": \n',
     ":3: malformed JSON"),
    ('{"id": "a", "prompt": "one?"}\n{"id": "b", "question": "two?"}\n',
     ":2: missing column 'prompt' (columns: id, question)"),
    ("\n", "empty prompt set: {file} has no prompts"),
], ids=["malformed-json", "missing-column", "empty-set"])
def test_bad_data_file_is_named_with_its_line(tmp_path, content, message):
    bad = tmp_path / "probes.jsonl"
    bad.write_text(content)
    r = run_cli("+stage=4b", "models=tiny", f"data.ethics.path={bad}", f"run_dir={tmp_path}/run")
    _check_refused(r, message.format(file=bad) if "{file}" in message else f"{bad}{message}")


@pytest.mark.parametrize("raw, message", [
    (b'{"id": "a", "prompt": "one?"}\n{"id": "b", "prompt": "caf\xe9?"}\n',
     ":2: not UTF-8 text (byte 26"),
    (b'{"id": "a", "messages": [{"role": "user", "content": null}]}\n',
     ":1: message 0 must have a role of system, "
     "user or assistant and text content (a string), not role 'user' with NoneType content"),
    (b'{"id": "a", "messages": [{"role": "user", "content": ["x"]}]}\n', "with list content"),
    (b'{"id": "a", "messages": [{"role": "robot", "content": "x"}]}\n', "not role 'robot'"),
], ids=["not-utf8", "null-content", "list-content", "unknown-role"])
@pytest.mark.faults
def test_hostile_rows_are_named_with_their_line(tmp_path, raw, message):
    from cascade.config import ConfigError, DataSource
    from cascade.prompts import load_prompts

    bad = tmp_path / "probes.jsonl"
    bad.write_bytes(raw)
    msgs = b"messages" in raw
    src = DataSource(path=str(bad), prompt_column=None if msgs else "prompt",
                     messages_column="messages" if msgs else None)
    with pytest.raises(ConfigError) as e:
        load_prompts(src)
    assert f"{bad}{message}" in str(e.value) or message in str(e.value), str(e.value)
    assert str(bad) in str(e.value)


@pytest.mark.faults
def test_all_prompts_held_out_is_refused_before_generation(tmp_path):
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(f'{{"id": "p{i}", "prompt": "q{i}?", "split": "heldout"}}\n'
                              for i in range(5)))
    r = run_cli("+stage=4b", "models=tiny", f"data.ethics.path={probes}", f"run_dir={tmp_path}/run")
    _check_refused(r, f"data.ethics ({probes}): all 5 prompts are held out, none left to train on")


def test_missing_data_file(tmp_path):
    r = run_cli("+stage=4b", "models=tiny", f"data.composure.path={tmp_path}/nope.jsonl",
                f"run_dir={tmp_path}/run")
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


@pytest.mark.faults
def test_over_long_prompts_dropped_before_generation_empty_examples_before_training(tmp_path):
    """A prompt longer than the engine's context (less max_new_tokens) is dropped and counted before
    any engine sees it; a training example whose prompt fills train.max_seq_len (no response token
    left) is dropped and counted, never trained on."""
    from transformers import AutoTokenizer

    from cascade.graph import Teacher
    from cascade.prompts import Prompt
    from cascade.rundir import RunDir
    from cascade.tiny import build_preset, preset_dir
    from stages.generate import _fitting
    from cascade import phases
    from cascade.phases import load_examples

    cfg = compose(["+stage=4b", "models=tiny", "generation.max_new_tokens=64"])
    build_preset(cfg)
    model = str(preset_dir(cfg) / "1b")
    # the tiny models' context: 512 tokens
    short, long = "What is kindness?", " ".join(["kindness"] * 600)
    ps = [Prompt("a", [{"role": "user", "content": short}]),
          Prompt("b", [{"role": "user", "content": long}])]
    kept, dropped = _fitting(cfg, Teacher("1b", model, "k"), {"ethics": ps})
    assert [p.id for p in kept["ethics"]] == ["a"] and dropped == {"ethics": 1}

    rd = RunDir(str(tmp_path / "run"))
    path = rd.path("train.jsonl")
    rd.write_jsonl(path, [{"messages": p.messages, "response": "Be kind."} for p in ps])
    sft = phases.load("sft")
    examples, too_long = load_examples(rd, path, AutoTokenizer.from_pretrained(model), 256, sft,
                                       sft.Options())
    assert len(examples) == 1 and too_long == 1
    assert any(x != -100 for x in examples[0]["labels"])

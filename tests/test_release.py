"""The release (stages/release.py), `cascade serve` and `cascade harness` on the tiny preset:
llama.cpp's own converter and quantizer (llama-cpp-python, built by scripts/setup.sh), vLLM's and
llama-cpp-python's OpenAI servers, EleutherAI's lm-evaluation-harness; no mock. One release is made
on a copy of the shared tiny run and read by every test here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST, ROOT, cascade_cmd, copy_run, free_port, manifest, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("release")]  # one release for the module
REL = ["release.enabled=true", "release.harness=[cascade_probes,cascade_format]"]
SEED_REQUEST = [{"role": "user", "content": "What is kindness?"}]  # the seed card's curl example


@pytest.fixture(scope="module")
def released(tiny_4b_run, tmp_path_factory) -> Path:
    run = copy_run(tiny_4b_run, tmp_path_factory.mktemp("release") / "run")
    r = run_cli(*FAST, "+stage=4b", "models=tiny", f"run_dir={run}", *REL)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "[run ] 4b/release" in r.stdout and "[run ] 4b/train" not in r.stdout, (
        "only the release was missing"
    )
    return run


def test_release_has_the_seeds_formats_each_checked_and_a_card_from_provenance(released: Path):
    rel = released / "4b/release"
    assert manifest(released)["steps"]["4b/release"]["state"] == "done"
    hf = rel / "hf"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer.model",
              "chat_template.jinja", "generation_config.json"):
        assert (hf / f).is_file(), f
    assert not list(hf.glob("*.bin")) and not list(hf.glob("*.pt")), "safetensors only"
    summary = json.loads((rel / "release.json").read_text())
    rows = {r["format"]: r for r in summary["formats"]}
    assert set(rows) == {"safetensors", "GGUF F16", "GGUF Q8_0", "GGUF Q4_K_M"}
    for t in ("F16", "Q8_0", "Q4_K_M"):
        row = rows[f"GGUF {t}"]
        assert (rel / row["file"]).stat().st_size == row["bytes"] > 0
        assert row["tokenization_same"] and row["positions"] > 100, row
        assert 0 <= row["kl"] < 0.1 and 0.5 < row["agreement"] <= 1, row
    assert rows["GGUF F16"]["agreement"] >= 0.99 and rows["GGUF F16"]["kl"] < 1e-4, rows["GGUF F16"]
    assert rows["GGUF Q4_K_M"]["bytes"] < rows["GGUF Q8_0"]["bytes"] < rows["GGUF F16"]["bytes"]
    # the card: front matter the hub reads, then what the run did, with its own figures
    card = (rel / "README.md").read_text()
    front = card.split("---")[1]
    for key in ("license: eupl-1.2", "base_model: tiny:4b", "pipeline_tag: text-generation",
                "tags: [", "datasets: [composure, ethics]"):
        assert key in front, key
    metrics = json.loads((released / "4b/eval/metrics.json").read_text())
    step = json.loads((released / "4b/train/02-p2_ethics/step.json").read_text())
    assert f"`{step['key']}`" in card, "the lineage names the student's key"
    assert "| 1b | `tiny:1b` |" in card and "| 4b | `tiny:4b` |" in card
    assert " | root teacher | used as is |" in card and " | PROMOTE |" in card  # each one's gate
    assert "## Promotion gate\n\n**PROMOTE**" in card and "| agreement | " in card
    for phase in ("p0_ethics", "p1_composure", "p2_ethics"):
        assert f"| {phase} |" in card
    assert f"{metrics['agreement']['before']:.4f} | {metrics['agreement']['after']:.4f}" in card
    for row in summary["formats"][1:]:
        assert f"`{row['file']}`" in card and f"{row['agreement']:.4f}" in card
    assert ("llama-server -m gguf/cascade-gemma3-4b-Q4_K_M.gguf" in card
            and "python -m cascade serve" in card)
    # lm-evaluation-harness: the student and its teacher on the shipped offline tasks, in
    # release.json and the card
    h = summary["harness"]
    assert set(h) == {"student", "teacher 1b"}
    for who in h.values():
        assert set(who["results"]) == {"cascade_probes", "cascade_format"}, who
        assert (who["samples"]["cascade_format"] == 16
                and who["samples"]["cascade_probes"] == metrics["agreement"]["records"])
        assert 0 <= who["results"]["cascade_format"]["prompt_level_acc"] <= 1
    # the harness's ROUGE-L of the student's greedy answers is the stage's own text-level measure
    assert h["student"]["results"]["cascade_probes"]["rouge_l"] == pytest.approx(
        metrics["text_agreement"]["after"], abs=0.02)
    assert "| cascade_format (16 prompts) | prompt_level_acc |" in card


def test_the_gate_judges_the_harness_tasks_and_the_release_takes_them(released: Path,
                                                                      tmp_path: Path):
    """gate.max_harness_drop: the evaluation runs the release's harness tasks on the student and its
    teacher (training is not re-run), the gate judges the teacher's lead, and the release ships the
    evaluation's results instead of running them again."""
    from cascade.harness import lead

    run = copy_run(released, tmp_path / "run")
    r = run_cli(*FAST, "+stage=4b", "models=tiny", f"run_dir={run}", *REL,
                "gate.max_harness_drop=1.0")
    assert r.returncode == 0, r.stdout[-4000:]
    assert "[run ] 4b/eval" in r.stdout and "[run ] 4b/train" not in r.stdout, r.stdout[-3000:]
    judged = json.loads((run / "4b/eval/metrics.json").read_text())["harness"]
    assert judged["tasks"] == ["cascade_probes", "cascade_format"]
    res = judged["results"]
    assert set(res) == {"student", "teacher 1b"}
    before = json.loads((released / "4b/release/release.json").read_text())["harness"]
    for who in res:  # the same tasks on the same weights: the release's own figures before
        for task, figures in before[who]["results"].items():
            assert res[who]["results"][task] == pytest.approx(figures, abs=1e-6), (who, task)
    v = json.loads((run / "4b/gate/verdict.json").read_text())
    c = next(c for c in v["criteria"] if c["name"] == "harness_drop")
    assert c["value"] == pytest.approx(lead(res["student"], res["teacher 1b"]))
    assert c["threshold"] == 1.0 and c["passed"] is True and v["verdict"] == "PROMOTE", v
    shipped = json.loads((run / "4b/release/release.json").read_text())["harness"]
    assert shipped == res, "the release takes the evaluation's harness results"
    assert "harness 4b student: " in r.stdout


def test_a_committed_release_is_skipped(released: Path):
    r = run_cli(*FAST, "+stage=4b", "models=tiny", f"run_dir={released}", *REL)
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout[-3000:]


def test_a_conversion_that_changes_the_model_fails(released: Path, tmp_path: Path):
    """llama.cpp's Gemma 3 graph scales queries by 1/sqrt(head_dim) whatever query_pre_attn_scalar
    says, and its converter does not complain: refused before converting, and caught by the
    comparison if converted anyway."""
    from cascade import gguf
    from cascade.gguf import ReleaseError
    from stages import release

    hf = released / "4b/release/hf"
    bad = tmp_path / "hf"
    shutil.copytree(hf, bad)
    c = json.loads((bad / "config.json").read_text())
    c["query_pre_attn_scalar"] = 256
    (bad / "config.json").write_text(json.dumps(c))
    assert any("query_pre_attn_scalar" in m for m in gguf.llama_cpp_mismatches(c))
    with pytest.raises(ReleaseError, match="llama.cpp would run a different model"):
        release.build(str(tmp_path / "stage"), str(bad), "x", ["F16"], [], (0.99, 0.9, "drop"), 256,
                      False)
    # converted anyway: the GGUF answers as the changed config says, not as the student does
    probes = [json.loads(line)
              for line in (released / "4b/dataset/p0_ethics/heldout.jsonl").open()][:4]
    # transformers scales by 1/16, llama.cpp by 1/8
    reference, _ = release._reference(bad, probes, 256, False, None)
    gguf.convert(bad, tmp_path / "bad.gguf", "F16")
    check = gguf.compare_gguf(tmp_path / "bad.gguf", reference)
    assert check["agreement"] < 0.99, check
    c.pop("query_pre_attn_scalar")
    assert any("no query_pre_attn_scalar" in m for m in gguf.llama_cpp_mismatches(c))


def test_an_unknown_gguf_type_is_refused_before_ray(tiny_4b_run, tmp_path: Path):
    run = copy_run(tiny_4b_run, tmp_path / "run")
    r = run_cli(*FAST, "+stage=4b", "models=tiny", f"run_dir={run}", "release.enabled=true",
                "release.gguf=[Q9_Z]")
    assert r.returncode == 2 and "'Q9_Z' is not a llama.cpp type" in r.stdout, r.stdout[-3000:]
    assert "Started a local Ray" not in r.stdout


def _greedy(hf: Path, messages: list[dict], max_new: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cascade.chat import render_prompt, stop_token_ids

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    enc = tok(render_prompt(tok, messages), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                         eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id)
    return tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _serve(run: Path, engine: str, port: int, log: Path, key: str) -> subprocess.Popen:
    args = [*FAST, "+stage=4b", "models=tiny", f"run_dir={run}", *REL, f"serve.engine={engine}",
            f"serve.port={port}"]
    return subprocess.Popen(cascade_cmd("serve", *args), cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "CASCADE_API_KEY": key}, start_new_session=True)


def _client(port: int, key: str, proc: subprocess.Popen, log: Path, timeout: float = 300):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    deadline = time.time() + timeout
    while True:
        try:
            assert [m.id for m in client.models.list().data] == ["cascade-gemma3-4b"]
            return client
        except openai.APIConnectionError:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(1)


@pytest.mark.vllm
@pytest.mark.parametrize("engine", ["llamacpp", "vllm"])
def test_served_answer_equals_transformers_greedy(released: Path, tmp_path: Path, engine: str):
    """`python -m cascade serve` on 127.0.0.1 behind an API key from the environment; the seed's
    request at temperature 0 gets transformers' greedy answer (vLLM: the HF directory; llama.cpp:
    the F16 GGUF)."""
    import openai

    port, key, log = free_port(), "sk-test-" + "k" * 24, tmp_path / "serve.log"
    proc = _serve(released, engine, port, log, key)
    try:
        client = _client(port, key, proc, log)
        # llama-cpp-python's server penalises repeats (1.1) unless asked not to; llama.cpp's
        # llama-server does not
        extra = {"repeat_penalty": 1.0} if engine == "llamacpp" else {}
        r = client.chat.completions.create(model="cascade-gemma3-4b", messages=SEED_REQUEST,
                                           temperature=0, max_tokens=48, extra_body=extra)
        assert r.choices[0].message.content == _greedy(released / "4b/release/hf", SEED_REQUEST, 48)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0
            ).models.list()
        if engine == "vllm":
            # the harness through the endpoint: the same tasks, the same greedy answers
            out = subprocess.run(
                cascade_cmd("harness", *FAST, "+stage=4b", "models=tiny", f"run_dir={released}",
                            *REL, f"serve.port={port}"),
                cwd=ROOT,
                capture_output=True,
                text=True,
                env={**os.environ, "CASCADE_API_KEY": key},
                timeout=600,
            )
            assert out.returncode == 0, out.stderr[-3000:]
            assert key not in out.stdout + out.stderr, (
                "the key must not reach the harness's log (lm-eval's included)"
            )
            served = json.loads(out.stdout.strip().splitlines()[-1])
            local = json.loads((released / "4b/release/release.json").read_text())["harness"][
                "student"
            ]
            assert served["samples"] == local["samples"]
            # Every metric is a mean over the task's prompts of a per-prompt score in [0, 1]
            # (ROUGE-L F1, accuracy), so one answer that differs moves it by at most 1/n. The local
            # run is transformers in float32, eight prompts a batch; the served one vLLM, one at a
            # time: a greedy near-tie may split one answer, no more.
            for task, metrics in local["results"].items():
                one = 1 / local["samples"][task]
                for k, v in metrics.items():
                    assert served["results"][task][k] == pytest.approx(v, abs=one + 1e-9), (
                        task,
                        k,
                        one,
                    )
        assert key not in log.read_text(), "the key must not reach the server's log"
        leaked = [p for p in released.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
        assert not leaked, leaked  # nor any file of the run directory
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_serving_beyond_loopback_needs_a_key(released: Path):
    env = {k: v for k, v in os.environ.items() if k != "CASCADE_API_KEY"}
    args = [*FAST, "+stage=4b", "models=tiny", f"run_dir={released}", *REL, "serve.host=0.0.0.0"]
    r = subprocess.run(cascade_cmd("serve", *args), cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 2 and "refusing an open endpoint" in r.stderr, r.stderr[-2000:]


def test_serve_without_a_committed_release_says_how_to_make_it(tiny_4b_run):
    r = subprocess.run(
        cascade_cmd("serve", *FAST, "+stage=4b", "models=tiny", f"run_dir={tiny_4b_run}",
                    "release.enabled=true"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "has no committed release" in r.stderr, r.stderr[-2000:]


def test_sentencepiece_file_tokenizes_as_transformers(tiny_4b_run, tmp_path: Path):
    """The tokenizer.model written for llama.cpp (cascade/spm.py) splits text as the HF tokenizer
    does."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from cascade.spm import write_sentencepiece

    src = tiny_4b_run / "4b/train/02-p2_ethics"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tmp_path / f)
    sp = spm.SentencePieceProcessor(model_file=str(write_sentencepiece(tmp_path)))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    texts = [json.loads(line)["prompt"] for line in (ROOT / "data/ethics_probes.jsonl").open()]
    texts += ["Hello  123 wörld ☃ 😀\n\n\ttabs", " leading and trailing  "]
    assert all(sp.encode(t) == tok(t, add_special_tokens=False)["input_ids"] for t in texts)
    assert sp.vocab_size() == len(tok)


def test_a_format_below_the_bar_is_not_shipped_or_is_marked(tmp_path: Path):
    """release.min_quant_agreement judges every type but F32/F16: below it the file is removed
    (below_bar drop) or shipped marked (mark); the row keeps its figures either way."""
    from stages.release import _judged

    for below, verdict in (("drop", "not shipped"), ("mark", "below the bar")):
        f = tmp_path / f"x-Q4_K_M-{below}.gguf"
        f.write_bytes(b"GGUF")
        row = {"format": "GGUF Q4_K_M", "file": f"gguf/{f.name}", "bytes": 4, "agreement": 0.45}
        out = _judged(row, "Q4_K_M", f, 0.9, below)
        assert out["verdict"] == verdict and out["agreement"] == 0.45
        assert f.exists() == (below == "mark") and (out["file"] is None) == (below == "drop")
    f16 = {"format": "GGUF F16", "file": "gguf/x-F16.gguf", "bytes": 4, "agreement": 0.995}
    assert _judged(f16, "F16", tmp_path / "x-F16.gguf", 0.999, "drop")["verdict"] == "ship"

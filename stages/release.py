"""Step 6 of a stage: the release - what the seed ships, made from the run's own provenance.

    python -m cascade +stage=4b models=tiny release.enabled=true    # <run_dir>/4b/release/
    python -m cascade serve +stage=4b                               # serves it (cascade/serve.py)

    <stage>/release/hf/              the fused student: safetensors, tokenizer (+ SentencePiece's
                                     tokenizer.model), chat template, generation config; what
                                     transformers and vLLM load
    <stage>/release/gguf/<family>-<stage>-<TYPE>.gguf   one file per release.gguf type
    <stage>/release/README.md        the model card (hub front matter; body written from the run)
    <stage>/release/release.json     the formats table's figures and the harness's results (the
                                     evaluation's when the gate judged them: gate.max_harness_drop)

GGUF files come from llama.cpp's own converter and quantizer (cascade/gguf.py), never from a writer
of ours. Each file is checked before the step commits: llama.cpp loads it and tokenizes the held-out
prompts as transformers does, and its next-token distributions at every position of release.probes
held-out prompts with their teachers' answers are compared with transformers': argmax agreement and
mean KL(transformers || GGUF). A F32 or F16 file below release.min_agreement fails the step: a
conversion that silently changes the model (a config field llama.cpp ignores, say) commits nothing.
Known mismatches are refused before converting (see cascade.gguf.llama_cpp_mismatches). BF16 and
quantized types are not held to the bar; their agreement and KL go in the card.

The heavy part runs as one Ray task on the driver's node (staging is there); the driver writes the
card.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from cascade import loads
from cascade.card import model_card
from cascade.config import Config
from cascade.gguf import (EXACT_TYPES, FLOAT_TYPES, ReleaseError, compare_gguf, convert, file_name,
                          llama_cpp_mismatches, quantize, quiet_llama_cpp)
from cascade.graph import Context, StageGraph, Work
from cascade.rundir import RunDir, Step
from cascade.scoring import heldout
from cascade.steps import Made
from cascade.storage import local_model

log = logging.getLogger(__name__)


def run(ctx: Context, w: Work, todo: list[Step]) -> dict[str, Made]:
    """The stage's release, staged for the driver to commit."""
    staging = ctx.rd.staging(w.stage.release.name)
    return {w.stage.release.name: Made(build_release(staging, ctx.cfg, w.stage, ctx.rd,
                                                     ctx.graph.stages), staging)}


def cost(est: Any, w: Work, todo: list[Step]) -> list[dict]:
    """The GGUF files' sizes; host memory: the float32 reference (transformers) and llama.cpp's F16
    file, loaded together to compare."""
    from cascade.devices import GB
    from cascade.gguf import BITS

    a = est.arch[w.stage.name]
    sizes = {t: round(a.params * BITS.get(t, 16) / 8 / GB, 2)
             for t in ["F16", *est.cfg.release.gguf]}
    mem = {"host_ram": a.params * (4 + 2) / GB, "limit": 0.0}
    work = {"gguf_gb": sizes, "probes": est.cfg.release.probes}
    return [est.row(w.stage.release.name, "release", w.stage.name, a, 0, mem, work, 0, "", 0.0)]


def build_release(staging: str, cfg: Config, sp: StageGraph, rd: RunDir,
                  stages: list[StageGraph]) -> dict:
    """Build the release in staging (a Ray task on this node), then write its model card; returns
    the summary."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    t0 = time.perf_counter()
    name = cfg.release.name(sp.name)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=cfg.release.num_cpus, num_gpus=cfg.release.num_gpus)(_built)
    probes = heldout(rd, sp)
    # the harness's tasks: the student's scored in the release's task on the model it loaded
    spec = ((list(cfg.release.harness), cfg.release.harness_limit, cfg.seed, probes)
            if cfg.release.harness else None)
    # ... unless the evaluation ran them for the gate (gate.max_harness_drop): taken from it
    judged = (rd.read_json(rd.metrics(sp.name)) or {}).get("harness")
    if spec and judged and [judged["tasks"], judged["limit"], judged["seed"]] == list(spec[:3]):
        spec = None
    (formats, student), got = ray.get(task.options(
        name=f"release/{sp.name}", scheduling_strategy=here).remote(
        staging, sp.final_model, name, list(cfg.release.gguf), probes[: cfg.release.probes],
        (cfg.release.min_agreement, cfg.release.min_quant_agreement, cfg.release.below_bar),
        cfg.train.max_seq_len, cfg.models.trust_remote_code, spec))
    harness = judged["results"] if judged and spec is None else {}
    if spec:  # the student and its teachers on the same tasks (cascade/harness.py)
        from cascade.harness import describe
        from cascade.harness import evaluate as harness_eval

        task = ray.remote(num_cpus=cfg.release.num_cpus, num_gpus=cfg.release.num_gpus)(
            harness_eval
        )
        refs = {f"teacher {t.name}": task.options(
            name=f"harness/{sp.name}/teacher {t.name}", scheduling_strategy=here).remote(
            t.model, *spec) for t in sp.teachers}
        harness = {"student": student, **{k: ray.get(r) for k, r in refs.items()}}
        for k, r in harness.items():
            log.info("harness %s %s: %s", sp.name, k, describe(r))
    summary = {"name": name, "formats": formats, "harness": harness,
               "seconds": round(time.perf_counter() - t0, 1)}
    rd.write_json(f"{staging}/release.json", summary)
    Path(staging, "README.md").write_text(model_card(cfg, sp, name, formats, harness,
                                                     _provenance(cfg, sp, rd, stages)))
    return {**summary, "loads": got}  # the weight loads (cascade/loads.py), not in release.json


def _provenance(cfg: Config, sp: StageGraph, rd: RunDir, stages: list[StageGraph]) -> dict:
    """What the card is written from: the stage's metrics and the chain of stages it learnt from,
    with keys."""
    by_name, chain, todo = {s.name: s for s in stages}, {}, [sp.name]
    while todo:
        s = by_name[todo.pop()]
        gate = (rd.committed(s.gate) or {}).get("summary", {}) if s.gate else {}
        chain[s.name] = {"stage": s.name, "model": cfg.stages[s.name].model, "key": s.final_key,
                         "teachers": [(t.name, t.weight) for t in s.teachers],
                         "gate": gate.get("verdict", "-") if s.gate else "used as is"}
        todo += [t.name for t in s.teachers if t.name in by_name and t.name not in chain]
    lineage = [chain[s.name] for s in stages if s.name in chain]
    return {"metrics": rd.read_json(rd.metrics(sp.name)), "lineage": lineage,
            "probes": cfg.release.probes,
            "verdict": rd.read_json(f"{rd.gate(sp.name)}/verdict.json")}




def _built(*args: Any) -> tuple[list[dict], list[dict]]:
    """build(*args) and the weight loads it made (cascade/loads.py), as one Ray task."""
    loads.process = "release"
    return build(*args), loads.taken()


def build(staging: str, model: str, name: str, types: list[str], probes: list[dict],
          bars: tuple[float, float, str], max_len: int, trust: bool,
          harness: tuple | None = None) -> tuple[list[dict], dict]:
    """The HF directory, the GGUF files, each checked against transformers: (the formats table's
    rows, the harness's results for the HF directory's model, {} without `harness`: (tasks,
    limit, seed, probes) of cascade.harness.evaluate, run on the model the checks loaded). bars:
    (release.min_agreement, release.min_quant_agreement, release.below_bar)."""
    quiet_llama_cpp()
    hf = Path(staging, "hf")
    for part in ("hf", "gguf"):  # a retried task (its worker died) starts from nothing
        shutil.rmtree(Path(staging, part), ignore_errors=True)
    _copy_model(Path(local_model(model)), hf)
    from cascade.spm import write_sentencepiece

    write_sentencepiece(hf)  # llama.cpp converts Gemma's tokenizer from SentencePiece's file only
    problems = llama_cpp_mismatches(json.loads((hf / "config.json").read_text()))
    if problems:
        raise ReleaseError(f"{model}: llama.cpp would run a different model: {'; '.join(problems)}")
    gdir = Path(staging, "gguf")
    gdir.mkdir()
    floats = [t for t in types if t in FLOAT_TYPES]
    if not any(t in EXACT_TYPES for t in floats):
        floats.insert(0, "F16")  # made, checked against the bar and removed: the quantizer's source
    source = "F16" if "F16" in floats else "F32"
    files = {t: gdir / file_name(name, t) for t in dict.fromkeys(floats + types)}
    t0 = time.perf_counter()
    for t in floats:
        convert(hf, files[t], t)
    for t in types:
        if t not in FLOAT_TYPES:
            quantize(files[source], files[t], t)
    made = time.perf_counter() - t0
    reference, student = _reference(hf, probes, max_len, trust, harness)
    rows = [{"format": "safetensors", "file": "hf/", "bytes": _size(hf),
             "engines": "transformers, vLLM"}]
    for t in files:
        row = _checked(name, t, files[t], reference, bars[0])
        if t in types:
            rows.append(_judged(row, t, files[t], *bars[1:]))
        else:  # the quantizer's source, not asked for
            files[t].unlink()
    if all(r["verdict"] == "not shipped" for r in rows[1:]):
        asked = ", ".join(r["format"] for r in rows[1:])
        raise ReleaseError(f"no GGUF type reached release.min_quant_agreement {bars[1]} ({asked}): "
                           "nothing to ship (release.below_bar=mark ships them marked)")
    rows[0]["convert_seconds"] = round(made, 1)
    return rows, student


def _judged(row: dict, t: str, path: Path, bar: float, below: str) -> dict:
    """A format's verdict: an exact type has passed release.min_agreement already; any other type
    (BF16, quantized) ships when its next-token argmax agreement with the student on the held-out
    probes reaches release.min_quant_agreement, else is not shipped (its file removed; below_bar
    drop) or shipped marked (mark)."""
    if t in EXACT_TYPES or row["agreement"] >= bar:
        return {**row, "verdict": "ship"}
    log.warning("release %s: argmax agreement %.4f < release.min_quant_agreement %s: %s", path.name,
                row["agreement"], bar, "not shipped" if below == "drop" else "shipped, marked")
    if below == "drop":
        path.unlink()
        return {**row, "file": None, "bytes": 0, "verdict": "not shipped"}
    return {**row, "verdict": "below the bar"}


def _checked(name: str, t: str, path: Path, reference: Any, min_agreement: float) -> dict:
    """A GGUF file's row of the formats table, compared with transformers; raises ReleaseError when
    llama.cpp tokenizes differently, or an exact type does not reach release.min_agreement."""
    check = compare_gguf(path, reference)
    row = {"format": f"GGUF {t}", "file": f"gguf/{path.name}", "bytes": path.stat().st_size,
           "engines": "llama.cpp", **check}
    log.info("release %s %s: %d bytes, argmax agreement %.4f, KL %.2e, tokenization %s", name, t,
             row["bytes"], check["agreement"], check["kl"],
             "same" if check["tokenization_same"] else "DIFFERS")
    if not check["tokenization_same"]:
        raise ReleaseError(f"{path.name}: llama.cpp tokenizes the held-out prompts differently "
                           f"from transformers ({check['tokenization_detail']})")
    if t in EXACT_TYPES and check["agreement"] < min_agreement:
        raise ReleaseError(f"{path.name}: next-token argmax agreement with transformers is "
                           f"{check['agreement']:.4f} < release.min_agreement {min_agreement} "
                           f"(KL {check['kl']:.3g}): the GGUF is not the student")
    return row


def _copy_model(src: Path, dst: Path) -> None:
    """The fused model's files (hard links where the filesystem allows: committed files are never
    rewritten)."""
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != "step.json":
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    if not (dst / "tokenizer.json").exists():
        raise ReleaseError(f"{src}: no tokenizer.json to release")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _reference(hf: Path, probes: list[dict], max_len: int, trust: bool,
               harness: tuple | None) -> tuple[list[dict], dict]:
    """transformers' side: each probe's prompt text, its token ids (prompt + answer) and log-probs
    everywhere; and, with `harness`, the harness's results for the same model in memory."""
    import torch
    from transformers import AutoTokenizer

    from cascade.chat import encode_example, render_prompt
    from cascade.modeling import load_model

    tok = AutoTokenizer.from_pretrained(str(hf), trust_remote_code=trust)
    model = load_model(hf, dtype=torch.float32, trust_remote_code=trust).eval()
    out = []
    for p in probes:
        ids = encode_example(tok, p["messages"], p["response"], max_len)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        prompt = render_prompt(tok, p["messages"])
        out.append({"ids": ids, "logp": logp.numpy(), "prompt": prompt,
                    "prompt_ids": tok(prompt, add_special_tokens=False)["input_ids"]})
    if not harness:
        return out, {}
    from cascade.harness import evaluate

    return out, evaluate(str(hf), *harness, loaded=(model, tok))


# -- the model card --------------------------------------------------------------------------------

"""A standard evaluation: EleutherAI's lm-evaluation-harness on a model directory or a served
endpoint.

    python -m cascade +stage=4b models=tiny release.enabled=true \
        release.harness=[cascade_probes,cascade_format]
    # the same tasks through the endpoint `python -m cascade serve` runs (serve.host, serve.port)
    python -m cascade harness +stage=4b models=tiny release.enabled=true \
        release.harness=[cascade_format]

Offline tasks ship with the project (data/harness/): `cascade_probes` - the stage's held-out probes,
the model's greedy answer against its teachers' (ROUGE-L F1), written beside a copy of the task at
run time; `cascade_format` - sixteen prompts with verifiable instructions in IFEval's manner
(prompt- and instruction-level accuracy), no hub, no NLTK data. Any other name is a task of the
harness itself (on a cluster with the hub: `ifeval`, the nearest public relative of the seed's
LiveBench instruction-following result). Greedy decoding in the model's chat template; every seed
the harness takes is the config's seed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
OURS = ("cascade_probes", "cascade_format")


def _task_dir(probes: list[dict]) -> Path:
    """A copy of data/harness/ whose data files are absolute paths (the harness reads them from the
    cwd)."""
    src = resources.files("cascade.data") / "harness"
    out = Path(tempfile.mkdtemp(prefix="cascade-harness-"))
    for f in src.iterdir():
        if f.name.endswith((".yaml", ".jsonl", ".py")):
            (out / f.name).write_bytes(f.read_bytes())
    with open(out / "cascade_probes.jsonl", "w") as f:
        for p in probes:
            f.write(json.dumps({"prompt": p["messages"][-1]["content"],
                                "reference": p["response"]}) + "\n")
    for name in OURS:
        y = out / f"{name}.yaml"
        y.write_text(y.read_text().replace(f"test: {name}.jsonl", f"test: {out / f'{name}.jsonl'}"))
    return out


def _lm(model: str | None, base_url: str | None, served_name: str | None, api_key: str | None,
        loaded: tuple[Any, Any] | None) -> tuple[Any, dict | None]:
    """lm-eval's model and model_args: the endpoint's, the model in memory, or the model's path."""
    if base_url:
        # the key reaches lm-eval through its environment variable (OPENAI_API_KEY, read when a
        # request is made), never through model_args, which lm-eval logs at INFO and writes into its
        # results
        os.environ.pop("OPENAI_API_KEY", None)
        if api_key:
            os.environ["OPENAI_API_KEY"] = api_key
        return ("local-chat-completions",
                {"base_url": f"{base_url.rstrip('/')}/chat/completions", "model": served_name,
                 "tokenized_requests": False, "max_retries": 1, "num_concurrent": 1})
    if loaded:
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=loaded[0], tokenizer=loaded[1], batch_size=8), None
    import torch

    from cascade.storage import local_model

    return "hf", {"pretrained": local_model(model), "dtype": "float32",
                  "device": "cuda" if torch.cuda.is_available() else "cpu"}


def evaluate(model: str | None, tasks: list[str], limit: int | None, seed: int, probes: list[dict],
             base_url: str | None = None, served_name: str | None = None,
             api_key: str | None = None, loaded: tuple[Any, Any] | None = None) -> dict:
    """{results: {task: {metric: value}}, samples: {task: n}, lm_eval: version, model: what was
    scored}. loaded: the model at `model` already in this process, float32, and its tokenizer
    (the release's reference): lm-eval scores it without loading it again."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if "cascade_probes" in tasks and not probes:
        tasks = [t for t in tasks if t != "cascade_probes"]
    if not tasks:
        return {}
    lm, args = _lm(model, base_url, served_name, api_key, loaded)
    tdir = _task_dir(probes)
    try:
        out = lm_eval.simple_evaluate(
            model=lm, model_args=args, tasks=tasks,
                                      task_manager=TaskManager(include_path=str(tdir)), limit=limit,
            apply_chat_template=True, batch_size=1 if base_url else 8, log_samples=False,
                                      random_seed=seed,
            numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      bootstrap_iters=0)
    finally:
        shutil.rmtree(tdir, ignore_errors=True)
    results = {t: {k.split(",")[0]: v for k,
                   v in r.items() if k not in ("alias", "sample_len") and "_stderr" not in k
                   and isinstance(v, (int, float))} for t, r in out["results"].items()}
    better = {t: {k.split(",")[0]: bool(v) for k, v in r.items()}
              for t, r in out.get("higher_is_better", {}).items()}
    return {"results": results, "samples": {t: n.get("effective", n.get("original")) for t, n in
                                            out.get("n-samples", {}).items()},
            "higher_is_better": better, "lm_eval": lm_eval.__version__,
            "model": base_url or model}


def spec(cfg: Any) -> tuple | None:
    """What the gate's harness criterion needs run (the release's tasks, limit and seed), or None
    when gate.max_harness_drop does not judge them."""
    if cfg.gate.max_harness_drop is None:
        return None
    return list(cfg.release.harness), cfg.release.harness_limit, cfg.seed


def lead(student: dict, teacher: dict) -> float | None:
    """The teacher's largest lead over the student on the metrics both were scored on (a metric
    lower-is-better counted the other way round): negative when the student is ahead on all;
    None when nothing compares."""
    leads = []
    for task, metrics in teacher.get("results", {}).items():
        mine = student.get("results", {}).get(task, {})
        for k, v in metrics.items():
            if k in mine:
                up = teacher.get("higher_is_better", {}).get(task, {}).get(k, True)
                leads.append((v - mine[k]) if up else (mine[k] - v))
    return max(leads) if leads else None


def main(cfg: Any) -> None:
    """`python -m cascade harness <overrides>`: the release's harness tasks through the endpoint
    `cascade serve` runs (cascade/__main__.py composes the config); prints the results as one JSON
    line."""
    from cascade.config import ConfigError
    from cascade.graph import build_graph
    from cascade.scoring import heldout

    if not cfg.release.harness:
        raise ConfigError("release.harness names no task (e.g. release.harness=[cascade_format])")
    p = build_graph(cfg)
    sp = next(s for s in p.stages if s.name == cfg.target)
    s = cfg.serve
    res = evaluate(None, list(cfg.release.harness), cfg.release.harness_limit, cfg.seed,
                   heldout(p.rd, sp), base_url=f"http://{s.host}:{s.port}/v1",
                   served_name=cfg.release.name(cfg.target), api_key=os.environ.get(s.api_key_env))
    print(json.dumps(res, sort_keys=True))


def describe(res: dict[str, Any]) -> str:
    return ", ".join(f"{t} {k} {v:.3f}" for t, r in res.get("results", {}).items() for k,
                     v in r.items())

"""Training: the Ray Train phase loop vs a bare PEFT loop, packing efficiency, and time to resume.

    .venv/bin/python benchmarks/training.py          # ~4 minutes on 2 CPU cores, tiny preset

1. One LoRA phase on the tiny 27b student (the largest tiny model) over the project's prompts and reference
   answers: tokens/s of stages/train.py's worker loop inside a Ray Train job (1 worker) vs a bare PEFT loop on the
   same batches in this process (same packing, order, optimizer); model loading excluded from both.
2. Real (non-pad) token fraction of the same data with packing (cascade.packing.pack) and with padding only, over
   the batches the worker loop draws; the Ray Train run's own count is printed beside it.
3. Resume: `+stage=4b models=tiny` killed -9 after P1's first checkpoint; seconds from the start of the re-run
   to its first new optimizer step.
Prints one JSON object on its last line (ratio_vs_bare_loop, real_token_fraction_packed,
real_token_fraction_padded, resume_s, ...). Goals: ratio >= 0.95, packed fraction >= 0.95.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
ITERS, BATCH, SEQ = 30, 8, 256


def _data(cfg, path: Path) -> None:
    from cascade.prompts import load_prompts

    with path.open("w") as f:
        for src in cfg.data.values():
            for p in load_prompts(src):
                f.write(json.dumps({"messages": p.messages, "response": p.reference}) + "\n")


def _batches(units: list[list[int]], seed: int) -> list[list[list[int]]]:
    """The rows (example indices) of each of ITERS batches, in the worker loop's order (one worker, no accumulation)."""
    from cascade.packing import DataOrder

    order = DataOrder(len(units), seed)
    return [[units[order[step * BATCH + j]] for j in range(BATCH)] for step in range(ITERS)]


def _fraction(lengths: list[int], units: list[list[int]], seed: int) -> float:
    """Real tokens / batch slots over the batches the worker loop draws (each as wide as its widest row)."""
    real = slots = 0
    for rows in _batches(units, seed):
        widths = [sum(lengths[i] for i in row) for row in rows]
        real, slots = real + sum(widths), slots + BATCH * max(widths)
    return real / slots


def _bare_loop(model_path: str, examples: list[dict], units: list[list[int]], seed: int) -> float:
    import torch

    from cascade.config import LoraSpec
    from cascade.modeling import load_model, response_nll, with_lora
    from cascade.packing import collate_packed

    torch.set_num_threads(1)  # as the Ray Train worker (1 CPU)
    torch.manual_seed(seed)
    model = with_lora(load_model(model_path), LoraSpec(r=8, alpha=16, dropout=0.0))
    cfg = model.config
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches, real = _batches(units, seed), 0
    model.train()
    t0 = time.perf_counter()
    for unit_rows in batches:
        rows = [[examples[i] for i in u] for u in unit_rows]
        b = collate_packed(rows, 0, cfg.layer_types, cfg.sliding_window)
        nll, _, n = response_nll(model, b)  # the worker's loss (chunked over the vocabulary)
        (nll / max(1, n)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += b["real_tokens"]
    return real / (time.perf_counter() - t0)


def _resume_s(tmp: Path) -> float:
    run = tmp / "resume"
    args = [sys.executable, "-m", "cascade", "+stage=4b", "models=tiny", f"run_dir={run}",
            "cluster.include_dashboard=false", "curriculum.1.iters=40", "train.save_every=4"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list(run.glob("4b/train/_ckpt/01-*/step-*/meta.json")):
        time.sleep(0.05)
        if proc.poll() is not None:
            raise RuntimeError("run ended before a P1 checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)
    t0 = time.time()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = next(run.glob("4b/train/_ckpt/01-*/resumed.json"))
    return json.loads(marker.read_text())["time"] - t0


def main() -> None:
    from transformers import AutoTokenizer

    from cascade import cluster
    from cascade.chat import encode_example
    from cascade.config import TrainConfig, compose
    from cascade.packing import pack
    from cascade.plan import PhasePlan
    from cascade.rundir import RunDir, Step
    from cascade.tiny import build_preset, preset_dir
    from stages.train import TrainJob, fit

    cfg = compose(["+stage=27b", "models=tiny", "cluster.auth=false", "cluster.include_dashboard=false"])
    build_preset(cfg)
    model_path = str(preset_dir(cfg) / "27b")
    tmp = Path(tempfile.mkdtemp())
    rd = RunDir(str(tmp / "run"))
    data = rd.local("27b", "dataset", "bench", "train.jsonl")  # where the worker reads a phase's dataset
    data.parent.mkdir(parents=True)
    _data(cfg, data)
    tok = AutoTokenizer.from_pretrained(model_path)
    recs = [json.loads(x) for x in data.read_text().splitlines()]
    examples = [encode_example(tok, r["messages"], r["response"], SEQ) for r in recs]
    lengths = [len(e["input_ids"]) for e in examples]
    units, seed = pack(lengths, SEQ), cfg.seed * 1_000  # the phase's seed (phase index 0)
    out: dict = {"real_token_fraction_packed": round(_fraction(lengths, units, seed), 4),
                 "real_token_fraction_padded": round(_fraction(lengths, [[i] for i in range(len(lengths))], seed), 4),
                 "examples": len(lengths), "bins": len(units), "bins_lower_bound": -(-sum(lengths) // SEQ)}

    # 1a. orchestrated: the real worker loop in a Ray Train job, one phase, no mid-phase checkpoint
    train = TrainConfig(batch_size=BATCH, grad_accum=1, max_seq_len=SEQ, save_every=0, bf16=False, max_failures=0)
    train.lora.r, train.lora.alpha, train.lora.dropout = 8, 16, 0.0
    phase = PhasePlan(0, "bench", "bench", ITERS, 1e-3, Step("27b/dataset/bench", "data", rd.dataset("27b", "bench")),
                      Step("27b/train/bench", "bench", rd.model("27b", 0, "bench")))
    cluster.start(cfg.cluster)
    try:
        fit(TrainJob("27b", rd.url, model_path, None, [phase], train, cfg.seed), rd, "bench")
    finally:
        cluster.stop()
    summary = rd.committed(phase.model)["summary"]
    out["orchestrated_tok_s"] = round(summary["tokens_per_s"], 1)
    out["real_token_fraction_in_training"] = round(summary["real_token_fraction"], 4)  # the worker's own count
    # 1b. bare PEFT loop, same batches
    out["bare_tok_s"] = round(_bare_loop(model_path, examples, units, seed), 1)
    out["ratio_vs_bare_loop"] = round(out["orchestrated_tok_s"] / out["bare_tok_s"], 3)
    out["resume_s"] = round(_resume_s(tmp), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

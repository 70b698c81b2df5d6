"""Training: the Ray Train phase loop vs a bare PEFT loop and vs TRL's SFTTrainer, packing
efficiency, resume time.

    .venv/bin/python benchmarks/training.py  # ~8 minutes on 2 CPU cores, tiny preset (--rounds 3)

1. One LoRA phase on the tiny 27b student (the largest tiny model) over the project's prompts and
   reference answers, every trainer on the same threads (the CPUs a worker gets:
   cascade.cluster.worker_cpus), in --rounds rounds (each a fresh model; rounds keep this shared
   machine's slow drifts out of the ratios). Each round runs every kind, one after the other, each
   only once the previous kind's processes are gone; the order of the kinds alternates from round to
   round (even rounds: the Ray part first; odd: the part without Ray first, reversed):
   a. stages/train.py's worker loop inside a Ray Train job (1 worker) on a fresh Ray cluster;
   b. a bare PEFT loop on the same batches in this process (same packing, order, optimizer), with
      the idle Ray cluster still up (bare_ray_up: Ray's daemons share the cores, as they do with the
      Ray Train job), and again with Ray stopped (bare: the reference of the goal);
   c. TRL's SFTTrainer on the same examples as prompt-completion conversations, as its users would
      set it for speed: gradient checkpointing off (TRL 1.16 turns it on by default; no other loop
      here recomputes), completion-only loss, same LoRA, batch, sequence length, steps, learning
      rate and optimizer (AdamW, no warm-up or decay), once packed (best-fit decreasing into
      max_length rows) and once padded; its better setting over the rounds is the peer (trl_best),
      and both settings' effective SFTConfig fields are printed (trl_settings: checkpointing,
      packing, padding_free, batch, length, optimizer, threads). Tokens/s counts real (non-pad)
      tokens over the optimizer steps; model loading is excluded from all (TRL's dataset preparation
      too: its train() call is timed). Each figure is every round's tokens over every round's
      seconds; the per-round figures are printed beside it.
2. Real (non-pad) token fraction of the same data with packing (cascade.packing.pack) and with
   padding only, over the batches the worker loop draws; the Ray Train run's own count is printed
   beside it.
3. Resume: `+stage=4b models=tiny` killed -9 after P1's first checkpoint; seconds from the start of
   the re-run to its first new optimizer step. Peak resident memory (MB) of this process and of each
   kind of process, per part (the largest over the rounds). Prints one JSON object on its last line
   (ratio_vs_bare_loop (+ _rounds, + _ray_up), ratio_vs_trl, real_token_fraction_packed,
   real_token_fraction_padded, resume_s, peak_rss_mb, ...). Goals: ratio_vs_bare_loop >= 0.95,
   ratio_vs_trl >= 1.0, packed fraction >= 0.95.
"""

from __future__ import annotations

import json
import os
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
    """The rows (example indices) of each of ITERS batches, in the worker loop's order (one worker,
    no accumulation)."""
    from cascade.packing import DataOrder

    order = DataOrder(len(units), seed)
    return [[units[order[step * BATCH + j]] for j in range(BATCH)] for step in range(ITERS)]


def _fraction(lengths: list[int], units: list[list[int]], seed: int) -> float:
    """Real tokens / batch slots over the batches the worker loop draws (each as wide as its widest
    row)."""
    real = slots = 0
    for rows in _batches(units, seed):
        widths = [sum(lengths[i] for i in row) for row in rows]
        real, slots = real + sum(widths), slots + BATCH * max(widths)
    return real / slots


def _bare_loop(model_path: str, examples: list[dict], units: list[list[int]], seed: int,
               threads: int) -> tuple[int, float]:
    import torch

    from cascade.config_train import LoraSpec
    from cascade.modeling import load_model, response_nll, with_lora
    from cascade.packing import collate_packed

    torch.set_num_threads(threads)  # as the Ray Train worker
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
    return real, time.perf_counter() - t0


def _trl(model_path: str, data: Path, tmp: Path, seed: int, threads: int,
         packed: bool) -> tuple[int, float, dict]:
    """TRL's SFTTrainer configured as its users would for speed on this data: gradient checkpointing
    off (TRL 1.16's SFTConfig turns it on by default; the other loops run without it), packing
    best-fit decreasing (packed) or padded batches, completion-only loss. Returns real tokens,
    seconds of its optimizer steps, and its effective settings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from cascade.modeling import load_model

    torch.set_num_threads(threads)
    recs = [json.loads(x) for x in data.read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": r["messages"],
                             "completion": [{"role": "assistant", "content": r["response"]}]}
                            for r in recs])
    tok = AutoTokenizer.from_pretrained(model_path)
    args = SFTConfig(output_dir=str(tmp / "trl"), max_steps=ITERS,
                     per_device_train_batch_size=BATCH,
                     gradient_accumulation_steps=1, max_length=SEQ, packing=packed,
                     **({"packing_strategy": "bfd"} if packed else {}),
                     gradient_checkpointing=False,
                     completion_only_loss=True, learning_rate=1e-3, lr_scheduler_type="constant",
                     warmup_steps=0,
                     weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=seed,
                     data_seed=seed,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
                     disable_tqdm=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")

    class Clock(TrainerCallback):  # first to last optimizer step, as the other loops are timed
        t0 = t1 = 0.0

        def on_train_begin(self, *a, **k):
            Clock.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            Clock.t1 = time.perf_counter()

    trainer = SFTTrainer(model=load_model(model_path), args=args, train_dataset=ds,
                         processing_class=tok, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    a = trainer.args
    settings = {"gradient_checkpointing": a.gradient_checkpointing, "packing": a.packing,
                "packing_strategy": a.packing_strategy if a.packing else None,
                "padding_free": a.padding_free,
                "per_device_train_batch_size": a.per_device_train_batch_size,
                "max_length": a.max_length,
                "optim": str(a.optim), "torch_threads": torch.get_num_threads(),
                "steps": trainer.state.global_step}
    return int(trainer.state.num_input_tokens_seen), Clock.t1 - Clock.t0, settings


def _wait_children_gone(timeout: float = 120) -> None:
    """Until every process this one started (Ray's, a trainer's helpers) has exited: the next kind
    measures alone."""
    import psutil

    deadline = time.time() + timeout
    while psutil.Process().children(recursive=True) and time.time() < deadline:
        time.sleep(0.2)


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
    import argparse

    from transformers import AutoTokenizer

    from cascade import cluster
    from cascade.chat import encode_example
    from cascade.peakmem import PeakMemory
    from cascade.config import compose
    from cascade.config_train import TrainConfig
    from cascade.packing import pack
    from cascade.graph import PhaseGraph
    from cascade.rundir import RunDir, Step
    from cascade.tiny import build_preset, preset_dir
    from cascade.trainer import TrainJob
    from stages.train import fit

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    rounds_n = ap.parse_args().rounds
    cfg = compose(["+stage=27b", "models=tiny", "cluster.auth=false",
                   "cluster.include_dashboard=false"])
    build_preset(cfg)
    model_path = str(preset_dir(cfg) / "27b")
    tmp = Path(tempfile.mkdtemp())
    rd = RunDir(str(tmp / "run"))
    # where the worker reads a phase's dataset
    data = rd.local("27b", "dataset", "bench", "train.jsonl")
    data.parent.mkdir(parents=True)
    _data(cfg, data)
    tok = AutoTokenizer.from_pretrained(model_path)
    recs = [json.loads(x) for x in data.read_text().splitlines()]
    examples = [encode_example(tok, r["messages"], r["response"], SEQ) for r in recs]
    lengths = [len(e["input_ids"]) for e in examples]
    units, seed = pack(lengths, SEQ), cfg.seed * 1_000  # the phase's seed (phase index 0)
    out: dict = {
        "real_token_fraction_packed": round(_fraction(lengths, units, seed), 4),
        "real_token_fraction_padded": round(_fraction(lengths, [[i] for i in range(len(lengths))],
                                                      seed), 4),
        "examples": len(lengths),
        "bins": len(units),
        "bins_lower_bound": -(-sum(lengths) // SEQ),
    }

    # 1. paired rounds, each: (a) orchestrated: the real worker loop in a Ray Train job, one phase,
    #    no mid-phase checkpoint; the bare loop on the same batches (b) in this process with the
    #    idle Ray cluster still up, (b') after Ray has stopped
    train = TrainConfig(batch_size=BATCH, grad_accum=1, max_seq_len=SEQ, save_every=0, bf16=False,
                        max_failures=0)
    train.lora.r, train.lora.alpha, train.lora.dropout = 8, 16, 0.0
    rounds: dict[str, list[tuple[int, float]]] = {"orchestrated": [], "bare_ray_up": [], "bare": []}
    peaks: dict[str, dict] = {}

    def peak_of(name: str, mb: dict) -> None:  # the largest over the rounds, per kind of process
        peaks[name] = {k: max(v, peaks.get(name, {}).get(k, 0.0)) for k, v in mb.items()}

    dataset = Step("27b/dataset/bench", "data", rd.dataset("27b", "bench"))
    rounds.update(trl_packed=[], trl_padded=[])
    trl_settings: dict[str, dict] = {}

    def with_ray(r: int) -> None:
        # (a) the Ray Train job, then (b) the bare loop with the idle cluster still up
        nonlocal summary
        name = f"bench{r}"  # a fresh model per round: nothing committed is reused
        phase = PhaseGraph(0, "bench", "bench", ITERS, 1e-3, dataset,
                           Step(f"27b/train/{name}", name,
                                                                          rd.model("27b", 0, name)))
        cluster.start(cfg.cluster)
        try:
            train.cpus_per_worker = cluster.worker_cpus(1)  # as the cascade gives a lone worker
            assert train.cpus_per_worker == threads, (train.cpus_per_worker, threads)
            with PeakMemory() as peak:
                fit(TrainJob("27b", rd.url, model_path, None, [phase], train, cfg.seed), rd, name)
            peak_of("ray_train", peak.megabytes())
            summary = rd.committed(phase.model)["summary"]
            rounds["orchestrated"].append((summary["tokens"], summary["train_seconds"]))
            with PeakMemory() as peak:
                rounds["bare_ray_up"].append(_bare_loop(model_path, examples, units, seed, threads))
            peak_of("bare_loop_ray_up", peak.megabytes())
        finally:
            cluster.stop()
            _wait_children_gone()

    def without_ray(r: int) -> None:
        # (b') the bare loop, (c) TRL packed and padded; their order alternates too
        kinds = ["bare", "trl_packed", "trl_padded"]
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            with PeakMemory() as peak:
                if kind == "bare":
                    rounds["bare"].append(_bare_loop(model_path, examples, units, seed, threads))
                else:
                    tokens, seconds, trl_settings[kind] = _trl(
                        model_path,
                        data,
                        tmp / f"{kind}{r}",
                        cfg.seed,
                        threads,
                        packed=kind == "trl_packed",
                    )
                    rounds[kind].append((tokens, seconds))
            peak_of(kind if kind != "bare" else "bare_loop", peak.megabytes())
            _wait_children_gone()

    summary: dict = {}
    # the threads a lone worker gets on this one-node cluster (cluster.worker_cpus, which needs Ray
    # up), known before a round that starts without Ray
    threads = cluster.share_cpus([cfg.cluster.num_cpus or os.cpu_count() or 1], 1)
    for r in range(rounds_n):  # the order of the kinds alternates across rounds
        for part in ((with_ray, without_ray) if r % 2 == 0 else (without_ray, with_ray)):
            part(r)
    out["threads"], out["rounds"] = threads, rounds_n
    # the worker's own count
    out["real_token_fraction_in_training"] = round(summary["real_token_fraction"], 4)

    def rate(key: str) -> float:  # every round's tokens over every round's seconds
        return sum(n for n, _ in rounds[key]) / sum(t for _, t in rounds[key])

    for key in rounds:
        out[f"{key}_tok_s"] = round(rate(key), 1)
        out[f"{key}_tok_s_rounds"] = [round(n / t, 1) for n, t in rounds[key]]
    best = max(("trl_packed", "trl_padded"), key=rate)  # TRL's best setting on this data
    out["trl_best"], out["trl_tok_s"], out["trl_settings"] = (
        best,
        out[f"{best}_tok_s"],
        trl_settings,
    )
    out["ratio_vs_bare_loop"] = round(rate("orchestrated") / rate("bare"), 3)
    out["ratio_vs_bare_loop_rounds"] = [round(no / to / (nb / tb), 3)
                                        for (no, to),
                                        (nb, tb) in zip(rounds["orchestrated"], rounds["bare"])]
    out["ratio_vs_bare_loop_ray_up"] = round(rate("orchestrated") / rate("bare_ray_up"), 3)
    out["ratio_vs_trl"] = round(out["orchestrated_tok_s"] / out["trl_tok_s"], 3)
    with PeakMemory() as peak:
        out["resume_s"] = round(_resume_s(tmp), 1)
    peaks["resume_cli"] = peak.megabytes()
    out["peak_rss_mb"] = peaks
    print(json.dumps(out))


if __name__ == "__main__":
    main()

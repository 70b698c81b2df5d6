"""Divergences between the student's next-token distribution and a teacher's stored top-k, for the
kinds that compare distributions (issue 28's on-policy kind; `distill` uses the cross-entropy in
cascade/modeling.py).

A teacher's log-probabilities come as its top-k per position (vLLM's `prompt_logprobs`, or an hf
forward), so the two distributions are compared on k + 1 outcomes: the teacher's k tokens and "any
other token" (the tail, holding the rest of each model's mass). That coarsening is exact arithmetic
on both sides, never above the full-vocabulary divergence (a coarser partition cannot separate
distributions more), and it keeps the gradient that moves the student's mass out of the tail into
the teacher's tokens.

Gemma 3 1B's embedding has 262,144 rows, 4B/12B/27B 262,208 over the same tokenizer: rows from
`vocab` on are padding, never a token, and are dropped from the student's softmax before anything is
compared.

The generalized Jensen-Shannon divergence follows TRL's GKD convention: with m = beta * p_T + (1 -
beta) * p_S, JSD_beta = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m), and the ends taken as TRL
takes them: beta = 0 is the forward KL(p_T || p_S), beta = 1 the reverse KL(p_S || p_T) (JSD_beta
itself vanishes at both ends; JSD_beta / beta tends to the forward KL and JSD_beta / (1 - beta) to
the reverse one).
"""

from __future__ import annotations

import math
from typing import Any


def top_k_outcomes(student_logits: Any, teacher_ids: Any, teacher_logprobs: Any,
                   vocab: int) -> tuple[Any, Any]:
    """Log-probabilities of the k + 1 outcomes (the teacher's k tokens, then the tail) under the
    student and the teacher: two [..., k + 1] tensors. student_logits [..., V] with V >= vocab;
    teacher_ids/logprobs [..., k]."""
    import torch

    if student_logits.shape[-1] < vocab:
        raise ValueError(f"the student's logits have {student_logits.shape[-1]} rows, fewer than "
                         f"the shared vocabulary's {vocab}")
    if bool((teacher_ids >= vocab).any()) or bool((teacher_ids < 0).any()):
        raise ValueError(f"a teacher token id outside the shared vocabulary [0, {vocab})")
    s_all = torch.log_softmax(student_logits[..., :vocab].float(), dim=-1)
    s_top = s_all.gather(-1, teacher_ids.long())
    t_top = teacher_logprobs.float()
    return _with_tail(s_top), _with_tail(t_top)


def _with_tail(top: Any) -> Any:
    """[..., k] log-probabilities -> [..., k + 1] with log(1 - sum p) last (clamped: rounding can
    push the sum of a peaked top-k a hair over 1)."""
    import torch

    mass = torch.logsumexp(top, dim=-1, keepdim=True).clamp(max=0.0)
    tail = torch.log1p(-mass.exp().clamp(max=1.0 - 1e-7))
    return torch.cat([top, tail], dim=-1)


def generalized_jsd(log_s: Any, log_t: Any, beta: float) -> Any:
    """JSD_beta between two distributions given as log-probabilities over the same outcomes ([...,
    n]), summed over the last axis: one value per position. beta in [0, 1] (0: KL(t || s), 1: KL(s
    || t))."""
    import torch

    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be within [0, 1], not {beta}")

    def kl(log_p: Any, log_q: Any) -> Any:  # KL(p || q); an outcome p gives no mass to adds nothing
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)

    if beta == 0.0:
        return kl(log_t, log_s)
    if beta == 1.0:
        return kl(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]),
                            dim=0)
    return beta * kl(log_t, log_m) + (1.0 - beta) * kl(log_s, log_m)


# -- the evaluation's measure: reverse KL(student || teacher) on the student's own answers ---------
# the student's top-k at each answer token: the outcomes its reverse KL is taken over (+ the tail)
EVAL_TOP_K = 32


def answer_top_k(model: Any, tok: Any, prompts: list[list[int]], answers: list[list[int]],
                 k: int = EVAL_TOP_K) -> list[dict]:
    """For each (prompt ids, answer ids): the model's top-k token ids and log-probabilities
    (temperature 1, over the shared vocabulary len(tok)) at every answer token: [{"ids": [[k]...],
    "lp": [[k]...]}] (empty answers: [])."""
    import torch

    out = []
    with torch.no_grad():
        for p, a in zip(prompts, answers, strict=True):
            if not a:
                out.append({"ids": [], "lp": []})
                continue
            top = position_top_k(model, p + a, len(p), k, len(tok))
            out.append({"ids": top.indices.tolist(), "lp": top.values.tolist()})
    return out


def position_top_k(model: Any, seq: list[int], start: int, k: int, vocab: int) -> Any:
    """The model's top k (`.indices`, `.values`: log-probabilities at temperature 1 over the first
    `vocab` rows, the shared vocabulary) for each token seq[start:] given the tokens before it, by
    one forward (called under torch.no_grad())."""
    import torch

    logits = model(input_ids=torch.tensor([seq], device=model.device)).logits[0, start - 1 : -1]
    return torch.log_softmax(logits[:, :vocab].float(), dim=-1).topk(min(k, vocab), dim=-1)


def reverse_kl(teacher: Any, tok: Any, prompts: list[list[int]], answers: list[list[int]],
               student: list[dict]) -> tuple[float, int]:
    """(sum over answer tokens of KL(student || teacher), tokens): the teacher reads each answer
    after its own prompt (`prompts`: with its context); both distributions compared on the student's
    top-k and the tail."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for p, a, s in zip(prompts, answers, student, strict=True):
            if not a:
                continue
            x = torch.tensor([p + a], device=teacher.device)
            logits = teacher(input_ids=x).logits[0, len(p) - 1 : -1]
            log_t, log_s = top_k_outcomes(logits, torch.tensor(s["ids"], device=x.device),
                                          torch.tensor(s["lp"], device=x.device), len(tok))
            total += float(generalized_jsd(log_s, log_t, 1.0).sum())
            n += len(a)
    return total, n

"""The divergences the distribution-comparing kinds train and measure with (cascade/divergence.py):
TRL's beta convention, the top-k + tail coarsening, and Gemma's padded vocabulary rows ignored."""

from __future__ import annotations

import pytest
import torch

from cascade.divergence import generalized_jsd, top_k_outcomes


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def test_beta_ends_are_forward_and_reverse_kl_and_the_middle_is_jsd():
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(5, 7, generator=g).log_softmax(-1),
            torch.randn(5, 7, generator=g).log_softmax(-1))
    # forward KL(T || S)
    assert torch.allclose(generalized_jsd(s, t, 0.0), _kl(t.exp(), s.exp()), atol=1e-6)
    # reverse KL(S || T)
    assert torch.allclose(generalized_jsd(s, t, 1.0), _kl(s.exp(), t.exp()), atol=1e-6)
    m = 0.5 * (s.exp() + t.exp())
    assert torch.allclose(generalized_jsd(s, t, 0.5), 0.5 * _kl(t.exp(), m) + 0.5 * _kl(s.exp(), m),
                          atol=1e-6)
    # the ends are the scaled limits (TRL's convention), and a distribution is at 0 from itself at
    # every beta
    eps = 1e-4
    assert torch.allclose(generalized_jsd(s, t, eps) / eps, generalized_jsd(s, t, 0.0), rtol=1e-2,
                          atol=1e-3)
    assert torch.allclose(generalized_jsd(s, t, 1 - eps) / eps, generalized_jsd(s, t, 1.0),
                          rtol=1e-2, atol=1e-3)
    for beta in (0.0, 0.3, 1.0):
        assert generalized_jsd(s, s, beta).abs().max() < 1e-6
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, 1.5)


def test_top_k_with_tail_is_exact_when_k_covers_the_vocabulary_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(1)
    vocab = 16
    student, teacher = torch.randn(3, vocab, generator=g), torch.randn(3, vocab, generator=g)
    t_log = teacher.log_softmax(-1)
    full = generalized_jsd(student.log_softmax(-1), t_log, 1.0)
    ids = torch.arange(vocab).expand(3, vocab)
    s, t = top_k_outcomes(student, ids, t_log, vocab)
    assert torch.allclose(generalized_jsd(s, t, 1.0), full, atol=1e-5)  # k = V: the tail is empty
    top = t_log.topk(4, dim=-1)
    s, t = top_k_outcomes(student, top.indices, top.values, vocab)
    assert s.shape == (3, 5) and torch.allclose(s.exp().sum(-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(t.exp().sum(-1), torch.ones(3), atol=1e-5)
    assert (generalized_jsd(s, t, 1.0) <= full + 1e-6).all()  # coarser outcomes never separate more


def test_padded_rows_past_the_shared_vocabulary_are_ignored():
    """Two students whose logits differ only in padded rows (Gemma 3 1B: 262,144 rows; 4B+: 262,208)
    give the same outcomes; a teacher id past the shared vocabulary, or a student with fewer rows,
    is refused."""
    g = torch.Generator().manual_seed(2)
    vocab, pad = 12, 4
    logits = torch.randn(2, vocab, generator=g)
    # large padded logits would dominate
    padded = torch.cat([logits, torch.full((2, pad), 30.0)], dim=-1)
    top = torch.randn(2, vocab, generator=g).log_softmax(-1).topk(3, dim=-1)
    a = top_k_outcomes(logits, top.indices, top.values, vocab)
    b = top_k_outcomes(padded, top.indices, top.values, vocab)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="outside the shared vocabulary"):
        top_k_outcomes(padded, top.indices + vocab, top.values, vocab)
    with pytest.raises(ValueError, match="fewer than"):
        top_k_outcomes(logits[:, :8], top.indices.clamp(max=7), top.values, vocab)


def test_the_gradient_reaches_the_student_only_and_moves_it_toward_the_teacher():
    g = torch.Generator().manual_seed(3)
    vocab = 10
    logits = torch.randn(4, vocab, generator=g, requires_grad=True)
    teacher = (torch.randn(4, vocab, generator=g) * 3).log_softmax(-1)
    top = teacher.topk(3, dim=-1)
    opt = torch.optim.SGD([logits], lr=0.5)
    first = None
    for _ in range(50):
        s, t = top_k_outcomes(logits, top.indices, top.values, vocab)
        loss = generalized_jsd(s, t, 1.0).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first, (first, loss.item())


def test_two_tiny_models_differing_only_in_padding_are_at_zero_divergence(tmp_path):
    """Gemma 3 1B (262,144 rows) and 4B (262,208, the same tokenizer), in small: the tiny 1b model,
    and a copy of it whose embedding (tied to its output) carries 64 rows more, each a copy of a
    real token's row so that, were the rows not dropped, they would take that token's mass. Loaded
    from disk, the padded copy is the same tokenizer (vocab_hash), never samples a padded id, and
    both the evaluation's reverse KL and on_policy's training divergence find it at 0 from the
    original; with the padded rows kept in the softmax the same comparison is far from 0."""
    from transformers import AutoTokenizer

    from cascade.chat import padded_ids, prompt_ids, vocab_hash
    from cascade.config import compose
    from cascade.divergence import answer_top_k, reverse_kl
    from cascade.modeling import load_model
    from cascade.tiny import preset_dir
    from cascade.scoring import answers_to

    teacher_dir = preset_dir(compose(["+stage=4b", "models=tiny"])) / "1b"
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = load_model(teacher_dir).eval()
    padded = load_model(teacher_dir)
    n = padded.get_input_embeddings().weight.shape[0]
    assert n == len(tok) and padded_ids(teacher, tok) is None
    padded.resize_token_embeddings(n + 64, mean_resizing=False)
    with torch.no_grad():
        emb = padded.get_input_embeddings().weight
        emb[n:] = emb[torch.arange(64) * 7 % n]
    padded.save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    student = load_model(tmp_path / "padded").eval()
    s_tok = AutoTokenizer.from_pretrained(tmp_path / "padded")
    assert student.get_output_embeddings().weight.shape[0] == n + 64
    assert vocab_hash(s_tok) == vocab_hash(tok)
    assert padded_ids(student, s_tok) == list(range(n, n + 64))

    records = [{"messages": [{"role": "user", "content": q}]}
               for q in ("What is kindness?", "Is it ever right to lie?", "Why keep a promise?")]
    answers = answers_to(student, s_tok, records, 24, 3, "cpu", sample=True, seed=0)
    assert all(t < n for a in answers for t in a), "a padded row was sampled"
    prompts = [prompt_ids(tok, r["messages"]) for r in records]
    total, count = reverse_kl(teacher, tok, prompts, answers, answer_top_k(student, s_tok, prompts,
                                                                            answers))
    assert count > 0 and total / count < 1e-5, total / count

    # on_policy's divergence: the student's logits over its padded rows, the teacher's top-k
    x = torch.tensor([prompts[0] + answers[0]])
    with torch.no_grad():
        s_logits = student(input_ids=x).logits[0, len(prompts[0]) - 1 : -1]
        t_top = teacher(input_ids=x).logits[0, len(prompts[0]) - 1 : -1].log_softmax(-1).topk(20)
    log_s, log_t = top_k_outcomes(s_logits, t_top.indices, t_top.values, len(tok))
    assert generalized_jsd(log_s, log_t, 1.0).abs().max() < 1e-5
    log_s, log_t = top_k_outcomes(s_logits, t_top.indices, t_top.values, n + 64)  # rows kept
    # at least ten times the bound above (0.0007 on the tiny preset built 2026-12-04, 1e-3 and more
    # before: how much mass the copied rows take depends on the preset's pretraining)
    assert generalized_jsd(log_s, log_t, 1.0).mean() > 1e-4


def test_more_samples_per_prompt_in_the_evaluations_reverse_kl():
    """eval.samples=3: the sampled answers are three seeded rounds over the records (the first the
    one-sample run's), each with its top-k, and the teachers read them all."""
    from transformers import AutoTokenizer

    from cascade.config import compose
    from cascade.modeling import load_model
    from cascade.scoring import score_model
    from cascade.tiny import preset_dir
    from cascade.scoring import teacher_divergence

    d = preset_dir(compose(["+stage=4b", "models=tiny"]))
    tok, model = AutoTokenizer.from_pretrained(d / "4b"), load_model(d / "4b").eval()
    records = [{"messages": [{"role": "user", "content": q}], "response": "Be kind."}
               for q in ("What is kindness?", "Is it ever right to lie?")]
    kw = dict(max_len=128, batch_size=2, answer_tokens=12, seed=5, divergence=True)
    one, three = score_model(model, tok, records, **kw), score_model(model, tok, records,
                                                                     **kw, samples=3)
    assert len(three["answers"]["sampled"]) == 6 and len(three["top"]["sampled"]) == 6
    assert three["answers"]["sampled"][:2] == one["answers"]["sampled"]
    assert three["answers"]["sampled"][2:4] != three["answers"]["sampled"][:2]
    assert three["answers"]["greedy"] == one["answers"]["greedy"]
    kl = teacher_divergence([(str(d / "1b"), None, 1.0, None)], records, [one, three], False)
    assert kl["greedy"]["before"] == pytest.approx(kl["greedy"]["after"])
    assert kl["sampled"]["after"] > 0

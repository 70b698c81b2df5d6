"""Packing: minimum-slack bins; a packed row computes exactly what its examples compute alone."""

from __future__ import annotations

import torch

from cascade.chat import collate, encode_example
from cascade.packing import collate_packed, pack
from cascade.config import compose


def test_pack_fills_bins():
    lengths = [70, 60, 50, 40, 30, 20, 10, 10, 5]
    bins = pack(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 3  # 295 tokens: the minimum number of 100-token bins


def test_pack_closes_bins_best_fit_decreasing_leaves_open():
    # best-fit decreasing: 4+4 | 3+3+3 | 3 (three bins); two bins of exactly 10 exist
    assert sorted(sorted(b) for b in pack([4, 4, 3, 3, 3, 3], 10)) == [[0, 2, 3], [1, 4, 5]]
    # an example longer than a bin (truncated upstream) takes a bin alone; chunks keep every example
    # once
    lengths = [300] + [37, 61, 90, 12, 55, 8] * 20
    bins = pack(lengths, 100, chunk=25)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert [0] in bins and all(sum(lengths[i] for i in b) <= 100 for b in bins if b != [0])


def test_packed_loss_equals_unpacked_loss():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cascade.tiny import build_preset, preset_dir

    cfg = compose(["+stage=4b", "models=tiny"])
    build_preset(cfg)
    path = preset_dir(cfg) / "4b"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    # answers long enough that the packed row is wider than the sliding window (64)
    qa = [("What is kindness?",
           "Kindness is how the harshness softens, one small act after another. " * 2),
          ("Who am I?", "Less a thing than a happening, like a wave on the sea."),
          ("Why be patient?", "Nature is never in a hurry, yet everything is done. " * 3)]
    ex = [encode_example(tok, [{"role": "user", "content": q}], a, 256) for q, a in qa]
    assert sum(len(e["input_ids"]) for e in ex) > 2 * model.config.sliding_window
    ids, labels, mask = collate(ex, tok.pad_token_id)
    with torch.no_grad():
        unpacked = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        batch = collate_packed([ex], tok.pad_token_id, model.config.layer_types,
                               model.config.sliding_window)
        packed = model(**{k: batch[k]
                          for k in ("input_ids", "labels", "position_ids", "attention_mask")}).loss
        # and without the block mask, examples would leak into each other: the test can fail
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"],
                      position_ids=batch["position_ids"]).loss
    assert abs(packed.item() - unpacked.item()) < 1e-5, (packed.item(), unpacked.item())
    assert abs(leaky.item() - unpacked.item()) > 1e-3
    assert batch["real_tokens"] == batch["slots"]  # one row, no padding


def test_distill_sum_is_cross_entropy_against_the_teachers_top_k():
    """The distillation term of cascade.modeling.response_nll's chunks (an identity output layer:
    the hidden states are the logits); where its positions come from is tested in test_fuse.py."""
    from cascade.modeling import _chunk_sums

    torch.manual_seed(0)
    vocab, k = 11, 3
    logits = torch.randn(6, vocab, requires_grad=True)
    kd_ids = torch.randint(0, vocab, (6, k))
    # top-k log-probs of a larger distribution
    kd_lp = torch.log_softmax(torch.randn(6, k), -1) - 0.5
    y = torch.randint(0, vocab, (6,))
    ce, kd = _chunk_sums(logits, y, torch.eye(vocab), None, kd_ids, torch.softmax(kd_lp, -1))
    terms = [-(torch.softmax(kd_lp[t], -1) * torch.log_softmax(logits[t], -1)[kd_ids[t]]).sum()
             for t in range(6)]
    assert torch.allclose(kd, torch.stack(terms).sum())
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    # a student that puts exactly the teacher's renormalised mass on its top k reaches the minimum:
    # the entropy
    lp = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    student = torch.full((2, vocab), -1e9)
    student[:, 1:4] = lp
    entropy = -(torch.tensor([0.5, 0.3, 0.2]) * lp).sum()
    _, kd = _chunk_sums(student, torch.tensor([1, 1]), torch.eye(vocab), None,
                        torch.tensor([[1, 2, 3]] * 2), torch.softmax(lp, -1).expand(2, 3))
    assert torch.allclose(kd, 2 * entropy, atol=1e-5)

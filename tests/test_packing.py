"""Packing: best-fit decreasing bins; a packed row computes exactly what its examples compute alone."""

from __future__ import annotations

import torch

from cascade.chat import collate, encode_example
from cascade.packing import best_fit_decreasing, collate_packed
from conftest import compose


def test_best_fit_decreasing_fills_bins():
    lengths = [70, 60, 50, 40, 30, 20, 10, 10, 5]
    bins = best_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 3  # 295 tokens: the minimum number of 100-token bins


def test_packed_loss_equals_unpacked_loss():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cascade.tiny import build_preset, preset_dir

    cfg = compose(["+stage=4b", "models=tiny"])
    build_preset(cfg)
    path = preset_dir(cfg) / "4b"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    # answers long enough that the packed row is wider than the sliding window (64)
    qa = [("What is kindness?", "Kindness is how the harshness softens, one small act after another. " * 2),
          ("Who am I?", "Less a thing than a happening, like a wave on the sea."),
          ("Why be patient?", "Nature is never in a hurry, yet everything is done. " * 3)]
    ex = [encode_example(tok, [{"role": "user", "content": q}], a, 256) for q, a in qa]
    assert sum(len(e["input_ids"]) for e in ex) > 2 * model.config.sliding_window
    ids, labels, mask = collate(ex, tok.pad_token_id)
    with torch.no_grad():
        unpacked = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        batch = collate_packed([ex], tok.pad_token_id, model.config.layer_types, model.config.sliding_window)
        packed = model(**{k: batch[k] for k in ("input_ids", "labels", "position_ids", "attention_mask")}).loss
        # and without the block mask, examples would leak into each other: the test can fail
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]).loss
    assert abs(packed.item() - unpacked.item()) < 1e-5, (packed.item(), unpacked.item())
    assert abs(leaky.item() - unpacked.item()) > 1e-3
    assert batch["real_tokens"] == batch["slots"]  # one row, no padding

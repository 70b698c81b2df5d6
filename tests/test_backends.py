"""Generation backends: top-k log-probabilities (stored compactly per shard), n samples, seeded
batches."""

from __future__ import annotations

import io

import numpy as np

from cascade.config import compose


def test_hf_backend_topk_logprobs_pack_into_npz():
    from cascade.generation.hf_backend import HFBackend
    from cascade.generation.types import Request, Sampling
    from cascade.logprobs import pack
    from cascade.tiny import build_preset, preset_dir

    cfg = compose(["+stage=4b", "models=tiny"])
    build_preset(cfg)
    hf = HFBackend(str(preset_dir(cfg) / "1b"), 4, "float32", None, False)
    reqs = [Request(f"p{i}", [{"role": "user", "content": q}], seed=i)
            for i, q in enumerate(["What is kindness?", "Why be patient?", "Who am I?"])]
    out = hf.generate(reqs, Sampling(24, 0.7, 0.95, n=1, logprobs=5), None)
    recs = [dict(c.__dict__) for c in out]
    for c in out:
        assert len(c.top_ids) == len(c.top_logprobs) == c.completion_tokens
        assert all(len(row) == 5 for row in c.top_ids)
        # sorted, best first
        assert all(a >= b for row in c.top_logprobs for a, b in zip(row, row[1:]))
        assert all(v <= 0 for row in c.top_logprobs for v in row)
    blob = pack(recs, 0)
    z = np.load(io.BytesIO(blob))
    assert z["token_ids"].dtype == np.int32 and z["logprobs"].dtype == np.float16
    assert z["token_ids"].shape == (sum(c.completion_tokens for c in out), 5)
    r = recs[1]
    assert "top_ids" not in r and r["logprobs"]["length"] == out[1].completion_tokens
    sl = slice(r["logprobs"]["offset"], r["logprobs"]["offset"] + r["logprobs"]["length"])
    assert z["token_ids"][sl].tolist() == out[1].top_ids
    # what the teacher sampled, its stop token included
    assert z["sampled"][sl].tolist() == out[1].token_ids
    assert hf.tok.decode(out[1].token_ids, skip_special_tokens=True) == out[1].text


def test_hf_backend_n_samples_and_seeded_batches():
    from cascade.generation.hf_backend import HFBackend
    from cascade.generation.types import Request, Sampling
    from cascade.tiny import build_preset, preset_dir

    cfg = compose(["+stage=4b", "models=tiny"])
    build_preset(cfg)  # once per machine; tests run in any order, two at a time
    hf = HFBackend(str(preset_dir(cfg) / "1b"), 4, "float32", None, False)
    reqs = [Request(f"p{i}", [{"role": "user", "content": q}], seed=7)
            for i, q in enumerate(["What is kindness?", "Why be patient?"])]
    a = hf.generate(reqs, Sampling(24, 0.9, 0.95, n=3), None)
    assert [(c.prompt_id, c.sample) for c in a] == [(p, s) for p in ("p0", "p1") for s in range(3)]
    b = hf.generate(reqs, Sampling(24, 0.9, 0.95, n=3), None)
    assert [c.text for c in a] == [c.text for c in b]  # same seed, same shard: same answers
    assert all(c.finish_reason in ("stop", "length") and c.completion_tokens > 0 for c in a)

"""Fusion: the saved, merged Gemma3 equals base + adapter; a corrupted merge is caught; loss masks
prompts."""

from __future__ import annotations

import pytest
import torch

from cascade.chat import IGNORE_INDEX, encode_example
from cascade.config import compose


@pytest.fixture(scope="module")
def base():
    from transformers import AutoTokenizer

    from cascade.tiny import build_preset, preset_dir

    cfg = compose(["+stage=4b", "models=tiny"])
    build_preset(cfg)
    path = preset_dir(cfg) / "4b"
    tok = AutoTokenizer.from_pretrained(path)
    examples = [encode_example(tok, [{"role": "user", "content": q}], a, 128)
                for q,
                a in [("What is kindness?", "Kindness softens the world."),
                      ("Who am I?", "A wave.")]]
    return path, tok, examples


def _peft(path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():  # a trained-looking adapter: B is zero at init
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return model


def test_fused_model_equals_base_plus_adapter(base, tmp_path):
    from transformers import AutoModelForCausalLM

    from cascade.modeling import fuse, logits

    path, tok, examples = base
    model = _peft(path)
    with_adapter = logits(model.eval(), examples)
    figures = fuse(model, tok, examples, tmp_path / "fused")
    assert figures["rel_logit_diff"] < 1e-5 and figures["top1_agreement"] == 1.0, figures
    names = {p.name for p in (tmp_path / "fused").iterdir()}
    assert "model.safetensors" in names and not any(n.startswith("adapter") for n in names)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    assert reloaded.config.tie_word_embeddings  # Gemma3 ties the output layer to the embeddings
    plain = logits(AutoModelForCausalLM.from_pretrained(path).eval(), examples)
    # the adapter mattered, so equality above means something
    assert max(float((a - b).abs().max()) for a, b in zip(with_adapter, plain)) > 1e-2


def test_corrupted_merge_is_caught(base, tmp_path):
    from safetensors.torch import load_file, save_file

    from cascade.modeling import FusionError, check, fuse, logits, tolerance

    path, tok, examples = base
    model = _peft(path)
    reference = logits(model.eval(), examples)
    out = tmp_path / "fused"
    fuse(model, tok, examples, out)
    w = load_file(out / "model.safetensors")
    key = next(k for k in w if "layers.0.mlp.down_proj.weight" in k)
    # a merge that added one adapter's delta twice; not a uniform scale, which Gemma3's post-MLP
    # norm would undo
    w[key] = w[key] + 0.02 * torch.randn(w[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(w, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FusionError, match="differs from base \\+ adapter"):
        check(reference, out, examples, tolerance(torch.float32))


def test_loss_masks_prompt_tokens(base):
    _, tok, _ = base
    msgs = [{"role": "user", "content": "Why be kind?"}]
    ex = encode_example(tok, msgs, "Because it helps.", 128)
    prompt = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    assert ex["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = ex["labels"][len(prompt):]
    assert IGNORE_INDEX not in answer and answer[-1] == tok.convert_tokens_to_ids("<end_of_turn>")
    assert tok.decode(answer, skip_special_tokens=True) == "Because it helps."


def test_chunked_response_loss_equals_the_full_vocabulary_loss(base):
    """cascade.modeling.response_nll (the output layer applied a few positions at a time, each chunk
    recomputed in the backward pass) gives transformers' own loss and the same gradients; its
    distillation sum is the cross-entropy against the renormalised top-k distribution computed from
    full logits."""
    from cascade.chat import collate
    from cascade.modeling import response_nll

    path, tok, examples = base
    model = _peft(path).train()
    ids, labels, mask = collate(examples, tok.pad_token_id)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    g = torch.Generator().manual_seed(0)
    kd_ids = torch.randint(0, len(tok), (*ids.shape, 4), generator=g)
    kd_lp = torch.randn(*ids.shape, 4, generator=g)
    ce, kd, n = response_nll(model, {"input_ids": ids, "attention_mask": mask, "labels": labels,
                                     "kd_ids": kd_ids, "kd_lp": kd_lp}, chunk=5)
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum()) and n > 5
    assert torch.allclose(ce / n, ref, rtol=1e-5, atol=1e-6), (float(ce / n), float(ref))
    (ce / n).backward()
    for name, grad in ref_grads.items():
        got = dict(model.named_parameters())[name].grad
        # float32 sums in another order: elementwise to 1e-4, near-zero ones to 1e-5 of the
        # gradient's scale
        assert torch.allclose(got, grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max())), name
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(),
                                 -1)
        keep = labels[:, 1:] != IGNORE_INDEX
        want = -(torch.softmax(kd_lp[:, 1:], -1) * logp.gather(-1, kd_ids[:, 1:]))[keep].sum()
    assert torch.allclose(kd, want, rtol=1e-5), (float(kd), float(want))


def test_per_row_response_loss_is_each_examples_own(base):
    """cascade.modeling.response_nll_rows (the evaluation's per-record log-likelihoods, one pass
    for a batch) gives each example what response_nll gives it alone, padding and all."""
    from cascade.chat import collate
    from cascade.modeling import response_nll, response_nll_rows

    path, tok, examples = base
    model = _peft(path).eval()
    ids, labels, mask = collate(examples, tok.pad_token_id)
    sums, counts = response_nll_rows(model, {"input_ids": ids, "attention_mask": mask,
                                             "labels": labels}, chunk=5)
    assert len(sums) == len(examples) > 1
    for ex, got, n in zip(examples, sums, counts, strict=True):
        one_ids, one_labels, one_mask = collate([ex], tok.pad_token_id)
        with torch.no_grad():
            want, _, m = response_nll(model, {"input_ids": one_ids, "attention_mask": one_mask,
                                              "labels": one_labels})
        assert n == m > 0 and abs(got - float(want)) <= 1e-5 * float(want), (got, float(want))

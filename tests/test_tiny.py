"""The tiny preset: Gemma3 architecture, growing sizes, small vocabulary, the same bytes from the
same seed."""

from __future__ import annotations

import hashlib
import json

from cascade.config import compose


def _small(tmp, seed=1234):
    cfg = compose(["+stage=27b", "models=tiny", f"models.cache_dir={tmp}", f"seed={seed}"])
    for spec in cfg.models.tiny.sizes.values():
        spec.pretrain_steps = 3  # the build procedure, not its quality
    return cfg


def _digest(d):
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.suffix in (".safetensors", ".json")}


def test_build_is_deterministic_and_gemma3_shaped(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from cascade.tiny import build_preset

    a = build_preset(_small(tmp_path / "a"))
    b = build_preset(_small(tmp_path / "b"))
    assert a.name == b.name and _digest(a) == _digest(b)
    c = build_preset(_small(tmp_path / "c", seed=7))
    assert _digest(c)["1b/model.safetensors"] != _digest(a)["1b/model.safetensors"]

    params = json.loads((a / "preset.json").read_text())["models"]
    sizes = [params[s]["params"] for s in ("1b", "4b", "12b", "27b")]
    assert sizes == sorted(set(sizes))
    for s in ("1b", "4b", "12b", "27b"):
        cfg = AutoConfig.from_pretrained(a / s)
        assert cfg.architectures == ["Gemma3ForCausalLM"] and cfg.num_key_value_heads == 1
        assert "sliding_attention" in cfg.layer_types and cfg.sliding_window > 0
    tok = AutoTokenizer.from_pretrained(a / "1b")
    assert len(tok) <= 8192
    text = tok.apply_chat_template([{"role": "system", "content": "K"},
                                    {"role": "user", "content": "Q"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nK\n\nQ<end_of_turn>\n<start_of_turn>model\n"

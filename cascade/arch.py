"""A model's sizes from its config.json, with no weights: parameters, LoRA parameters, KV cache and
activation bytes (the planner's, cascade/plan.py). Gemma 3's configs ship in data/models/ so that
planning works offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from cascade.config import Config, ConfigError


@dataclass(frozen=True)
class Arch:
    """The sizes of a Gemma-3-like decoder (and its vision tower, when it has one) that memory and
    time follow."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    window: int  # sliding window (0: none)
    full_layers: int  # layers that attend to the whole context
    vision: int = 0  # parameters of the vision tower and projector

    @classmethod
    def of(cls, c: dict) -> Arch:
        t = c.get("text_config") or c
        n, pattern = t["num_hidden_layers"], t.get("sliding_window_pattern", 6)
        types = t.get("layer_types") or ["sliding_attention" if (j + 1) % pattern
                                         else "full_attention"
                                         for j in range(n)]
        hd = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
        a = cls(t["hidden_size"], n, t["num_attention_heads"], t.get("num_key_value_heads") or
                t["num_attention_heads"], hd, t["intermediate_size"], t["vocab_size"],
                t.get("sliding_window") or 0, sum(x == "full_attention" for x in types))
        v = c.get("vision_config") if c.get("text_config") else None
        return replace(a, vision=_vision_params(v, a.hidden)) if v else a

    def linears(self) -> dict[str, tuple[int, int]]:
        h, q, kv, i = (self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim,
                       self.intermediate)
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def text_params(self) -> int:
        # + norms
        layer = sum(a * b for a, b in self.linears().values()) + 4 * self.hidden + 2 * self.head_dim
        # embeddings tied to the output
        return self.vocab * self.hidden + self.layers * layer + self.hidden

    @property
    def params(self) -> int:
        return self.text_params + self.vision

    def lora_params(self, r: int, targets: list[str]) -> int:
        """The decoder's LoRA (a vision tower's linear layers, which all-linear also adapts, are not
        counted)."""
        mods = self.linears()
        chosen = (mods.values() if "all-linear" in targets
                  else [v for k, v in mods.items() if k in targets])
        return self.layers * sum(r * (a + b) for a, b in chosen)

    def kv_bytes(self, tokens: float, nbytes: int) -> float:
        per_layer = 2 * self.kv_heads * self.head_dim * nbytes
        window = min(tokens, self.window) if self.window else tokens
        return per_layer * (self.full_layers * tokens + (self.layers - self.full_layers) * window)

    def activation_bytes(self, tokens: int, nbytes: int, checkpointing: bool) -> float:
        """What backward needs kept, per worker: each layer's saved tensors (norms, q/k/v, attention
        output, MLP's gate/up/activation/product, residuals), or with recomputation each layer's
        input plus one layer's."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = nbytes * tokens * (10 * self.hidden + 4 * self.intermediate + 3 * q + 4 * kv)
        if checkpointing:
            return self.layers * nbytes * tokens * self.hidden + layer
        return self.layers * layer


def _vision_params(v: dict, hidden: int) -> int:
    """A SigLIP tower (patch and position embeddings, pre-norm blocks, final norm) and Gemma 3's
    projector."""
    d, i, n, p = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], v["patch_size"]
    block = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 4 * d
    return 3 * p * p * d + d + (v["image_size"] // p) ** 2 * d + n * block + 2 * d + d * hidden + d


def shipped_configs() -> dict[str, dict]:
    """The architectures shipped with the project (data/models/*.json), by hub id and preset name.
    """
    out = {}
    for f in (resources.files("cascade.data") / "models").iterdir():
        if f.name.endswith(".json"):
            doc = json.loads(f.read_text())
            for name in doc.get("hub_ids", []) + doc.get("presets", []) + [f.name[:-5]]:
                out[name] = doc["config"]
    return out


def model_config(cfg: Config, stage: str) -> dict:
    """A stage's base model's config.json, with no weights and no network."""
    from cascade.models import model_identity

    model = cfg.stages[stage].model
    if model.startswith("gemma3-270m:"):
        return shipped_configs()["gemma3-270m"]
    if model.startswith("tiny:"):
        path = Path(model_identity(cfg, stage, weights=False)[0]) / "config.json"
        if path.is_file():  # the built preset: its exact vocabulary
            return json.loads(path.read_text())
        t, s = cfg.models.tiny, cfg.models.tiny.sizes[model.split(":", 1)[1]]
        return {"hidden_size": s.hidden_size, "num_hidden_layers": s.num_hidden_layers,
                "intermediate_size":
                s.intermediate_size, "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads":
                t.num_key_value_heads, "head_dim": t.head_dim, "vocab_size": t.vocab_size,
                "sliding_window":
                t.sliding_window}
    local = Path(model).expanduser() / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if model in (shipped := shipped_configs()):
        return shipped[model]
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json", revision=cfg.stages[stage].revision)
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    raise ConfigError(f"plan: no config.json for stages.{stage}.model={model!r} on this machine "
                      f"(shipped: {', '.join(sorted(k for k in shipped if '/' in k))}); download "
                      f"it once (huggingface-cli download {model} config.json)")

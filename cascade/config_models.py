"""The `models` config group's schema (conf/models/<preset>.yaml): which models the cascade is built
from, and how the local presets are built (the tiny preset: cascade/tiny.py; Gemma 3 270M:
cascade/gemma3_270m.py). Part of Config (cascade/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from cascade.validate import fail, number


@dataclass
class TinySpec:
    hidden_size: int = MISSING
    num_hidden_layers: int = MISSING
    intermediate_size: int = MISSING
    # full-parameter steps on the project's texts when the preset is built
    pretrain_steps: int = MISSING
    # chat: answers in the turn format (a teacher); text: plain prose (a base model)
    pretrain_format: str = "text"


@dataclass
class TinyConfig:
    vocab_size: int = 2048  # <= 8k: a 262k vocabulary trains ~25x slower on CPU
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 64
    sliding_window: int = 64
    max_position_embeddings: int = 512
    lr: float = 3e-3
    batch_size: int = 16
    sizes: dict[str, TinySpec] = field(default_factory=dict)


@dataclass
class Gemma3Config:
    """gemma3-270m:chat, the base taught Gemma's turn format (cascade/gemma3_270m.py)."""

    chat_steps: int = 30  # LoRA steps on the training prompts' reference answers
    chat_lr: float = 1e-3
    lora_r: int = 16
    batch_size: int = 8
    max_seq_len: int = 256

    def check(self) -> None:
        for k in ("chat_steps", "lora_r", "batch_size", "max_seq_len"):
            number(f"models.gemma3.{k}", getattr(self, k), 1)
        number("models.gemma3.chat_lr", self.chat_lr, 0, lo_open=True)


PRESETS = ("real", "tiny", "gemma3-270m")


@dataclass
class ModelsConfig:
    preset: str = "real"  # real | tiny | gemma3-270m (conf/models/<preset>.yaml)
    # built models live here, keyed by spec
    cache_dir: str = "${oc.env:CASCADE_CACHE,'~/.cache/cascade/models'}"
    trust_remote_code: bool = False
    tiny: TinyConfig = field(default_factory=TinyConfig)
    gemma3: Gemma3Config = field(default_factory=Gemma3Config)

    def check(self, stage_order: list[str]) -> None:
        if self.preset not in PRESETS:
            fail(f"models.preset {self.preset!r}: valid presets: {', '.join(PRESETS)}")
        self.gemma3.check()
        if self.preset == "tiny":
            t = self.tiny
            number("models.tiny.vocab_size", t.vocab_size, 512, 8192)
            for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                      "max_position_embeddings", "batch_size"):
                number(f"models.tiny.{k}", getattr(t, k), 1)
            number("models.tiny.lr", t.lr, 0, lo_open=True)
            for name, spec in t.sizes.items():
                for k in ("hidden_size", "num_hidden_layers", "intermediate_size"):
                    number(f"models.tiny.sizes.{name}.{k}", getattr(spec, k), 1)
                number(f"models.tiny.sizes.{name}.pretrain_steps", spec.pretrain_steps, 0)
            sizes = [t.sizes[s] for s in stage_order if s in t.sizes]
            params = [s.hidden_size * s.num_hidden_layers * s.intermediate_size for s in sizes]
            if params != sorted(set(params)):
                fail("models.tiny.sizes must strictly grow with the stage")

"""Where a stage's base model comes from, and what identifies it: the key every step it feeds is
keyed by (the tiny preset, the gemma3-270m preset, a local directory by its bytes, a hub id by its
revision).
"""

from __future__ import annotations

import os
from pathlib import Path

from cascade.config import Config, ConfigError
from cascade.storage import stable_hash


def _looks_local(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or os.path.isdir(os.path.expanduser(model))


def model_identity(cfg: Config, stage: str, weights: bool = True) -> tuple[str, str]:
    """(path or id, key) of a stage's base model; raises ConfigError when a local path is missing
    (or, with HF_HUB_OFFLINE=1 and weights, a hub model is not in the cache)."""
    spec = cfg.stages[stage]
    if spec.model.startswith("tiny:"):
        from cascade.tiny import preset_dir, preset_key

        size = spec.model.split(":", 1)[1]
        if cfg.models.preset != "tiny" or size not in cfg.models.tiny.sizes:
            raise ConfigError(f"stages.{stage}.model={spec.model!r}: no such tiny model (use "
                              "models=tiny)")
        return str(preset_dir(cfg) / size), stable_hash("tiny", preset_key(cfg), size)
    if spec.model.startswith("gemma3-270m:"):
        from cascade import gemma3_270m

        which = spec.model.split(":", 1)[1]
        path = gemma3_270m.model_dir(cfg, which)  # built before Ray starts (driver._prepare)
        return str(path), path.name.rsplit("-", 1)[1]
    if _looks_local(spec.model):
        p = Path(spec.model).expanduser()
        if not (p / "config.json").is_file():
            raise ConfigError(f"stages.{stage}.model: model path not found (no config.json): "
                              f"{spec.model}")
        from cascade.storage import content_hash

        # its bytes, not only its names and sizes: weights retrained in place are another model
        files = sorted((f.name, f.stat().st_size, content_hash(f)) for f in p.iterdir()
                       if f.is_file())
        return str(p.resolve()), stable_hash("local", (p / "config.json").read_text(), files)
    if weights and os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(spec.model, "config.json", revision=spec.revision),
                          str):
            raise ConfigError(f"stages.{stage}.model: {spec.model!r} is not in the local HF cache "
                              "(HF_HUB_OFFLINE=1)")
    return spec.model, stable_hash("hub", spec.model, spec.revision)

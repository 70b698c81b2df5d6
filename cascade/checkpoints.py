"""Mid-phase training checkpoints in run storage, and the FSDP2 pieces they need (stages/train.py
uses them).

Layout: <stage>/train/_ckpt/<NN>-<phase>-<key>/step-NNNNNN/ {adapter.safetensors, optimizer.pt,
scheduler.pt, rng-rank<R>.pt, meta.json}, each step directory committed by RunDir.publish (meta.json
is its marker); the last K are kept, and an on_policy phase's rollouts/ from the oldest kept one's
step on.
"""

from __future__ import annotations

import logging
from typing import Any

from cascade.rundir import RunDir

log = logging.getLogger(__name__)


def fully_shard_model(model: Any, device: Any) -> Any:
    """FSDP2: every decoder layer a sharded unit, the rest (embeddings, final norm) the root's."""
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    for m in model.modules():
        if type(m).__name__.endswith("DecoderLayer"):
            fully_shard(m)
    fully_shard(model)
    return model


def _state_options(strict: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True,
                            strict=strict)


def full_adapter(model: Any) -> dict:
    """The trainable (LoRA) weights of a sharded model, gathered whole (a collective; filled on rank
    0)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options())


class Checkpoints:
    """Mid-phase checkpoints under <stage>/train/_ckpt/<NN>-<phase>-<key>/step-NNNNNN/, committed by
    rename: adapter (safetensors), optimizer and scheduler (rank 0), RNG states of python, numpy and
    torch (every rank), meta.json (step = data position, losses, tokens, world size, reason:
    periodic, sigterm or preemption-notice). The last `keep` are kept. Under FSDP the adapter and
    optimizer state are gathered whole on save and re-sharded on restore (torch.distributed's full
    state dicts), so a sharded run resumes on any worker count too."""

    def __init__(self, rd: RunDir, path: str, keep: int, rank: int, fsdp: bool = False) -> None:
        self.rd, self.dir, self.keep, self.rank, self.fsdp = rd, path, max(1, keep), rank, fsdp

    def _steps(self) -> list[str]:
        if not self.rd.exists(self.dir):
            return []
        return sorted(p for p in self.rd.listdir(self.dir)
                      if p.rsplit("/", 1)[-1].startswith("step-")
                      and self.rd.exists(f"{p}/meta.json"))

    @property
    def rollouts(self) -> str:
        """Where an on_policy phase commits each micro-step's samples and scores (named by step:
        `<step:06d>-...`) for a resume to read back (cascade/phases/on_policy.py)."""
        return f"{self.dir}/rollouts"

    def _prune_rollouts(self, oldest: int) -> None:
        """The rollouts of steps before the oldest checkpoint kept: no resume reads them again (it
        starts at a kept checkpoint's step; with every kept one damaged, at step 0, where the
        student, seeded by step, samples again). Without this a phase kept every step's top-k
        scores until the run directory was deleted (~0.5 MB a step on the 270M at top_k 400)."""
        if not self.rd.exists(self.rollouts):
            return
        for p in self.rd.listdir(self.rollouts):
            name = p.rsplit("/", 1)[-1]
            if name[:6].isdigit() and int(name[:6]) < oldest:
                self.rd.remove(p)

    def mark_resumed(self, step: int) -> None:
        """resumed.json: the first optimizer step taken after a resume, and when
        (benchmarks/training.py)."""
        import time

        self.rd.write_json(f"{self.dir}/resumed.json", {"step": step, "time": time.time()})

    def _check(self, path: str) -> tuple[dict, list[str]]:
        """(meta, what is wrong): meta.json must parse and every file match its recorded size and
        sha256, so that nothing is loaded from a damaged checkpoint."""
        meta = self.rd.read_json(f"{path}/meta.json")
        if not isinstance(meta, dict) or "step" not in meta:
            return {}, ["meta.json missing or torn"]
        return meta, self.rd.damage(path, meta.get("files"), hashes=True)

    def restore(self, model: Any, opt: Any, sched: Any) -> dict:
        import random

        import numpy as np
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        for path in reversed(self._steps()):
            # the newest sound one; a damaged one falls back to the one before
            meta, bad = self._check(path)
            if not bad:
                break
            log.warning("checkpoint %s is damaged (%s): trying the one before", path,
                        "; ".join(bad[:3]))
        else:
            return {"step": 0, "losses": [], "tokens": 0}
        d = self.rd.pull(path, meta["files"])
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            set_model_state_dict(model, load_file(d / "adapter.safetensors"),
                                 options=_state_options(strict=False))
            set_optimizer_state_dict(model, opt, torch.load(d / "optimizer.pt", weights_only=True),
                                     options=_state_options())
        else:
            inner = model.module if hasattr(model, "module") else model
            device = next(inner.parameters()).device
            set_peft_model_state_dict(inner,
                                      load_file(d / "adapter.safetensors", device=str(device)))
            opt.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
        sched.load_state_dict(torch.load(d / "scheduler.pt", weights_only=True))
        rng = d / f"rng-rank{self.rank}.pt"
        if rng.exists():  # a new worker count: ranks without a saved state keep their seeded state
            r = torch.load(rng, weights_only=True)
            random.setstate((r["python"][0], tuple(r["python"][1]), r["python"][2]))
            np.random.set_state((r["numpy"][0], np.asarray(r["numpy"][1], dtype=np.uint32),
                                 *r["numpy"][2:]))
            torch.set_rng_state(r["torch"])
        log.info("resumed %s at step %d (saved with %d workers)", path, meta["step"], meta["world"])
        if not self.rd.is_local:  # the pulled copy
            import shutil

            shutil.rmtree(d, ignore_errors=True)
        return meta

    def save(self, model: Any, opt: Any, sched: Any, step: int, losses: list, tokens: int,
             world: int, metrics: dict[str, list], reason: str = "periodic") -> None:
        import random

        import numpy as np
        import torch
        import torch.distributed as dist
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        final = f"{self.dir}/step-{step:06d}"
        pystate, npstate = random.getstate(), np.random.get_state()
        rng = {"python": [pystate[0], list(pystate[1]), pystate[2]],
               "numpy": [npstate[0], npstate[1].tolist(), *npstate[2:]],
               "torch": torch.get_rng_state()}
        rngs = [rng]
        if dist.is_initialized():  # every rank's RNG state to rank 0 (ranks may share no disk)
            rngs = [None] * dist.get_world_size()
            dist.all_gather_object(rngs, rng)
        if self.fsdp:  # collectives: every rank takes part, rank 0 receives
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            adapter, optim = (full_adapter(model),
                              get_optimizer_state_dict(model, opt, options=_state_options()))
        if self.rank == 0:
            if not self.fsdp:
                inner = model.module if hasattr(model, "module") else model
                adapter, optim = get_peft_model_state_dict(inner), opt.state_dict()
            staging = self.rd.staging(f"ckpt-{step:06d}")
            d = self.rd.as_local(staging)
            for r, state in enumerate(rngs):
                torch.save(state, d / f"rng-rank{r}.pt")
            save_file({k: v.contiguous() for k, v in adapter.items()}, d / "adapter.safetensors")
            torch.save(optim, d / "optimizer.pt")
            torch.save(sched.state_dict(), d / "scheduler.pt")
            files = self.rd.file_digests(staging)
            self.rd.publish(staging, final, "meta.json",
                            {"step": step, "losses": losses, "tokens": tokens, "world": world,
                             "metrics": metrics, "reason": reason,
                             "files": files}, point="checkpoint")
            steps = self._steps()
            for old in steps[: -self.keep]:
                self.rd.remove(old, recursive=True)
            self._prune_rollouts(int(steps[-self.keep :][0].rsplit("-", 1)[1]))
        if dist.is_initialized():
            dist.barrier()

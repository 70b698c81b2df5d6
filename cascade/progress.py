"""A running step's live progress, for `cascade status` (cascade/status.py) on any machine that
reads the run dir.

    <run_dir>/progress/<step name>.json   {"step", "key", "unit", "done", "total", "start_done",
    "started", "updated"}

The driver writes it for generation (shards), training's rank 0 for a phase (optimizer steps): one
small atomic write at most every EVERY_S seconds and at the last unit, so it costs nothing next to
the work it describes. A failed write (a full disk, a storage hiccup) is logged and skipped:
progress is never worth a run. `Board`: training's per-step figures, written to this progress,
TensorBoard and Ray's metrics at once.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from cascade.rundir import RunDir

log = logging.getLogger(__name__)
EVERY_S = 2.0


class ProgressFile:
    def __init__(self, rd: RunDir, step: str, key: str, unit: str, total: int,
                 done: int = 0) -> None:
        now = time.time()
        self.rd, self.path, self.last = rd, rd.progress(step), 0.0
        self.rec = {"step": step, "key": key, "unit": unit, "done": done, "total": total,
                    "start_done": done, "started": now, "updated": now}
        self._write()

    @property
    def done(self) -> int:
        return self.rec["done"]

    def update(self, done: int) -> None:
        self.rec.update(done=done, updated=time.time())
        if done >= self.rec["total"] or time.time() - self.last >= EVERY_S:
            self._write()

    def _write(self) -> None:
        self.last = time.time()
        try:
            # not a failpoint: best effort
            self.rd.write_bytes(self.path, json.dumps(self.rec).encode(), point="")
        except OSError as e:
            log.warning("progress of %s not written: %s", self.rec["step"], e)


def duration(s: float | None) -> str:
    """12s, 3m05s, 2h10m; "-" for none."""
    if s is None:
        return "-"
    s = int(round(s))
    return (f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
            if s >= 60 else f"{s}s")


class Board:
    """Per-step loss, learning rate, tokens/s: TensorBoard under
    <stage>/train/_work/tensorboard/<phase>, Ray metrics (cascade_train_loss, _lr, _tokens_per_s,
    _step, _tokens; tagged by stage and phase) for the dashboard, and the phase's live progress
    (cascade/progress.py) for `cascade status`."""

    def __init__(self, rd: RunDir, stage: str, ph: Any, start: int) -> None:
        # ph: a cascade.graph.PhaseGraph
        from ray.util.metrics import Counter, Gauge
        from torch.utils.tensorboard import SummaryWriter

        self.rd, self.dir = rd, rd.tensorboard(stage, ph.name)
        self.remote = f"{rd.train_work(stage)}/tensorboard/{ph.name}"
        self.writer = SummaryWriter(str(self.dir))
        self.tags = {"stage": stage, "phase": ph.name}
        self.gauges = {k: Gauge(f"cascade_train_{k}", f"training {k}", tag_keys=("stage", "phase"))
                       for k in ("loss", "lr", "tokens_per_s", "step")}
        self.tokens = Counter("cascade_train_tokens", "tokens trained on (not padding)",
                              tag_keys=("stage", "phase"))
        self.progress = ProgressFile(rd, ph.model.name, ph.model.key, "steps", ph.iters, start)
        self.seen = 0

    def log(self, step: int, loss: float, lr: float, tok_s: float, tokens: int) -> None:
        for k, v in (("loss", loss), ("lr", lr), ("tokens_per_s", tok_s)):
            self.writer.add_scalar(f"train/{k}", v, step)
        for k, v in (("loss", loss), ("lr", lr), ("tokens_per_s", tok_s), ("step", step + 1)):
            self.gauges[k].set(v, tags=self.tags)
        # this process's tokens since the last step
        self.tokens.inc(tokens - self.seen, tags=self.tags)
        self.seen = tokens
        self.progress.update(step + 1)

    def close(self) -> None:
        self.writer.close()
        # from this node's mirror when the run directory is an object store
        self.rd.upload(self.dir, self.remote)

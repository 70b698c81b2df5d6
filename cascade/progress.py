"""A running step's live progress, for `cascade status` (cascade/status.py) on any machine that reads the run dir.

    <run_dir>/progress/<step name>.json   {"step", "key", "unit", "done", "total", "start_done", "started",
                                           "updated"}

The driver writes it for generation (shards), training's rank 0 for a phase (optimizer steps): one small atomic
write at most every EVERY_S seconds and at the last unit, so it costs nothing next to the work it describes.
A failed write (a full disk, a storage hiccup) is logged and skipped: progress is never worth a run.
"""

from __future__ import annotations

import json
import logging
import time

from cascade.rundir import RunDir

log = logging.getLogger(__name__)
EVERY_S = 2.0


class ProgressFile:
    def __init__(self, rd: RunDir, step: str, key: str, unit: str, total: int, done: int = 0) -> None:
        now = time.time()
        self.rd, self.path, self.last = rd, rd.progress(step), 0.0
        self.rec = {"step": step, "key": key, "unit": unit, "done": done, "total": total, "start_done": done,
                    "started": now, "updated": now}
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
            self.rd.write_bytes(self.path, json.dumps(self.rec).encode(), point="")  # not a failpoint: best effort
        except OSError as e:
            log.warning("progress of %s not written: %s", self.rec["step"], e)


def duration(s: float | None) -> str:
    """12s, 3m05s, 2h10m; "-" for none."""
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"

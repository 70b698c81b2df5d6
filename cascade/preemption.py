"""SIGTERM (a scheduler's stop, a spot pre-emption) saves what the run has, then the driver exits
non-zero.

    kill -TERM <driver pid>        # exit 143: "pre-empted"; the same command resumes

While generating, the answers already streamed to the driver are written as partial shards
(shard-NNNNN.partial.jsonl) that the next run completes, asking only for the missing answers. While
training, the driver writes tmp/preempt.json; every training worker looks for it after each
optimizer step (the ranks agree through an all-reduce), checkpoints at that step and stops; then the
driver stops. The next run resumes from that checkpoint, so at most the optimizer step in flight is
redone. Ray installs its own SIGTERM handler when it starts, so `install()` runs after Ray is up.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from typing import Any

from cascade.rundir import RunDir

log = logging.getLogger(__name__)
# 143, what a scheduler expects of a process it stopped with SIGTERM
EXIT_CODE = 128 + signal.SIGTERM


class Preempted(BaseException):
    """The driver was asked to stop (SIGTERM); what it had is saved. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


class Preemption:
    def __init__(self, rd: RunDir) -> None:
        self.rd, self.requested, self._deferred, self.halted = rd, False, False, False

    def halt(self) -> None:
        """The driver's thread failed: work running beside it (cascade/overlap.py) stops as it
        would on SIGTERM, saving what it has."""
        self.halted = True

    def stopping(self) -> bool:
        """Whether work in another thread than the driver's should stop (SIGTERM, or halt)."""
        return self.requested or self.halted

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: object) -> None:
        if not self.requested:
            log.warning("SIGTERM: saving what the run has, then stopping")
            self.requested = True
            self.rd.write_json(self.rd.preempt_marker(), {"time": time.time()})
        if not self._deferred:
            raise Preempted()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """While the training workers run: they see the marker, checkpoint and stop; then this
        raises."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False
        if self.requested:
            raise Preempted()


def requested(rd: RunDir) -> bool:
    """In a training worker: whether the driver asked the run to stop."""
    return rd.exists(rd.preempt_marker())


def stop_requested(rd: RunDir, device: Any) -> bool:
    """Whether the driver was pre-empted (cascade/preemption.py), agreed by every rank."""
    return agreed(device, requested(rd))[0]


def agreed(device: Any, *flags: bool) -> list[bool]:
    """Flags as every rank sees them: each the max over ranks (one all_reduce for all of them)."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([int(f) for f in flags], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]
    return list(flags)

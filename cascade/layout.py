"""The run directory's layout, written down here once; every path of a run is made by a method of
`Layout` (RunDir's base, cascade/rundir.py), no other module joins run-directory paths by hand.

    <run_dir>/                              made absolute first (Ray Train workers run in their own
                                            cwd)
      lease/<NNNNNNNN>.json                 the lease's generations, the highest current: its holder
                                            (host, boot id, pid), heartbeat; every commit fenced by
                                            it (cascade/lease.py)
      manifest.json                         every step: {name: {state, key, path, summary, time}};
                                            rewritten atomically, always after the output it
                                            describes
      config.yaml, config.sha256            the resolved config of the latest invocation (no
                                            secrets)
      logs/driver.log                       the driver's log, appended by every invocation
      progress/**                           <step name>.json: a running step's live progress
                                            (done/total shards or optimizer steps, start, last
                                            update), written by the driver (generation) and
                                            training's rank 0 (cascade/progress.py)
      report/index.html, *.png              the run report, rebuilt after every stage
                                            (cascade/report.py)
      generations/<teacher>/<data>/<key>/step.json
      generations/<teacher>/<data>/<key>/shards/shard-NNNNN.jsonl
      generations/<teacher>/<data>/<key>/shards/shard-NNNNN.logprobs.npz
      generations/<teacher>/<data>/<key>/shards/shard-NNNNN.partial.jsonl
      generations/<teacher>/<data>/<key>/shards/shard-NNNNN.*.sha256
                                            a teacher's answers to one prompt set, content-addressed
                                            by key (teacher weights, template, sampling, prompts)
                                            and shared by stages; each shard file commits itself,
                                            step.json (counts, checksums) the set; .npz: top-k
                                            log-probs (cascade/logprobs.py); .partial: an unfinished
                                            shard's answers so far (every second, and on SIGTERM);
                                            .sha256: each file's seal, written before it (a file
                                            that does not match it is generated again)
      <stage>/dataset/<phase>/train.jsonl, heldout.jsonl, step.json
                                            a phase's curated dataset
      <stage>/train/<NN>-<phase>/*          the student fused after that phase: a plain HF model
                                            directory
      <stage>/train/_ckpt/<NN>-<phase>-<key>/**
                                            mid-phase checkpoints, step-NNNNNN/
                                            (cascade/checkpoints.py); rollouts/: an on_policy
                                            phase's samples and teacher scores, one file per
                                            micro-step and rank (cascade/phases/on_policy.py),
                                            from the oldest kept checkpoint's step on
      <stage>/train/_work/**                Ray Train's storage for the stage; tensorboard/<phase>/;
                                            failure.json: a failed fusion check, for the driver;
                                            before.json, after.json: the stage's base and its last
                                            fused model scored where they were trained (after:
                                            with the teachers' reverse KL), for the evaluation
                                            (cascade/scoring.py)
      <stage>/eval/metrics.json, step.json  agreement before/after, loss per phase, curation counts
      <stage>/gate/verdict.json, step.json  the promotion gate's verdict (PROMOTE, HOLD, REJECT),
                                            its criteria and the ledger (stages/gate.py)
      <stage>/release/README.md, release.json, hf/*, gguf/*.gguf
                                            the model card, its figures, the released HF directory
                                            and the checked GGUF files (stages/release.py)
      models/<key>/**                       an object store's copy of base models that are
                                            directories on the driver's node (the tiny preset),
                                            loaded from here by every node
      tmp/**                                staging; anything here is uncommitted and may be
                                            deleted; tmp/preempt.json asks the training workers to
                                            checkpoint and stop

Where it lives (a filesystem or an object store) and what that changes: cascade/storage.py; how a
step commits: cascade/rundir.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any


class Layout:
    """Paths of a run: `root` (the run directory, a URL on an object store), `mirror` (this node's
    local copy of what must be a local file), `fs` and `is_local` (RunDir sets all four)."""

    root: str
    mirror: str
    fs: Any
    lfs: Any  # the local filesystem (staging is always on this node)
    is_local: bool

    # -- the paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def generation(self, teacher: str, data: str, key: str) -> str:
        return self.path("generations", teacher, data, key)

    def shard_file(self, teacher: str, data: str, key: str, name: str) -> str:
        """A file of a generation's shards directory (a shard, or the log-probs file a record
        names)."""
        return f"{self.generation(teacher, data, key)}/shards/{name}"

    def shard(self, teacher: str, data: str, key: str, i: int, ext: str = "jsonl") -> str:
        return self.shard_file(teacher, data, key, f"shard-{i:05d}.{ext}")

    def shards(self, teacher: str, data: str, key: str) -> list[str]:
        """The committed shard files of a generation, in order."""
        found = [f for f in self.fs.glob(self.shard_file(teacher, data, key, "shard-*.jsonl"))
                 if not f.endswith(".partial.jsonl")]
        return sorted(found if self.is_local else [self.fs.unstrip_protocol(f) for f in found])

    def dataset(self, stage: str, phase: str) -> str:
        return self.path(stage, "dataset", phase)

    def dataset_file(self, stage: str, phase: str, split: str) -> str:
        return f"{self.dataset(stage, phase)}/{split}.jsonl"

    def model(self, stage: str, index: int, phase: str) -> str:
        return self.path(stage, "train", f"{index:02d}-{phase}")

    def checkpoints(self, stage: str, index: int, phase: str, key: str) -> str:
        return self.path(stage, "train", "_ckpt", f"{index:02d}-{phase}-{key}")

    def train_work(self, stage: str) -> str:
        return self.path(stage, "train", "_work")

    def train_failure(self, stage: str) -> str:
        """Where training's rank 0 leaves a deterministic failure for the driver."""
        return f"{self.train_work(stage)}/failure.json"

    def stage_score(self, stage: str, which: str) -> str:
        """The evaluation's score of the stage's base ("before") or last fused model ("after"),
        made by training's rank 0."""
        return f"{self.train_work(stage)}/{which}.json"

    def tensorboard(self, stage: str, phase: str) -> Path:
        """Written locally (this node's mirror on an object store; uploaded when the phase ends)."""
        return self.local(stage, "train", "_work", "tensorboard", phase)

    def eval(self, stage: str) -> str:
        return self.path(stage, "eval")

    def gate(self, stage: str) -> str:
        return self.path(stage, "gate")

    def release(self, stage: str) -> str:
        return self.path(stage, "release")

    def metrics(self, stage: str) -> str:
        return f"{self.eval(stage)}/metrics.json"

    def progress(self, step: str) -> str:
        """A running step's live progress (cascade/progress.py)."""
        return self.path("progress", f"{step}.json")

    def report(self, *parts: str) -> str:
        return self.path("report", *parts)

    def preempt_marker(self) -> str:
        return self.path("tmp", "preempt.json")

    def driver_log(self) -> Path:
        return self.local("logs", "driver.log")

    def local(self, *parts: str) -> Path:
        """A file that must be local (a log, TensorBoard's): in the run directory, or this node's
        mirror of it."""
        return Path(self.mirror, *parts)

    def as_local(self, path: str) -> Path:
        """The local path of a staging path (staging is always on this node's filesystem)."""
        if not path.startswith(self.mirror):
            raise RuntimeError(f"{path} is not local to this node (run directory {self.url})")
        return Path(path)

    def staging(self, name: str) -> str:
        p = f"{self.mirror}/tmp/{name.replace('/', '_')}-{uuid.uuid4().hex[:8]}"
        self.lfs.makedirs(p, exist_ok=True)
        return p

"""The run directory: its layout (written down here once), atomic commits, the manifest, step identities.

    <run_dir>/
      manifest.json                        index of every step: {name: {state, key, path, summary, time}};
                                           rewritten atomically, always after the output it describes
      config.yaml, config.sha256           the resolved config of the latest invocation (no secrets)
      logs/driver.log                      the driver's log, appended by every invocation
      generations/<teacher>/<data>/<key>/  a teacher's responses to one prompt set, content-addressed by key
                                           (teacher weights, chat template, sampling, prompts): shards/
                                           shard-NNNNN.jsonl committed one by one, then step.json
      <stage>/dataset/<data>/              the curated distilled dataset: train.jsonl, heldout.jsonl, step.json
      <stage>/train/<NN>-<phase>/          the student fused after that phase: a plain HF model directory
      <stage>/train/_work/                 Ray Train's storage for the stage (worker checkpoints, results)
      <stage>/eval/                        agreement of student and teachers on held-out prompts
      <stage>/metrics.json                 loss per phase, agreement before/after, curation counts
      tmp/                                 staging; anything here is uncommitted and may be deleted

A directory is committed when its step.json (holding the step's key) is present: staging happens elsewhere
and the directory is renamed into place whole, so a kill at any point leaves either the old state or the new
one. Paths are fsspec URLs: a shared filesystem serves a multi-node run; model directories must be on a
filesystem (local or shared) because transformers and vLLM load them from a path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import fsspec

log = logging.getLogger(__name__)
STEP_FILE = "step.json"


def stable_hash(*parts: Any) -> str:
    """A short hash of JSON-able parts (dataclasses included); the identity of a step."""

    def norm(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        raise TypeError(f"cannot hash {type(o).__name__}")

    blob = json.dumps(parts, sort_keys=True, default=norm)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RunDir:
    """All reads and writes of a run go through here."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(os.path.expanduser(self.url))
        self.fs.makedirs(self.root, exist_ok=True)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    # -- paths -------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def local(self, *parts: str) -> Path:
        """A path that transformers/vLLM can open: only for a filesystem-backed run directory."""
        if not self.is_local:
            raise RuntimeError(f"model directories need a (shared) filesystem run_dir, not {self.url}")
        return Path(self.path(*parts))

    def as_local(self, path: str) -> Path:
        """The filesystem path of a run-directory path (see local())."""
        if not self.is_local:
            raise RuntimeError(f"model directories need a (shared) filesystem run_dir, not {self.url}")
        return Path(path)

    def staging(self, name: str) -> str:
        p = self.path("tmp", f"{name.replace('/', '_')}-{uuid.uuid4().hex[:8]}")
        self.fs.makedirs(p, exist_ok=True)
        return p

    # -- atomic writes -----------------------------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a file atomically: a temporary sibling, then a rename."""
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, path: str) -> Any | None:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    # -- steps -------------------------------------------------------------------------------------------------
    def committed(self, path: str, key: str) -> dict | None:
        """The step record at `path` if it was committed with `key`, else None."""
        rec = self.read_json(f"{path}/{STEP_FILE}")
        return rec if rec is not None and rec.get("key") == key else None

    def commit_dir(self, staging: str, path: str, name: str, key: str, summary: dict, record: bool = True) -> dict:
        """Make `staging` the committed output at `path` (replacing a stale one) and record it in the manifest.

        Workers pass record=False: the driver, the manifest's one writer, records the step when it sees it.
        """
        rec = {"step": name, "key": key, "summary": summary, "time": time.time()}
        self.write_json(f"{staging}/{STEP_FILE}", rec)
        if self.fs.exists(path):  # stale: a different key (changed config); move aside, then drop
            aside = self.path("tmp", f"stale-{uuid.uuid4().hex[:8]}")
            self.fs.mv(path, aside, recursive=True)
            self.fs.rm(aside, recursive=True)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(staging, path, recursive=True)
        if record:
            self.mark(name, "done", key=key, path=path, summary=summary)
        return rec

    def step(self, name: str, key: str, path: str, build: Callable[[str], dict]) -> dict:
        """Run build(staging_dir) -> summary unless `path` already holds this step with this key; commit it."""
        rec = self.committed(path, key)
        if rec is not None:
            log.info("[skip] %s (committed, key %s)", name, key)
            self.mark(name, "done", key=key, path=path, summary=rec["summary"])
            return rec
        log.info("[run ] %s (key %s)", name, key)
        self.mark(name, "running", key=key, path=path)
        staging = self.staging(name)
        try:
            summary = build(staging)
        except BaseException as e:
            self.mark(name, "failed", key=key, path=path, error=f"{type(e).__name__}: {e}")
            raise
        return self.commit_dir(staging, path, name, key, summary)

    # -- manifest ----------------------------------------------------------------------------------------------
    def manifest(self) -> dict:
        return self.read_json(self.path("manifest.json")) or {"version": 1, "steps": {}}

    def mark(self, name: str, state: str, **fields: Any) -> None:
        """Record a step's state; only the driver calls this (one writer)."""
        m = self.manifest()
        old = m["steps"].get(name, {})
        if old.get("state") == state and old.get("key") == fields.get("key"):
            return
        m["steps"][name] = {"state": state, "time": time.time(), **fields}
        self.write_json(self.path("manifest.json"), m)

    def clean_staging(self) -> None:
        """Drop uncommitted leftovers of killed runs (only safe while no step of this run is in flight)."""
        tmp = self.path("tmp")
        if self.fs.exists(tmp):
            self.fs.rm(tmp, recursive=True)

"""How a step commits: the step protocol, shared by every step (RunDir's, cascade/rundir.py).

A step (name, key, path) is committed when its step.json, holding the key, is present, its files
match their record, and the steps it was built from (its inputs) still hold the bytes it was built
from: a damaged step that runs again to different bytes takes the steps downstream of it along; to
the same bytes, it leaves them be. The step protocol (`begin` -> build in staging -> `commit_dir`,
or files written in place then `commit_files`) is the same for every step: a committed step is
skipped, a running one is marked in the manifest, and a kill at any point leaves either the old
state or the new one. Where the run directory lives (a filesystem or an object store) and what that
changes: cascade/storage.py.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cascade.failpoints import failpoint
from cascade.storage import STEP_FILE, fsync_tree, sha256_file, stable_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One unit of committed work: its manifest name, its identity and where its outputs live."""

    name: str
    key: str
    path: str
    # paths of the committed steps it is built from (re-run when their files change)
    inputs: tuple[str, ...] = ()


class Commits:
    """The step protocol's half of RunDir: what it asks of the rest (read_json, write_json, _fs,
    fs, lfs, is_local, path, mark, _fenced, verify, _sound) is RunDir's."""

    def file_digests(self, path: str, hashes: bool = True) -> dict[str, list]:
        """{relative path: [size, sha256]} of every file under path but its step.json (sizes only:
        sha256 None)."""
        fs, out = self._fs(path), {}
        base = fs._strip_protocol(path).rstrip("/")
        for f, info in sorted(fs.find(base, detail=True).items()):
            rel = f[len(base) + 1 :]
            if rel != STEP_FILE and info.get("type", "file") == "file":
                out[rel] = [info["size"], sha256_file(fs, f) if hashes else None]
        return out

    def damage(self, path: str, files: dict[str, list] | None, hashes: bool) -> list[str]:
        """What differs between the files under path and their record: missing, resized or (hashes)
        altered."""
        if files is None:  # committed before files were recorded
            return []
        now = self.file_digests(path, hashes)
        bad = []
        for rel, (size, digest) in files.items():
            if rel not in now:
                bad.append(f"{rel} missing")
            elif now[rel][0] != size:
                bad.append(f"{rel} has {now[rel][0]} bytes, {size} committed")
            elif hashes and now[rel][1] != digest:
                bad.append(f"{rel} does not match its sha256")
        return bad

    def committed(self, step: Step) -> dict | None:
        """The step record at step.path if it was committed with step.key and its files are sound,
        else None (a damaged step is reported, and runs again)."""
        rec = self.read_json(f"{step.path}/{STEP_FILE}")
        if rec is None or rec.get("key") != step.key:
            return None
        stamp = (step.path, step.key, rec.get("time"))
        if stamp not in self._sound:
            bad = self.damage(step.path, rec.get("files"), self.verify)
            if bad:
                log.warning("committed step %s is damaged (%s): it runs again", step.name,
                            "; ".join(bad[:3]))
                return None
            self._sound.add(stamp)
        changed = [p for p, d in (rec.get("inputs") or {}).items() if self.contents(p) != d]
        if changed:
            log.warning("step %s was built from %s, changed since (re-run after damage): it runs "
                        "again", step.name,
                        ", ".join(changed))
            return None
        return rec

    def contents(self, path: str) -> str | None:
        """The identity of a committed step's bytes: a hash of its recorded file sizes and sha256s.
        """
        rec = self.read_json(f"{path}/{STEP_FILE}")
        return stable_hash(rec.get("files")) if rec else None

    def begin(self, step: Step) -> dict | None:
        """Skip a committed step (its record is returned and marked done), or mark it running
        (None)."""
        rec = self.committed(step)
        if rec is not None:
            log.info("[skip] %s (committed, key %s)", step.name, step.key)
            self.mark_done(step, rec)
            return rec
        log.info("[run ] %s (key %s)", step.name, step.key)
        self.mark(step.name, "running", key=step.key, path=step.path)
        return None

    def mark_done(self, step: Step, rec: dict) -> None:
        self.mark(step.name, "done", key=step.key, path=step.path, summary=rec["summary"])

    def commit_dir(self, staging: str, step: Step, summary: dict, record: bool = True) -> dict:
        """Make `staging` the committed output at step.path (replacing a stale one) and record it in
        the manifest.

        Workers pass record=False: the driver, the manifest's one writer, records the step when it
        sees it.
        """
        rec = {"step": step.name, "key": step.key, "summary": summary, "time": time.time(),
               "inputs": {p: self.contents(p) for p in step.inputs},
               "files": self.file_digests(staging)}
        self.publish(staging, step.path, STEP_FILE, rec)
        if record:
            self.mark_done(step, rec)
        return rec

    def publish(self, staging: str, path: str, marker: str, rec: dict,
                point: str = "commit") -> None:
        """Make the staged directory the one at `path`, its marker file (holding rec) the commit. A
        filesystem: the marker is written into staging, a stale `path` moved aside, staging renamed
        into place. An object store: a stale marker is deleted first, then the stale files, then
        staging's files are uploaded and the marker last."""
        if self.is_local:
            fsync_tree(staging)  # every staged file on disk before the marker that commits them
            self._fenced()
            self.write_json(f"{staging}/{marker}", rec)
            failpoint(point)
            if self.fs.exists(path):
                # stale: a different key (changed config); move aside, then drop
                aside = self.path("tmp", f"stale-{uuid.uuid4().hex[:8]}")
                self.fs.mv(path, aside, recursive=True)
                self.fs.rm(aside, recursive=True)
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.mv(staging, path, recursive=True)
            return
        if self.fs.exists(f"{path}/{marker}"):
            self.fs.rm_file(f"{path}/{marker}")
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        for rel in rec["files"]:
            self.fs.put_file(f"{staging}/{rel}", f"{path}/{rel}")
        failpoint(point)
        self._fenced()
        self.write_json(f"{path}/{marker}", rec)
        self.lfs.rm(staging, recursive=True)

    def commit_files(self, step: Step, summary: dict, **extra: Any) -> dict:
        """Commit a step whose files were written in place, each atomically: its step.json comes
        last."""
        rec = {"step": step.name, "key": step.key, "summary": summary, "time": time.time(), **extra,
               "inputs": {p: self.contents(p) for p in step.inputs},
               "files": self.file_digests(step.path)}
        failpoint("commit")
        self._fenced()
        self.write_json(f"{step.path}/{STEP_FILE}", rec)
        self.mark_done(step, rec)
        return rec

"""The run directory: atomic commits, the manifest, the step protocol; its layout:
cascade/layout.py.

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

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import fsspec

from cascade.failpoints import failpoint
from cascade.layout import Layout
from cascade.storage import (STEP_FILE, absolute, download, fsync_dir, fsync_tree, is_object_store,
                             node_cache,
                             open_fs, sha256_file, stable_hash, stray_pulls, write_synced)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One unit of committed work: its manifest name, its identity and where its outputs live."""

    name: str
    key: str
    path: str
    # paths of the committed steps it is built from (re-run when their files change)
    inputs: tuple[str, ...] = ()



class RunDir(Layout):
    """All reads and writes of a run go through here. With verify, a committed step's files are
    checked against their recorded sha256 (once per step and invocation); otherwise against their
    recorded sizes."""

    def __init__(self, url: str, verify: bool = False) -> None:
        self.url = absolute(url).rstrip("/")
        self.fs, root = open_fs(self.url)
        self.fs.makedirs(root, exist_ok=True)
        self.is_local = not is_object_store(self.url)
        # an object store's paths are URLs (they name the store wherever they are passed); the
        # node's mirror holds what must be a local file (staging, logs) - for a filesystem run
        # directory it is the run directory
        self.root = root if self.is_local else self.url
        self.mirror = root if self.is_local else str(node_cache() / "runs" / stable_hash(self.url))
        self.lfs = self.fs if self.is_local else fsspec.filesystem("file")
        self.verify = verify
        # raises unless this process may still commit (cascade/lease.py)
        self.fence: Callable[[], None] | None = None
        self._sound: set[tuple[str, str]] = set()  # (path, key) of committed steps already checked

    def _fs(self, path: str) -> Any:
        """The filesystem of a path: the store's, or the local one for this node's mirror (staging,
        logs)."""
        return self.lfs if not self.is_local and path.startswith("/") else self.fs

    # -- atomic writes and reads -------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes, point: str = "write") -> None:
        """Write a file atomically: a temporary sibling, then a rename (on an object store: one
        PUT). `point`: the failpoint it counts as ("": none, for best-effort files such as
        progress)."""
        fs = self._fs(path)
        if fs is not self.lfs:
            failpoint(point, path)
            fs.pipe_file(path, data)
            return
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        # on disk before the name points at it
        tmp = write_synced(f"{path}.tmp-{uuid.uuid4().hex[:8]}", data)
        failpoint(point, path)
        os.replace(tmp, path)
        fsync_dir(path.rsplit("/", 1)[0])

    def create_json(self, path: str, obj: Any) -> bool:
        """Write a file only if none is at path, atomically (the lease): False when one already is.
        A filesystem: a written temporary sibling hard-linked to the name (link fails if the name
        exists; NFS too); S3: one PUT with If-None-Match."""
        data = json.dumps(obj, indent=2, sort_keys=True).encode()
        if not self.is_local:
            if not self.url.startswith("s3://"):
                raise RuntimeError(f"{self.url}: no atomic create-if-absent on this store "
                                   "(supported: a filesystem, s3)")
            try:
                self.fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = write_synced(f"{path}.tmp-{uuid.uuid4().hex[:8]}", data)
        try:
            os.link(tmp, path)
            fsync_dir(path.rsplit("/", 1)[0])
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _fenced(self) -> None:
        if self.fence is not None:
            self.fence()

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())

    def write_jsonl(self, path: str, records: list[dict]) -> None:
        self.write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())

    def read_bytes(self, path: str) -> bytes:
        fs = self._fs(path)
        if fs is not self.lfs:
            return fs.cat_file(path)  # one GET, retried while the store cannot be reached
        with fs.open(path, "rb") as f:
            return f.read()

    def read_json(self, path: str) -> Any | None:
        """The JSON at path; None when it is missing or torn (a partial write is as good as none).
        """
        try:
            return json.loads(self.read_bytes(path))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            log.warning("%s is damaged (%s): treated as absent", path, e)
            return None

    def read_jsonl(self, path: str) -> list[dict]:
        """The records of a JSONL file; [] when it does not exist."""
        if not self.exists(path):
            return []
        return [json.loads(line) for line in self.read_bytes(path).splitlines() if line.strip()]

    def exists(self, path: str) -> bool:
        return self._fs(path).exists(path)

    def remove(self, path: str, recursive: bool = False) -> None:
        self._fs(path).rm(path, recursive=recursive)

    def glob(self, pattern: str) -> list[str]:
        return self._fs(pattern).glob(pattern)

    def listdir(self, path: str) -> list[str]:
        return self._fs(path).ls(path, detail=False)

    def set_deadline(self, deadline: Callable[[], float] | None) -> None:
        """An object store's retries end at deadline() (monotonic): the lease's, past which nothing
        may be written."""
        if hasattr(self.fs, "deadline"):
            self.fs.deadline = deadline

    def ray_storage(self, path: str) -> tuple[str, Any]:
        """(storage_path, storage_filesystem) for Ray Train's RunConfig: on an object store, pyarrow
        over this run directory's own fsspec filesystem, its writes retried too (no lease deadline:
        it is pickled)."""
        if self.is_local:
            return path, None
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        from cascade.storage import Retrying

        return self.fs._strip_protocol(path), PyFileSystem(
            FSSpecHandler(Retrying(self.fs.raw, self.fs.budget_s))
        )

    def upload(self, local: Path, path: str) -> None:
        """Copy a local file or directory (a log, TensorBoard's events) to a run-directory path;
        nothing to do when they are the same (a filesystem run directory writes these in place)."""
        if self.is_local:
            return
        for f in [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file()):
            self.fs.put_file(str(f),
                             path if f == local else f"{path}/{f.relative_to(local).as_posix()}")

    def pull(self, path: str, files: dict[str, list]) -> Path:
        """A local copy of the recorded files under a run-directory path (itself on a filesystem run
        directory; from an object store, into this node's mirror, each file checked against its
        record)."""
        if self.is_local:
            return Path(path)
        dest = Path(self.mirror, "tmp", f"pull-{uuid.uuid4().hex[:8]}")
        download(self.fs, path, files, dest)
        return dest

    # -- the step protocol -------------------------------------------------------------------------
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

    # -- manifest ----------------------------------------------------------------------------------
    def manifest(self) -> dict:
        return self.read_json(self.path("manifest.json")) or {"version": 1, "steps": {}}

    def mark(self, name: str, state: str, **fields: Any) -> None:
        """Record a step's state; only the driver calls this (one writer)."""
        m = self.manifest()
        old = m["steps"].get(name, {})
        if old.get("state") == state and old.get("key") == fields.get("key"):
            return
        now, same = (time.time(),
                     old.get("state") == "running" and old.get("key") == fields.get("key"))
        # started: when the step began running under this key (kept when it ends), for `cascade
        # status`
        m["steps"][name] = {"state": state, "time": now,
                            "started": old.get("started", now) if same else now, **fields}
        failpoint("manifest")
        self._fenced()
        self.write_json(self.path("manifest.json"), m)

    def save_config(self, text: str) -> None:
        """The resolved config (no secret: tokens are read from the environment only) and its hash.
        """
        self.write_bytes(self.path("config.yaml"), text.encode())
        self.write_bytes(self.path("config.sha256"), stable_hash(text).encode())

    def clean_staging(self) -> None:
        """Drop uncommitted leftovers of killed runs: staging, and the temporary siblings of
        interrupted atomic writes (only safe while no step of this run is in flight: the driver
        holds the run's lease)."""
        for fs, tmp in {(self.fs, self.path("tmp")), (self.lfs, f"{self.mirror}/tmp")}:
            if fs.exists(tmp):
                fs.rm(tmp, recursive=True)
        for f in self.lfs.glob(f"{self.mirror}/**/*.tmp-*"):
            # an object store has none (nothing is renamed)
            log.info("removing %s, left by an interrupted write", f)
            self.lfs.rm(f, recursive=True)
        import shutil

        for p in stray_pulls(node_cache()):  # this node's: pulls whose process died
            log.info("removing %s, a pull whose process died", p)
            shutil.rmtree(p, ignore_errors=True)

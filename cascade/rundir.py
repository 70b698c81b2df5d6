"""The run directory: atomic writes and reads, the manifest, the step protocol (cascade/commits.py);
its layout: cascade/layout.py. Where the run directory lives (a filesystem or an object store) and
what that changes: cascade/storage.py."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import fsspec

from cascade.commits import Commits, Step  # noqa: F401 - Step is the run directory's unit
from cascade.failpoints import failpoint
from cascade.layout import Layout
from cascade.storage import (absolute, download, fsync_dir, is_object_store, node_cache, open_fs,
                             stable_hash, stray_pulls, write_synced)

log = logging.getLogger(__name__)


_MANIFEST = threading.RLock()  # the driver's threads' read-modify-writes of the manifest


def jsonl(records: list[dict]) -> bytes:
    """Records as a JSONL file's bytes."""
    return "".join(json.dumps(r) + "\n" for r in records).encode()


class RunDir(Layout, Commits):
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
        self.write_bytes(path, jsonl(records))

    # -- sealed files: files that commit themselves before a step.json records their sha256 ------
    def write_sealed(self, path: str, data: bytes) -> None:
        """Write `data` at path (atomically), its sha256 first at `<path>.sha256`: a bit flipped
        since, or a write that never came, then reads as absent (read_sealed)."""
        import hashlib

        self.write_bytes(f"{path}.sha256", hashlib.sha256(data).hexdigest().encode())
        self.write_bytes(path, data)

    def read_sealed(self, path: str) -> bytes | None:
        """The bytes at path, or None when there are none or they do not match their seal (logged).
        A file with no seal is taken as it is (written before seals were)."""
        import hashlib

        try:
            data = self.read_bytes(path)
        except FileNotFoundError:
            return None
        try:
            seal = self.read_bytes(f"{path}.sha256").decode().strip()
        except FileNotFoundError:
            return data
        if hashlib.sha256(data).hexdigest() != seal:
            log.warning("%s does not match its seal (%s.sha256)", path, path.rsplit("/", 1)[-1])
            return None
        return data

    def remove_sealed(self, path: str) -> None:
        for f in (path, f"{path}.sha256"):
            if self.exists(f):
                self.remove(f)

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

    # -- manifest ----------------------------------------------------------------------------------
    def manifest(self) -> dict:
        return self.read_json(self.path("manifest.json")) or {"version": 1, "steps": {}}

    def mark(self, name: str, state: str, **fields: Any) -> None:
        """Record a step's state; only the driver calls this (one writer; its threads, when work
        runs beside training, one at a time)."""
        with _MANIFEST:
            self._mark(name, state, **fields)

    def _mark(self, name: str, state: str, **fields: Any) -> None:
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

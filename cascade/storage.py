"""Where the run directory lives, and what that changes (the layout itself: cascade/layout.py):
- a local or shared filesystem (a path, or file://): staging under tmp/, commits by rename;
- an object store (s3://bucket/prefix; credentials and endpoint from the environment, e.g.
  AWS_ENDPOINT_URL): nothing is renamed. Each object is written by one PUT; a step's files are
  uploaded first and its step.json (a checkpoint's meta.json) last, after any stale marker was
  deleted, so a reader that trusts only markers never sees half a step. Staging, TensorBoard logs
  and the driver's log are written in this node's mirror (<CASCADE_CACHE>/runs/<hash of the URL>/,
  made by `local()`) and uploaded; model directories that transformers, PEFT or vLLM must open are
  pulled into this node's cache by `local_model`, each file checked against the sha256 its step.json
  records, the copy keyed by those sha256s (a step re-committed with new bytes is pulled again,
  never served stale).
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
from typing import Any

import fsspec

log = logging.getLogger(__name__)


def absolute(url: str) -> str:
    """A run directory's URL with a local path made absolute (fsspec URLs with a protocol are kept).
    """
    url = os.path.expanduser(url)
    return url if "://" in url else os.path.abspath(url)


def is_object_store(url: str) -> bool:
    return "://" in url and not url.startswith(("file://", "local://"))


def node_cache() -> Path:
    """This node's cache: CASCADE_CACHE (each node of a cluster may set its own), else
    ~/.cache/cascade/models."""
    return Path(os.environ.get("CASCADE_CACHE") or "~/.cache/cascade/models").expanduser()


def open_fs(url: str) -> tuple[Any, str]:
    """(filesystem, path) of a URL; an object store's listings are not cached (other processes write
    to it), and its calls are retried while it cannot be reached (Retrying; CASCADE_STORE_RETRY_S,
    default 60 s). A store that stalls (accepts, then never answers) fails a call after
    CASCADE_STORE_TIMEOUT_S (default 60 s: botocore's own) without a byte moving on its connection,
    and the call is retried like any other."""
    if not is_object_store(url):
        return fsspec.core.url_to_fs(url)
    timeout = float(os.environ.get("CASCADE_STORE_TIMEOUT_S") or 60)
    # one retry layer, Retrying's: it logs every retry with its reason and stops at the lease's
    # deadline, where botocore's and s3fs's own silent retries (5 attempts each, each up to the
    # timeout) could outlast the lease
    fs, path = fsspec.core.url_to_fs(
        url,
        use_listings_cache=False,
        config_kwargs={"connect_timeout": timeout, "read_timeout": timeout,
                       "retries": {"mode": "standard", "total_max_attempts": 1}},
    )
    fs.retries = 1  # s3fs's own loop (a class attribute, no constructor argument)
    return Retrying(fs, float(os.environ.get("CASCADE_STORE_RETRY_S") or 60)), path


# Errors that say something about the request, not the store's reachability: never retried
DEFINITE = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError, ValueError, TypeError, KeyError)


class Retrying:
    """An object store's filesystem whose calls are retried while the store cannot be reached,
    refuses, stalls or throttles (503 SlowDown): exponential backoff from 0.5 s to 8 s, each retry
    logged with its reason, until `budget_s` has passed or, sooner, `deadline()` (a monotonic time:
    the driver's lease sets it to the moment it must stop writing, cascade/lease.py). Errors that
    describe the request (missing, exists, forbidden) are raised at once. Attribute reads pass
    through; `raw` is the filesystem itself (fsspec and pyarrow take that one)."""

    def __init__(self, fs: Any, budget_s: float) -> None:
        self.raw, self.budget_s = fs, budget_s
        self.deadline: Any = None  # () -> monotonic time after which nothing is retried

    def __getattr__(self, name: str) -> Any:
        if name in ("raw", "budget_s", "deadline") or name.startswith("__"):
            # unpickling: not set yet
            raise AttributeError(name)
        attr = getattr(self.raw, name)
        if not callable(attr) or name.startswith("_") or name in ("open", "unstrip_protocol"):
            # open(): the callers that stream read through cat_file instead (RunDir.read_bytes)
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            t0, delay = time.monotonic(), 0.5
            while True:
                try:
                    return attr(*args, **kwargs)
                except DEFINITE:
                    raise
                # refused, reset, timed out, 5xx: the store's state
                except Exception as e:  # noqa: BLE001
                    end = t0 + self.budget_s
                    if self.deadline is not None:
                        end = min(end, self.deadline())
                    if time.monotonic() + delay > end:
                        raise
                    log.warning(
                        "store: %s(%s) failed (%s: %s): retrying in %.1f s", name,
                                str(args[0])[:120] if args else "",
                        type(e).__name__, str(e)[:200], delay)
                    time.sleep(delay)
                    delay = min(8.0, delay * 2)

        return call


STEP_FILE = "step.json"  # a committed step's record (cascade/rundir.py)
PULLED = ".pulled"  # written last into a directory pulled from an object store


def write_synced(path: str, data: bytes) -> str:
    """Write a local file and flush it to disk (before a rename or link makes it visible); returns
    path."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


def fsync_dir(path: str) -> None:
    """Make a rename or link in this directory durable (POSIX; a no-op where directories cannot be
    opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """Every file under a staged directory, and the directories, flushed to disk (before the
    marker)."""
    for d, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(d)


def safe_rel(rel: str, where: str) -> str:
    """A file name read from storage (a step record), checked to stay under its directory: relative,
    no `..`."""
    parts = rel.replace("\\", "/").split("/")
    if (not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts)
        or ":" in parts[0]):
        raise RuntimeError(f"{where}: refusing the recorded file name {rel!r} (it would leave its "
                           "directory)")
    return rel


def download(fs: Any, src: str, files: dict[str, list], dest: Path) -> None:
    """Copy the recorded files under src to dest (a sibling first, renamed into place), checking
    each one's size and sha256 against its record; raises if one differs, or a recorded name would
    leave dest."""
    import shutil

    for rel in files:
        safe_rel(rel, src)
    # the pid: stray_pulls
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        for rel, (size, digest) in sorted(files.items()):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{src}/{rel}", str(tmp / rel))
            got = sha256_file(fsspec.filesystem("file"), str(tmp / rel))
            if (tmp / rel).stat().st_size != size or (digest is not None and got != digest):
                raise RuntimeError(f"{src}/{rel} does not match its record (size {size}, sha256 "
                                   f"{digest})")
        (tmp / PULLED).write_text(json.dumps(files))
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process on this node pulled it first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        ok = [(dest / rel, d) for rel, (_, d) in sorted(files.items()) if d]
        # every later use checks the copy against them
        content_hashes([p for p, _ in ok], [d for _, d in ok])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stray_pulls(root: Path) -> list[Path]:
    """Pulls under root left by processes that died mid-way (`<dest>.tmp-<pid>-<hex>`, that pid
    gone)."""
    import psutil

    out = []
    for p in root.glob("**/*.tmp-*-*") if root.exists() else []:
        pid = p.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            out.append(p)
    return out


def evict(root: Path, max_bytes: float) -> list[Path]:
    """Node copies under root (directories with a .pulled marker), least recently used first (the
    marker's mtime, touched at every use), removed until the rest fit in max_bytes; returns what was
    removed."""
    import shutil

    if max_bytes <= 0 or not root.exists():
        return []
    copies = sorted((d.parent for d in root.glob(f"*/{PULLED}")),
                    key=lambda d: (d / PULLED).stat().st_mtime)
    sizes = {d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in copies}
    total, gone = sum(sizes.values()), []
    for d in copies[:-1]:  # the newest copy stays, whatever its size
        if total <= max_bytes:
            break
        shutil.rmtree(d, ignore_errors=True)
        total -= sizes[d]
        gone.append(d)
    return gone


def content_hash(path: Path) -> str:
    """The sha256 of a local file, cached by (path, size, mtime, inode) in this node's cache
    (hashes.json) so that a 27B's weights are hashed once, and again only when they change."""
    return content_hashes([path])[0]


def content_hashes(paths: list[Path], known: list[str] | None = None) -> list[str]:
    """content_hash of each path, the cache read and written once; `known`: their sha256s, just
    computed (a download's), recorded without hashing again."""
    stamps = []
    for path in paths:
        st = path.stat()
        stamps.append(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}")
    cache = node_cache() / "hashes.json"
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):
        cached = {}
    new = {}
    for k, (path, stamp) in enumerate(zip(paths, stamps)):
        if known is not None:
            new[stamp] = known[k]
        elif stamp not in cached:
            new[stamp] = sha256_file(fsspec.filesystem("file"), str(path))
    if any(cached.get(k) != v for k, v in new.items()):
        # concurrent writers: one may lose the other's, recomputed
        cached.update(new)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"hashes.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(cached))
        os.replace(tmp, cache)
    return [new[s] if s in new else cached[s] for s in stamps]


def sha256_file(fs: Any, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def stable_hash(*parts: Any) -> str:
    """A short hash of JSON-able parts (dataclasses included); the identity of a step."""

    def norm(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        raise TypeError(f"cannot hash {type(o).__name__}")

    blob = json.dumps(parts, sort_keys=True, default=norm)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def local_model(path: str) -> str:
    """A model directory that transformers, PEFT or vLLM can open: `path` itself, unless it is a
    committed step on an object store; that one is pulled once into this node's cache, every file
    checked against the size and sha256 its step.json records."""
    from cascade import loads

    if not is_object_store(path):
        return path
    fs, p = open_fs(path)
    rec = json.loads(fs.cat_file(f"{p}/{STEP_FILE}"))
    # keyed by the recorded sha256s: a step committed again with other bytes is another copy
    dest = (
        node_cache()
        / "runs"
        / "models"
        / f"{stable_hash(path)}-{rec['key']}-{stable_hash(rec['files'])}"
    )
    pulled = dest / PULLED
    if pulled.exists() and (json.loads(pulled.read_text()) != rec["files"]
                            or _altered(dest, rec["files"])):
        import shutil  # not what the record says, or changed since it was pulled: pulled again

        log.warning("node copy %s differs from %s's record: pulled again", dest, path)
        shutil.rmtree(dest, ignore_errors=True)
    where = "node cache"
    if not pulled.exists():
        download(fs, p, rec["files"], dest)
        where = "object store"
        limit = float(os.environ.get("CASCADE_CACHE_MAX_GB") or 0)
        for gone in evict(dest.parent, limit * 1e9):
            log.info("node cache over %s GB: removed %s (least recently used)", limit, gone)
    os.utime(pulled)  # its last use, for eviction
    loads.pulled(str(dest), where, loads.name_of(path))  # what a load of it records
    return str(dest)


def _altered(dest: Path, files: dict[str, list]) -> bool:
    """Whether a node copy's files differ from their recorded sha256s (each file hashed again only
    when its size, mtime or inode changed since it was last hashed: content_hashes)."""
    rels = sorted(files)
    if not all((dest / rel).is_file() for rel in rels):
        return True
    got = content_hashes([dest / rel for rel in rels])
    return any(files[rel][1] and files[rel][1] != g for rel, g in zip(rels, got))

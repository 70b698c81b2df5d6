"""Where the run directory lives, and what that changes (the layout itself: cascade/rundir.py):
- a local or shared filesystem (a path, or file://): staging under tmp/, commits by rename;
- an object store (s3://bucket/prefix, gs://...; credentials and endpoint from the environment, e.g.
  AWS_ENDPOINT_URL): nothing is renamed. Each object is written by one PUT; a step's files are uploaded first
  and its step.json (a checkpoint's meta.json) last, after any stale marker was deleted, so a reader that trusts
  only markers never sees half a step. Staging, TensorBoard logs and the driver's log are written in this
  node's mirror (<CASCADE_CACHE>/runs/<hash of the URL>/, made by `local()`) and uploaded; model directories
  that transformers, PEFT or vLLM must open are pulled into this node's cache by `local_model`, each file
  checked against the sha256 its step.json records.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec


def absolute(url: str) -> str:
    """A run directory's URL with a local path made absolute (fsspec URLs with a protocol are kept)."""
    url = os.path.expanduser(url)
    return url if "://" in url else os.path.abspath(url)


def is_object_store(url: str) -> bool:
    return "://" in url and not url.startswith(("file://", "local://"))


def node_cache() -> Path:
    """This node's cache: CASCADE_CACHE (each node of a cluster may set its own), else ~/.cache/cascade/models."""
    return Path(os.environ.get("CASCADE_CACHE") or "~/.cache/cascade/models").expanduser()


def open_fs(url: str) -> tuple[Any, str]:
    """(filesystem, path) of a URL; an object store's listings are not cached (other processes write to it)."""
    return fsspec.core.url_to_fs(url, **({"use_listings_cache": False} if is_object_store(url) else {}))


PULLED = ".pulled"  # written last into a directory pulled from an object store


def download(fs: Any, src: str, files: dict[str, list], dest: Path) -> None:
    """Copy the recorded files under src to dest (a sibling first, renamed into place), checking each one's size
    and sha256 against its record; raises if one differs."""
    import shutil

    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    for rel, (size, digest) in sorted(files.items()):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{src}/{rel}", str(tmp / rel))
        got = sha256_file(fsspec.filesystem("file"), str(tmp / rel))
        if (tmp / rel).stat().st_size != size or (digest is not None and got != digest):
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"{src}/{rel} does not match its record (size {size}, sha256 {digest})")
    (tmp / PULLED).write_text(json.dumps(files))
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process on this node pulled it first
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(fs: Any, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()

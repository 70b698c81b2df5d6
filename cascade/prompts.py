"""Prompt sets: load a DataSource (built-in JSONL, local JSONL/Parquet, or a `datasets` name), check
it, split it.

Every problem is raised as ConfigError naming the file and line, before Ray starts.

    python -c "from cascade.prompts import load_prompts; from cascade.config import DataSource; \
print(len(load_prompts(DataSource(path='builtin:ethics_probes.jsonl'))))"
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from cascade.config import ConfigError, DataSource

BUILTIN = "builtin:"


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict[str, str]]
    heldout: bool = False
    # a reference answer, when the data has one (tiny preset pre-training)
    reference: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.messages, sort_keys=True).encode()).hexdigest()[:16]


def resolve_path(path: str) -> Path | None:
    """A local file for `path` (built-in names resolve inside the installed package), or None for a
    hub name."""
    if path.startswith(BUILTIN):
        p = Path(str(resources.files("cascade.data").joinpath(path[len(BUILTIN):])))
        if not p.is_file():
            raise ConfigError(f"no built-in data file {path!r} (looked in {p.parent})")
        return p
    p = Path(path).expanduser()
    if (p.exists() or p.suffix in (".jsonl", ".json", ".parquet")
        or path.startswith((".", "/", "~"))):
        if not p.is_file():
            raise ConfigError(f"data file not found: {path}")
        return p
    return None


def read_text(path: str) -> str:
    p = resolve_path(path)
    if p is None:
        raise ConfigError(f"text file not found: {path}")
    return p.read_text()


def file_digest(path: str) -> str:
    """Content hash of a local data file or, for a hub dataset, of its name (its revision is the
    hub's concern)."""
    p = resolve_path(path)
    if p is None:
        return hashlib.sha256(path.encode()).hexdigest()[:16]
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def _rows(src: DataSource) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) pairs; `where` is 'file:line' for JSONL so errors can point at the line."""
    p = resolve_path(src.path)
    if p is not None and p.suffix == ".jsonl":
        with p.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad = raw[e.start : e.start + 1]
                    raise ConfigError(
                        f"{p}:{n}: not UTF-8 text (byte {e.start}: {bad!r})"
                    ) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{p}:{n}: malformed JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ConfigError(f"{p}:{n}: expected a JSON object, got {type(row).__name__}")
                yield f"{p}:{n}", row
        return
    import datasets  # local Parquet/JSON files and hub names

    try:
        if p is not None:
            fmt = {".parquet": "parquet", ".json": "json"}.get(p.suffix)
            if fmt is None:
                raise ConfigError(f"{p}: unsupported data format (use .jsonl, .json or .parquet)")
            ds = datasets.load_dataset(fmt, data_files=str(p), split=src.split)
        else:
            ds = datasets.load_dataset(src.path, split=src.split)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad input
        raise ConfigError(f"cannot load data {src.path!r}: {type(e).__name__}: {e}") from None
    for n, row in enumerate(ds):
        yield f"{p or src.path}:row {n}", row


def _messages(where: str, row: dict[str, Any], src: DataSource) -> list[dict[str, str]]:
    if src.prompt_column is not None:
        if src.prompt_column not in row:
            raise ConfigError(f"{where}: missing column {src.prompt_column!r} (columns: "
                              f"{', '.join(row)})")
        text = row[src.prompt_column]
        if not isinstance(text, str):
            raise ConfigError(f"{where}: column {src.prompt_column!r} must be a string")
        return [{"role": "user", "content": text}]
    col = src.messages_column
    if col not in row:
        raise ConfigError(f"{where}: missing column {col!r} (columns: {', '.join(row)})")
    msgs = row[col]
    def message(m: Any) -> bool:
        return isinstance(m, dict) and "role" in m and "content" in m

    if not isinstance(msgs, list) or not all(message(m) for m in msgs):
        raise ConfigError(f"{where}: column {col!r} must be a list of {{role, content}} messages")
    for i, m in enumerate(msgs):
        if m["role"] not in ("system", "user", "assistant") or not isinstance(m["content"], str):
            raise ConfigError(f"{where}: message {i} must have a role of system, user or assistant "
                              f"and text content (a string), not role {m['role']!r} with "
                              f"{type(m['content']).__name__} content")
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]  # the teacher writes the answer
    if not msgs or msgs[-1]["role"] != "user":
        raise ConfigError(f"{where}: the conversation must end with a user turn")
    return msgs


def _heldout_by_hash(pid: str, fraction: float) -> bool:
    return int(hashlib.sha256(pid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def load_prompts(src: DataSource) -> list[Prompt]:
    """All usable prompts of a source in file order; raises ConfigError on malformed rows or an
    empty set."""
    out: list[Prompt] = []
    seen: dict[str, str] = {}
    for where, row in _rows(src):
        messages = _messages(where, row, src)
        if not messages[-1]["content"].strip():
            raise ConfigError(f"{where}: empty prompt")
        if src.id_column is not None:
            if src.id_column not in row:
                raise ConfigError(f"{where}: missing column {src.id_column!r} (or set id_column: "
                                  "null)")
            pid = str(row[src.id_column])
        else:
            pid = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
        if not pid or "/" in pid or pid != pid.strip():
            raise ConfigError(f"{where}: id {pid!r} must be non-empty, without '/' or surrounding "
                              "spaces (record ids are <prompt id>/<teacher>/<sample>)")
        if pid in seen:
            raise ConfigError(f"{where}: duplicate id {pid!r} (first at {seen[pid]})")
        seen[pid] = where
        if src.heldout_column is not None and src.heldout_column in row:
            heldout = row[src.heldout_column] == "heldout"
        else:
            heldout = _heldout_by_hash(pid, src.heldout_fraction)
        ref = row.get("reference")
        out.append(Prompt(pid, messages, heldout, ref if isinstance(ref, str) else None))
        if src.limit is not None and len(out) >= src.limit:
            break
    if not out:
        raise ConfigError(f"empty prompt set: {src.path} has no prompts")
    return out

"""Value checks shared by the config schema (cascade/config.py): ranges, safe names, no secrets.

Each raises ConfigError naming the field, never echoing a secret's value.
"""

from __future__ import annotations

import math
import re
from typing import Any, NoReturn


class ConfigError(ValueError):
    """A configuration or input problem found before any expensive work started."""


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # names that become paths: no '/', no leading '.'
DTYPES = ("auto", "float32", "bfloat16", "float16")
# values that look like credentials: hub, OpenAI-style, GitHub, AWS and Slack tokens, and bearer headers
SECRET_RE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|"
                       r"xox[abpr]-[A-Za-z0-9-]{10,})|^Bearer\s")
SECRET_KEY_RE = re.compile(r"token|secret|password|passwd|api_?key|credential", re.I)


def fail(msg: str) -> NoReturn:
    raise ConfigError(msg)


def number(where: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False) -> None:
    """A finite number within [lo, hi] (an open end excludes the bound); else ConfigError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(f"{where} must be a finite number, not {value!r}")
    low = lo is not None and (value < lo or (lo_open and value == lo))
    high = hi is not None and (value > hi or (hi_open and value == hi))
    if low or high:
        if lo is not None and hi is None and not lo_open:
            fail(f"{where} must be >= {lo}" if lo != 1 else f"{where} must be > 0")
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        bounds = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}"
        fail(f"{where} must be in {bounds}, not {value!r}")


def safe_name(where: str, value: str) -> None:
    """A name that becomes part of a path: letters, digits, '_', '-', '.', not starting with '.'."""
    if not SAFE_NAME.fullmatch(str(value)):
        fail(f"{where} {value!r}: use letters, digits, '_', '-', '.' (not first), as it names a directory")


def no_secrets(where: str, value: Any, keys: bool = False) -> None:
    """Refuse credentials in config values (and, with `keys`, under credential-like keys of a free-form mapping):
    they would be saved in config.yaml. Tokens come from the environment."""
    if isinstance(value, dict):
        for k, v in value.items():
            if keys and SECRET_KEY_RE.search(str(k)) and v not in (None, "", False):
                fail(f"{where}.{k}: looks like a credential; config values are saved with the run, so pass "
                      f"secrets through the environment instead")
            no_secrets(f"{where}.{k}".lstrip("."), v, keys)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            no_secrets(f"{where}[{i}]", v, keys)
    elif isinstance(value, str) and SECRET_RE.search(value):
        fail(f"{where}: holds what looks like a token; config values are saved with the run, so pass secrets "
              f"through the environment instead")

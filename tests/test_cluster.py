"""Secure defaults: Ray starts with token auth and its dashboard on 127.0.0.1; requests without the
token fail."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, os, socket, urllib.request, urllib.error
    from cascade import cluster
    from cascade.config import ClusterConfig
    cluster.ensure_auth_token()
    cluster.start(ClusterConfig(num_cpus=1, dashboard_port=int(os.environ["PORT"])))
    import ray
    url = ray._private.worker.get_dashboard_url()
    def get(headers):
        req = urllib.request.Request(f"http://{url}/api/version", headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=30).status
        except urllib.error.HTTPError as e:
            return e.code
    print(json.dumps({"url": url, "mode": os.environ.get("RAY_AUTH_MODE"), "anon": get({}),
                      "authed": get({"Authorization": "Bearer " + os.environ["RAY_AUTH_TOKEN"]})}))
    cluster.stop()
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dashboard_is_local_and_needs_the_token():
    import json
    import os

    env = {**os.environ, "RAY_AUTH_TOKEN": "cascade-test-token-0123456789abcdef",
           "PORT": str(_free_port())}
    env.pop("RAY_AUTH_MODE", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mode"] == "token"
    assert out["url"].startswith("127.0.0.1:")
    assert out["anon"] in (401, 403) and out["authed"] == 200, out
    assert env["RAY_AUTH_TOKEN"] not in r.stdout + r.stderr  # never logged


@pytest.mark.slow
def test_a_taken_dashboard_port_falls_back_to_a_free_one_and_says_so():
    """A second cascade on the machine (another experiment, or tests run two at a time) finds the
    dashboard's port held by the first: its dashboard goes on a free port, named in the log, instead
    of Ray failing to bind."""
    import json
    import os
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**os.environ, "RAY_AUTH_TOKEN": "cascade-test-token-0123456789abcdef",
               "PORT": str(port)}
        env.pop("RAY_AUTH_MODE", None)
        r = subprocess.run([sys.executable, "-c",
                            "import logging; logging.basicConfig(level='INFO')\n" + SCRIPT],
                           env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    got = int(out["url"].rsplit(":", 1)[1])
    assert got != port and out["authed"] == 200, out
    want = (f"the dashboard port {port} on 127.0.0.1 is taken (another Ray on this machine?): "
            f"using {got}")
    assert want in r.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("ray_start")  # a `ray start` head: fixed default ports, one at a time
def test_joined_cluster_without_auth_is_refused(tmp_path):
    """cluster=multinode joins a running cluster; one started without token auth is refused before
    any step runs."""
    import os

    from conftest import ray_start_ports, run_cli, stop_nodes

    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    import shutil
    import tempfile
    from pathlib import Path

    ray_cli = str(Path(sys.executable).parent / "ray")
    # Ray's socket paths must stay under 108 bytes
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    up = subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1",
                         "--include-dashboard=true",
                         f"--ray-client-server-port={_free_port()}", *ray_start_ports(),
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                         f"--temp-dir={ray_tmp}"],
                        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        r = run_cli("+stage=4b", "models=tiny", "cluster=multinode",
                    f"cluster.address=127.0.0.1:{port}", f"run_dir={tmp_path}/run")
        assert r.returncode == 2, r.stdout[-3000:]
        assert "does not enforce auth" in r.stdout and "cluster.auth=false" in r.stdout
        assert not list((tmp_path / "run").glob("generations/**/shard-?????.jsonl"))
    finally:
        stop_nodes(ray_tmp)  # not `ray stop`: it would stop every Ray on this machine
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_a_dead_clusters_address_file_is_not_followed():
    """`ray start` clusters that died unstopped leave <ray tmp>/ray_current_cluster behind; a plain
    ray.init() would try to join that dead address. cluster=local always starts a Ray of its own."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # Ray's socket paths must stay short
    (Path(ray_tmp) / "ray").mkdir()
    (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}\n")
    script = ("from cascade import cluster\nfrom cascade.config import ClusterConfig\n"
              "cluster.start(ClusterConfig(num_cpus=1, auth=False, include_dashboard=False))\n"
              "import ray\nprint('CPUS', ray.cluster_resources()['CPU'])\ncluster.stop()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        r = subprocess.run([sys.executable, "-c", script], env={**env, "RAY_TMPDIR": ray_tmp},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "CPUS 1.0" in r.stdout, r.stderr[-3000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


OWN = textwrap.dedent("""
    import json, os
    from cascade import cluster
    from cascade.config import ClusterConfig
    before = os.environ.get("RAY_ADDRESS")
    cluster.start(ClusterConfig(num_cpus=1, auth=False, dashboard_port=int(os.environ["PORT"])))
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def who(self):  # what Ray Train's placement-group cleaner does: the state API, no address
            from ray._private.services import canonicalize_bootstrap_address
            from ray.util.state import get_actor
            me = get_actor(ray.get_runtime_context().get_actor_id(), timeout=30)
            return {"auto": canonicalize_bootstrap_address("auto"), "seen": me and me.state,
                    "own": ray.get_runtime_context().gcs_address}

    print("WHO", json.dumps(ray.get(Probe.remote().who.remote())))
    cluster.stop()
    print("RESTORED", os.environ.get("RAY_ADDRESS") == before)
""")


@pytest.mark.slow
@pytest.mark.xdist_group("ray_start")
def test_processes_inside_the_cluster_find_their_own_ray_beside_another(tmp_path):
    """A second Ray on the machine (another cascade, `ray start`): code inside our cluster that
    looks its Ray up by itself (the state API, as Ray Train's placement-group cleaner does every
    second) finds ours, not the other. Without that, the cleaner of a run saw its live Train
    controller as gone and removed its placement group: a training worker SIGTERMed (2026-12-04)."""
    import json
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from conftest import ray_start_ports, stop_nodes

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    up = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head",
                         f"--port={_free_port()}", "--num-cpus=1", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}",
                         f"--ray-client-server-port={_free_port()}", *ray_start_ports(),
                         f"--temp-dir={ray_tmp}"], env={**env, "RAY_AUTH_MODE": "disabled"},
                        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        r = subprocess.run([sys.executable, "-c", OWN], capture_output=True, text=True,
                           timeout=300, env={**env, "PORT": str(_free_port())})
        assert r.returncode == 0, r.stderr[-3000:]
        who = json.loads(r.stdout.split("WHO ", 1)[1].splitlines()[0])
        assert who["auto"] == who["own"] and who["seen"] == "ALIVE", who
        assert "RESTORED True" in r.stdout
    finally:
        stop_nodes(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


FIT = textwrap.dedent("""
    import json, sys, time
    import psutil
    from cascade import cluster
    from cascade.config import compose
    from cascade.graph import PhaseGraph
    from cascade.rundir import RunDir, Step
    from cascade.tiny import preset_dir
    from cascade.trainer import TrainJob
    from stages.train import fit
    cfg = compose(["+stage=4b", "models=tiny", "cluster.auth=false",
                   "cluster.include_dashboard=false"])
    rd = RunDir(sys.argv[1])
    data = Step("4b/dataset/p0_ethics", "d", rd.dataset("4b", "p0_ethics"))
    model = Step("4b/train/again", "again", rd.model("4b", 0, "again"))
    phase = PhaseGraph(0, "p0_ethics", "ethics", 2, 1e-3, data, model)
    cluster.start(cfg.cluster)
    job = TrainJob("4b", rd.url, str(preset_dir(cfg) / "4b"), None, [phase], cfg.train, cfg.seed)
    fit(job, rd, "again")
    def left():  # Ray Train's processes of the finished job still running under this driver
        titles = set()
        for p in psutil.Process().children(recursive=True):
            try:
                titles.add(" ".join(p.cmdline()).strip())
            except psutil.Error:
                pass
        kinds = ("ray::TrainController", "ray::DatasetManager")
        return sorted(t for t in titles if t.startswith(kinds))
    deadline = time.time() + 30
    while left() and time.time() < deadline:
        time.sleep(0.5)
    print("LEFT", json.dumps(left()))
    cluster.stop()
""")


@pytest.mark.slow
def test_a_finished_training_job_leaves_no_controller_behind(tiny_4b_run, tmp_path):
    """Ray Train's fit() keeps its controller (and dataset manager) alive through the Ctrl-C handler
    it installs; stages/train.fit puts the previous handler back, so they go as the job ends, not at
    the next job."""
    from conftest import copy_run

    run = copy_run(tiny_4b_run, tmp_path / "run")
    r = subprocess.run([sys.executable, "-c", FIT, str(run)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LEFT []" in r.stdout, r.stdout[-2000:]

"""Secure defaults: Ray starts with token auth and its dashboard on 127.0.0.1; requests without the token fail."""

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

    env = {**os.environ, "RAY_AUTH_TOKEN": "cascade-test-token-0123456789abcdef", "PORT": str(_free_port())}
    env.pop("RAY_AUTH_MODE", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mode"] == "token"
    assert out["url"].startswith("127.0.0.1:")
    assert out["anon"] in (401, 403) and out["authed"] == 200, out
    assert env["RAY_AUTH_TOKEN"] not in r.stdout + r.stderr  # never logged

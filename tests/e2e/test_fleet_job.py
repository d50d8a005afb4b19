"""`megatron-trace fleet-job` on one CPU node, as a Slurm job's task runs it (no Slurm here: the
node list is this host): two keyed fixture servers (`tests/sglang_fixture_server.py --api-key-env`)
behind the real sglang-router started through `megatron_trace.fleet.serve router` (which gives
the router the key in-process), then 3 one-step-off training steps through the router, with the
weights broadcast to both servers. The key is in no process's command line while it runs and in
no file of the run afterwards. The real one-node Slurm test (tests/e2e/test_slurm_cluster.py)
submits the same through launch/slurm.py --rollout-nodes 1."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tests"))
from fixture_processes import fleet_config, free_base_port  # noqa: E402

pytestmark = pytest.mark.dist


def _cmdlines_with(secret: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if secret in cmd:
                found.append(cmd)
    return found


def test_fleet_job_starts_keyed_servers_and_a_router_and_trains_through_them(tmp_path):
    pytest.importorskip("sglang_router", reason="sglang-router is installed by `make` (PyPI sglang-router)")
    config = fleet_config(tmp_path, rollout_nodes=2, port=free_base_port())
    key = "mt-" + secrets.token_hex(16)
    env = {**os.environ, "MT_FLEET_API_KEY": key, "GLOO_SOCKET_IFNAME": "lo", "NO_PROXY": "*", "no_proxy": "*",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    for k in ("SLURM_JOB_NODELIST", "SLURM_NODEID", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(k, None)
    log = tmp_path / "fleet_job.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_trace.cli", "fleet-job", "--config", config],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        seen = []
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            seen += _cmdlines_with(key)  # no process shows the key on its command line
            time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert not seen, seen
    assert "[fleet] " in text and "2 server(s) healthy" in text
    run = tmp_path / "run"
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["async/age_max"] for r in rows] == [0, 1, 1]  # one-step-off, versions through the router
    assert all(r["dispatch/engines_used"] == 1 and r["rollout/failed_prompts"] == 0 for r in rows)  # the router
    assert sorted(os.listdir(run / "fleet")) == ["done", "router.log", *sorted(
        f for f in os.listdir(run / "fleet") if f.endswith("_server0.log") or f.endswith("_server1.log"))]
    cfg_text = (run / "config.yaml").read_text()
    assert "api_key_env: MT_FLEET_API_KEY" in cfg_text and "router_url: http://" in cfg_text
    for root, _, files in os.walk(tmp_path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert key.encode() not in fh.read(), os.path.join(root, f)

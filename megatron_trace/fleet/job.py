"""One node's part of a Slurm job that starts its own rollout fleet (`launch/slurm.py
--rollout-nodes K`; `megatron-trace fleet-job --config CFG` runs once per node).

GPU jobs: nodes 0..K-1 are rollout nodes. Each runs gpus_per_node / rollout.server_tp servers
(`cluster.rollout_server_cmd`, server j on GPUs j*server_tp.., port cluster.rollout_port + 1 + j),
and node 0 also runs sglang-router (`cluster.rollout_router_cmd`, port cluster.rollout_port)
when there is more than one server. Nodes K.. train: they wait for /health on every server (up
to cluster.rollout_start_timeout_s, then a clear error naming the silent servers), then run
`torchrun ... megatron_trace.cli train` with rollout.remote.urls, router_url and api_key_env
filled in, and the weight-sync address (rollout.remote.master_address) set to the first trainer
node unless the config names one.
CPU jobs (one node): the node runs K servers and then the trainer, side by side.

The key: the job script exports a fresh random key in MT_FLEET_API_KEY before this runs (see
`KEY_LINES`); the servers and the router read it through `--api-key-env` (see `serve.py`) and the
trainer through rollout.remote.api_key_env. It is never written to a file, a log or a command
line.

When the trainer ends, its node writes `<run.dir>/fleet/done`; the rollout nodes, which wait
for that file, then stop their servers. Server and router logs go to `<run.dir>/fleet/`.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

__all__ = ["API_KEY_ENV", "KEY_LINES", "FleetPlan", "Server", "main", "plan_fleet", "servers_per_node",
           "stop_processes", "trainer_overrides", "wait_for_health"]

log = logging.getLogger(__name__)

API_KEY_ENV = "MT_FLEET_API_KEY"
# The lines the job script runs before the task: a fresh key per job, in the environment only.
# NeMo-Run's script runs under `set -x`, which would print the expanded value: tracing is off
# while the key is made.
KEY_LINES = ["# the rollout fleet's API key, made in the job (tracing off: `set -x` would print it)",
             "{ set +x; } 2>/dev/null",
             f'export {API_KEY_ENV}="$(python -c \'import secrets; print(secrets.token_urlsafe(32))\')"',
             "set -x"]
TORCHRUN_PORT = 29500


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    gpu: int  # its first GPU on the node

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class FleetPlan:
    servers: list[Server]
    router: Server | None  # sglang-router on the first rollout node, with more than one server
    rollout_hosts: list[str]
    trainer_hosts: list[str]
    cpu: bool

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def on(self, host: str) -> list[Server]:
        return [s for s in self.servers if s.host == host]


def servers_per_node(cfg, cpu: bool) -> int:
    """Servers on each rollout node: one per rollout.server_tp GPUs; a CPU job's one node holds
    all cluster.rollout_nodes of them."""
    return cfg.cluster.rollout_nodes if cpu else cfg.cluster.gpus_per_node // cfg.rollout.server_tp


def plan_fleet(cfg, hosts: list[str], cpu: bool) -> FleetPlan:
    """Where every server (and the router) runs, from the job's node list."""
    c, tp = cfg.cluster, cfg.rollout.server_tp
    k = c.rollout_nodes
    if k < 1:
        raise ValueError("cluster.rollout_nodes is 0: this job has no fleet to start")
    per_node = servers_per_node(cfg, cpu)
    if cpu:  # one node: K servers next to the trainer
        rollout, trainers = hosts[:1], hosts[:1]
    else:
        if len(hosts) <= k:
            raise ValueError(f"cluster.rollout_nodes={k} leaves no node to train on (the job has {len(hosts)})")
        rollout, trainers = hosts[:k], hosts[k:]
    servers = [Server(h, c.rollout_port + 1 + j, 0 if cpu else j * tp) for h in rollout for j in range(per_node)]
    router = Server(rollout[0], c.rollout_port, 0) if len(servers) > 1 else None
    return FleetPlan(servers, router, rollout, trainers, cpu)


def trainer_overrides(plan: FleetPlan, master_address: str | None = None) -> list[str]:
    """What the trainer adds to its config to use the fleet. master_address: the config's
    rollout.remote.master_address; unset, the weight broadcast is hosted by the first trainer
    node, as the servers reach it (the job's node name)."""
    over = ["rollout.remote.urls=[" + ",".join(f'"{u}"' for u in plan.urls) + "]",
            f"rollout.remote.api_key_env={API_KEY_ENV}"]
    if plan.router is not None:
        over.append(f"rollout.remote.router_url={plan.router.url}")
    if master_address is None:
        over.append(f"rollout.remote.master_address={plan.trainer_hosts[0]}")
    return over


def server_command(cfg, s: Server) -> list[str]:
    return shlex.split(cfg.cluster.rollout_server_cmd.format(
        model=cfg.model.hf_dir, host="0.0.0.0", port=s.port, tp=cfg.rollout.server_tp, gpu=s.gpu,
        mem=cfg.cluster.rollout_mem_fraction, api_key_env=API_KEY_ENV, workers=""))


def router_command(cfg, plan: FleetPlan) -> list[str]:
    r = plan.router
    return shlex.split(cfg.cluster.rollout_router_cmd.format(
        workers=" ".join(plan.urls), host="0.0.0.0", port=r.port, api_key_env=API_KEY_ENV, model=cfg.model.hf_dir,
        tp=cfg.rollout.server_tp, gpu=0, mem=cfg.cluster.rollout_mem_fraction))


def wait_for_health(urls: list[str], timeout_s: float, procs: list | None = None, poll_s: float = 2.0) -> float:
    """Block until GET /health answers on every URL; returns the seconds waited. Raises
    RuntimeError naming the servers still silent after timeout_s, or the local process that died
    (with its log's last lines)."""
    from ..rollout.sglang import RemoteSGLangEngine

    t0 = time.monotonic()
    todo = list(urls)
    while todo:
        for p in procs or []:
            if p.poll() is not None:
                raise RuntimeError(f"fleet process `{' '.join(p.args[:4])} ...` exited with code {p.returncode} before "
                                   f"the fleet was up; its log ({p.log_path}) ends with:\n{_tail(p.log_path)}")
        todo = [u for u in todo if not RemoteSGLangEngine(u, health_timeout_s=5.0).health()]
        if not todo:
            break
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"{len(todo)} of {len(urls)} rollout server(s) did not answer /health within "
                               f"{timeout_s:g} s (cluster.rollout_start_timeout_s): {', '.join(todo)}")
        time.sleep(poll_s)
    return time.monotonic() - t0


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no log)"


def _hosts() -> list[str]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 check=True, timeout=60).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("scontrol show hostnames %s failed (%s); using this node alone", nodelist, exc)
    return [socket.gethostname()]


def _start(cmd: list[str], log_path: str):
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log_path
    return proc


def stop_processes(procs: list, timeout_s: float = 30.0) -> None:
    """SIGTERM each process, then SIGKILL the ones still alive after timeout_s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _trainer_command(cfg, config: str, plan: FleetPlan, node: int, extra: list[str]) -> list[str]:
    train = ["-m", "megatron_trace.cli", "train", "--config", config,
             *trainer_overrides(plan, cfg.rollout.remote.master_address), *extra]
    if plan.cpu:
        return [sys.executable, *train]
    k = cfg.cluster.rollout_nodes
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(plan.trainer_hosts)}",
            f"--nproc-per-node={cfg.cluster.gpus_per_node}", f"--node-rank={node - k}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={plan.trainer_hosts[0]}:{TORCHRUN_PORT}", *train]


def main(config: str, extra: list[str] | None = None, *, hosts: list[str] | None = None,
         node: int | None = None) -> int:
    """This node's part of the job; returns its exit code (the trainer's on trainer nodes)."""
    from ..config import load_config

    cfg = load_config(config, list(extra or []))
    if not os.environ.get(API_KEY_ENV):
        raise SystemExit(f"error: {API_KEY_ENV} is not set; the job script exports a fresh key there "
                         f"({KEY_LINES[2]})")
    cpu = cfg.cluster.gpus_per_node == 0 or cfg.parallel.device == "cpu"
    hosts = hosts or _hosts()
    node = int(os.environ.get("SLURM_NODEID", "0")) if node is None else node
    plan = plan_fleet(cfg, hosts, cpu)
    here = hosts[node] if node < len(hosts) else socket.gethostname()
    fleet_dir = os.path.join(cfg.run.dir, "fleet")
    os.makedirs(fleet_dir, exist_ok=True)
    done = os.path.join(fleet_dir, "done")
    rollout_node = cpu or node < cfg.cluster.rollout_nodes
    procs = []
    try:
        if rollout_node:
            if node == 0 and os.path.exists(done):
                os.remove(done)  # a resubmitted job
            for j, s in enumerate(plan.on(here) if not cpu else plan.servers):
                procs.append(_start(server_command(cfg, s), os.path.join(fleet_dir, f"{here}_server{j}.log")))
            print(f"[fleet] {here}: {len(procs)} server(s) starting: "
                  + ", ".join(s.url for s in (plan.servers if cpu else plan.on(here))), flush=True)
        if not (cpu or node >= cfg.cluster.rollout_nodes):  # a rollout node only: serve until the trainer is done
            if node == 0 and plan.router is not None:
                wait_for_health(plan.urls, cfg.cluster.rollout_start_timeout_s, procs)
                procs.append(_start(router_command(cfg, plan), os.path.join(fleet_dir, "router.log")))
                print(f"[fleet] router at {plan.router.url} over {len(plan.servers)} servers", flush=True)
            while not os.path.exists(done):
                time.sleep(2.0)
            print(f"[fleet] {here}: the trainer is done; stopping", flush=True)
            return 0
        waited = wait_for_health(plan.urls, cfg.cluster.rollout_start_timeout_s, procs)
        if plan.router is not None:
            if cpu:
                procs.append(_start(router_command(cfg, plan), os.path.join(fleet_dir, "router.log")))
            wait_for_health([plan.router.url], cfg.cluster.rollout_start_timeout_s, procs)
        print(f"[fleet] {len(plan.servers)} server(s) healthy after {waited:.0f} s; training", flush=True)
        cmd = _trainer_command(cfg, config, plan, node, list(extra or []))
        rc = subprocess.call(cmd)
        if not plan.cpu and node != cfg.cluster.rollout_nodes:
            return rc
        with open(done, "w") as f:
            f.write(f"{rc}\n")
        return rc
    finally:
        stop_processes(procs)

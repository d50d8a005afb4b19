"""Shared pieces of the NeMo-Run launchers: validate the config, build the `megatron-trace train`
task, render or submit an experiment.

The task is `python -m megatron_trace.cli train --config <config> [overrides]` (the module form
of `megatron-trace train`), run under torchrun. The config is resolved and validated here before
anything is rendered or submitted; the job resolves the same file and overrides again on the
cluster and writes the resolved copy to `<run.dir>/config.yaml`. A copy of the resolved config is
also written next to the rendered scripts. Code reaches the nodes through NeMo-Run's
GitArchivePackager (the committed tree of this repository, unpacked at /nemo_run/code), so
configs must be committed; the container image must hold the dependencies
(`pip install -e ".[gpu,sglang]"` on an NGC PyTorch image).

Layout (DESIGN section 11): a job starts WORLD = tp x pp x dp ranks, one per GPU (gloo ranks on
CPU). The launchers derive dp = WORLD / (tp x pp) from the job's size (nodes x GPUs per node,
or the local process count) and refuse a size that tp x pp does not divide, or one that
disagrees with an explicit `parallel.dp`. The trainer derives the same dp from WORLD_SIZE
(`megatron_trace.parallel.resolve_dp`), so recipes keep `parallel.dp: null`. With
`rollout.placement=colocated` every replica runs one rollout engine on its first TP group's
GPUs (SGLang tp_size = parallel.tp), so there are dp engines; `remote` puts none on the trainer.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def resolve(config: str, overrides: list[str]):
    from megatron_trace.config import ConfigError, dump_config, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    return cfg, dump_config(cfg)


@dataclass(frozen=True)
class Layout:
    """How a job's ranks split up, and where its rollout engines run."""

    tp: int
    pp: int
    dp: int
    world: int
    engines: int  # rollout engines on the trainer's GPUs: dp (colocated), 1 (rank0), 0 (remote)
    placement: str
    where: str  # how the world size came about, e.g. "2 nodes x 8 GPUs"
    rollout: str  # the engines in words

    def line(self) -> str:
        return (f"layout tp={self.tp} pp={self.pp} dp={self.dp} ({self.world} ranks = {self.where}), "
                f"engines={self.engines} ({self.rollout})")


def plan_layout(cfg, world: int, where: str, *, keys: str = "", gpus_per_node: int | None = None,
                nodes: int = 1) -> Layout:
    """The layout of `world` ranks under cfg, or SystemExit naming the keys to change.

    where: how the world size came about ("2 nodes x 8 GPUs", "--nproc 4"); keys: the settings
    behind it, named in the errors. gpus_per_node (GPU jobs): a colocated SGLang engine lives on
    one node, so a TP group must not straddle two."""
    p, r = cfg.parallel, cfg.rollout
    src = f"{where}{'; ' + keys if keys else ''}"
    mp = p.tp * p.pp
    if world < 1 or world % mp:
        raise SystemExit(f"error: parallel.tp={p.tp} x parallel.pp={p.pp} = {mp} does not divide the job's {world} "
                         f"rank(s) ({src}); change parallel.tp / parallel.pp or the job size")
    dp = world // mp
    if p.dp is not None and p.dp != dp:
        raise SystemExit(f"error: parallel.dp={p.dp} disagrees with the job: {world} rank(s) ({src}) at "
                         f"parallel.tp={p.tp} x parallel.pp={p.pp} give dp={dp}; set parallel.dp=null to derive it "
                         f"(or parallel.dp={dp})")
    if cfg.train.mode == "train_only":
        engines, rollout = 0, "train.mode=train_only: no rollouts"
    elif r.placement == "colocated":
        engines = dp
        rollout = f"colocated {r.engine}, one per DP replica"
        if r.engine == "sglang":
            rollout += f", tp_size={p.tp}, mem_fraction_static={r.mem_fraction_static:g}"
            if gpus_per_node and nodes > 1 and gpus_per_node % p.tp:
                raise SystemExit(f"error: parallel.tp={p.tp} does not divide cluster.gpus_per_node={gpus_per_node}: "
                                 "some TP groups straddle two nodes, and a colocated SGLang engine "
                                 "(rollout.placement=colocated) runs on one node's GPUs; change parallel.tp or "
                                 "cluster.gpus_per_node, or use rollout.placement=remote")
    elif r.placement == "rank0":
        engines, rollout = 1, f"rank0 {r.engine} (debugging)"
    else:
        servers = f"router {r.remote.router_url}" if r.remote.router_url else f"{len(r.remote.urls)} server(s)"
        engines, rollout = 0, f"remote: {servers}"
    return Layout(p.tp, p.pp, dp, world, engines, r.placement, where, rollout)


def cluster_layout(cfg) -> Layout:
    """The layout of a Slurm job of cfg.cluster.nodes x cfg.cluster.gpus_per_node GPUs."""
    c = cfg.cluster
    return plan_layout(cfg, c.nodes * c.gpus_per_node, f"{c.nodes} node{'s' * (c.nodes > 1)} x {c.gpus_per_node} GPUs",
                       keys=f"cluster.nodes={c.nodes} x cluster.gpus_per_node={c.gpus_per_node}",
                       gpus_per_node=c.gpus_per_node, nodes=c.nodes)


def repo_relative(path: str) -> str:
    """The config's path inside the packaged code (/nemo_run/code is the working directory)."""
    full = os.path.abspath(path)
    if not full.startswith(REPO + os.sep):
        raise SystemExit(f"error: --config {path} must live inside the repository ({REPO}) to be packaged")
    return os.path.relpath(full, REPO)


def train_task(config: str, overrides: list[str]):
    import nemo_run as run

    return run.Script(path="megatron_trace.cli", entrypoint="python", m=True,
                      args=["train", "--config", repo_relative(config), *overrides])


def render(exp_title: str, jobs: list[tuple[str, object, object]], out_dir: str, resolved: dict[str, str],
           dry_run: bool, detach: bool = True) -> list[str]:
    """jobs: (name, task, executor). Dry run: write the rendered scripts (sbatch for Slurm) and the
    resolved configs into out_dir and return their paths; otherwise submit."""
    import nemo_run as run

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, text in resolved.items():
        path = os.path.join(out_dir, f"{name}.resolved.yaml")
        with open(path, "w") as f:
            f.write(text)
        written.append(path)
    base = os.path.join(out_dir, "nemo_experiments")
    with run.Experiment(exp_title, base_dir=base, log_level="WARN") as exp:
        for name, task, executor in jobs:
            exp.add(task, executor=executor, name=name)
        if not dry_run:
            exp.run(detach=detach)
            return written
        exp.dryrun(log=False, delete_exp_dir=False)
        exp_dir = exp._exp_dir
    for f in sorted(glob.glob(os.path.join(exp_dir, "**", "*_sbatch.sh"), recursive=True)):
        dst = os.path.join(out_dir, os.path.basename(f))
        shutil.copyfile(f, dst)
        written.append(dst)
    shutil.rmtree(base, ignore_errors=True)
    return written


def slurm_executor(*, account: str, partition: str, nodes: int, gpus_per_node: int, container_image: str,
                   mounts: list[str], time: str, job_dir: str, dry_run: bool, env: dict[str, str] | None = None):
    import nemo_run as run

    tunnel = run.LocalTunnel(job_dir=job_dir)
    return run.SlurmExecutor(
        account=account, partition=partition, nodes=nodes, ntasks_per_node=gpus_per_node, gpus_per_node=gpus_per_node,
        time=time, container_image=container_image, container_mounts=list(mounts), tunnel=tunnel,
        packager=run.GitArchivePackager(), launcher="torchrun", exclusive=True,
        env_vars={"PYTHONPATH": "/nemo_run/code", "NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                  **(env or {})})

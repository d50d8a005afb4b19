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
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def resolve(config: str, overrides: list[str]):
    from megatron_trace.config import ConfigError, dump_config, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    return cfg, dump_config(cfg)


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

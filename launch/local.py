#!/usr/bin/env python
"""Launch `megatron-trace train` on this machine through NeMo-Run's LocalExecutor with torchrun.

    python launch/local.py --config configs/tiny_cpu.yaml [--nproc N] [--dry-run] [key=value ...]

The run starts tp x pp x dp ranks. --nproc N sets the count (dp = N / (tp x pp)); without it:
on CPU (parallel.device=cpu, or auto with no GPU) tp x pp x parallel.dp gloo ranks (dp null
counts as 1); on GPUs tp x pp x parallel.dp when dp is set, else one rank per visible GPU (dp =
GPUs / (tp x pp)). A count that tp x pp does not divide, or that disagrees with an explicit
parallel.dp, is refused. The layout line (stderr) gives tp, pp, dp and the rollout engines
(dp of them with rollout.placement=colocated). --dry-run prints the torchrun command NeMo-Run
would run and writes nothing else.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import resolve  # noqa: E402
from jobs import repo_relative, train_task  # noqa: E402
from layout import plan_layout  # noqa: E402


def _visible_gpus(device: str) -> int:
    if device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def world_size(cfg, nproc: int | None) -> tuple[int, str, bool]:
    """(ranks, how that count came about, on GPUs)."""
    p = cfg.parallel
    gpus = _visible_gpus(p.device)
    if p.device == "cuda" and not gpus:
        raise SystemExit("error: parallel.device=cuda but no GPU is visible; use parallel.device=cpu (or auto)")
    if nproc is not None:
        return nproc, f"--nproc {nproc}", gpus > 0
    if not gpus:
        return p.tp * p.pp * (p.dp or 1), "CPU" if p.dp else "CPU, parallel.dp=null taken as 1", False
    if p.dp is not None:
        world = p.tp * p.pp * p.dp
        if world > gpus:
            raise SystemExit(f"error: parallel.tp={p.tp} x parallel.pp={p.pp} x parallel.dp={p.dp} = {world} ranks, "
                             f"but {gpus} GPU(s) are visible; lower parallel.dp (or set it to null)")
        return world, f"{world} of {gpus} visible GPU(s)", True
    return gpus, f"{gpus} visible GPU(s)", True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--nproc", type=int, default=None,
                   help="processes = tp x pp x dp (default: tp x pp x parallel.dp on CPU, one per visible GPU)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)

    cfg, _ = resolve(args.config, args.overrides)
    world, where, on_gpu = world_size(cfg, args.nproc)
    layout = plan_layout(cfg, world, where, gpus_per_node=world if on_gpu else None)
    import nemo_run as run

    # torchrun from this interpreter's environment, wherever the shell's PATH points
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    executor = run.LocalExecutor(ntasks_per_node=world, launcher="torchrun", env_vars={"PYTHONUNBUFFERED": "1"})
    task = train_task(repo_relative(args.config), args.overrides)
    print(f"[local] {cfg.run.name}: {layout.line()}; {'nccl' if on_gpu else 'gloo'}", file=sys.stderr)
    if args.dry_run:
        # The command NeMo-Run's torchx packaging produces for this executor (what `run.run` runs).
        import shutil
        import tempfile

        from nemo_run.run.torchx_backend.packaging import package

        tmp = tempfile.mkdtemp(prefix="mt_local_dry_")
        try:
            executor.assign(exp_id="dryrun", exp_dir=tmp, task_id=cfg.run.name, task_dir=cfg.run.name)
            role = package(cfg.run.name, task, executor, serialize_to_file=False).roles[0]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(" ".join([role.entrypoint, *role.args]))
        return 0
    run.run(task, executor=executor, name=cfg.run.name, tail_logs=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

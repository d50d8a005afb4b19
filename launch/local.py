#!/usr/bin/env python
"""Launch `megatron-trace train` on this machine through NeMo-Run's LocalExecutor with torchrun.

    python launch/local.py --config configs/tiny_cpu.yaml [--nproc N] [--dry-run] [key=value ...]

--nproc defaults to parallel.tp x parallel.pp (one data-parallel replica). --dry-run prints the
torchrun command NeMo-Run would run and writes nothing else. Without GPUs the ranks use gloo.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import resolve, train_task  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--nproc", type=int, default=None, help="processes (default: tp x pp)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)

    cfg, _ = resolve(args.config, args.overrides)
    nproc = args.nproc or cfg.parallel.tp * cfg.parallel.pp
    if nproc % (cfg.parallel.tp * cfg.parallel.pp):
        raise SystemExit(f"error: --nproc {nproc} is not a multiple of tp x pp = {cfg.parallel.tp * cfg.parallel.pp}")
    import nemo_run as run

    # torchrun from this interpreter's environment, wherever the shell's PATH points
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    executor = run.LocalExecutor(ntasks_per_node=nproc, launcher="torchrun", env_vars={"PYTHONUNBUFFERED": "1"})
    task = train_task(args.config, args.overrides)
    print(f"[local] {cfg.run.name}: {nproc} processes, tp={cfg.parallel.tp} pp={cfg.parallel.pp}", file=sys.stderr)
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

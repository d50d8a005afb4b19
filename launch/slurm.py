#!/usr/bin/env python
"""Launch `megatron-trace train` on Slurm through NeMo-Run's SlurmExecutor.

    # GPU, in a container (pyxis/enroot)
    python launch/slurm.py --config configs/qwen3_8b_trace_fkl.yaml --partition P [--account A] \\
        [--nodes 2] [--gpus-per-node 8] --container-image IMG [--mounts /lustre:/lustre ...] [--wait] [key=value ...]
    # CPU partition, no container (the job activates this interpreter's venv)
    python launch/slurm.py --config configs/tiny_cpu.yaml --partition batch --nodes 1 --gpus-per-node 0 \\
        --no-container --wait train.steps=2 run.dir=/shared/runs/tiny

The job's shape and the site profile come from the config's `cluster:` section (nodes,
gpus_per_node, cpus_per_node, time, account, partition, container_image, container_mounts,
venv, setup, exclusive, sbatch; per size in configs/base/size_*.yaml); every flag overrides its
key. GPU jobs: every GPU is a rank, nodes x gpus_per_node = tp x pp x dp (dp derived), one
torchrun per node. CPU jobs (--gpus-per-node 0 or parallel.device=cpu): one node, one core per
gloo rank, no GPU request. The layout line (stderr) gives tp, pp, dp and the rollout engines; a
layout that does not fit is refused before anything is submitted.

Relative paths (run.dir, data, models, MT_RUNS / MT_DATA / MT_MODELS) are made absolute against
the current folder; the resolved config is written into the job's folder and is what the job
trains on. The job folder (default <run.dir>/slurm) holds the sbatch script, the packaged code
and the logs; the launcher prints the job id, those paths and the commands to follow and cancel
the job. --wait blocks until the job ends and exits with its status. --dry-run renders the
sbatch script without a cluster into --out (default launch_out/<run.name>) and prints it, for
inspection only (not submittable).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    absolute_env,
    add_cluster_flags,
    cluster_overrides,
    prepare,
    resolve,
    split_mounts,
)
from jobs import (  # noqa: E402
    Job,
    code_packager,
    describe,
    render,
    report,
    slurm_executor,
    submit,
    wait,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    add_cluster_flags(p)
    p.add_argument("--out", default=None,
                   help="where --dry-run writes the rendered script and resolved config (default launch_out/<run.name>)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    split_mounts(args)

    absolute_env("slurm")
    cfg, _ = resolve(args.config, [*args.overrides, *cluster_overrides(args)])
    cfg, text, layout, cpu = prepare(cfg, args, "slurm")
    name = cfg.run.name
    print(f"[slurm] {name}: {layout.line()}", file=sys.stderr)
    if args.dry_run:
        out = os.path.abspath(args.out or os.path.join("launch_out", name))
        job_dir = os.path.join(out, "nemo_jobs")
    else:
        job_dir = os.path.abspath(args.job_dir or os.path.join(cfg.run.dir, "slurm"))
    packager, code = code_packager(args.code, "slurm", dry_run=args.dry_run, files={f"{name}.yaml": text})
    ex = slurm_executor(cfg, layout, cpu, job_dir=job_dir, packager=packager, tag="slurm", strict=not args.dry_run)
    job = Job(name, text, cfg, layout, cpu, ex)
    if args.dry_run:
        for f in render(f"mt-{name}", [job], out, job_dir):
            print(f"[slurm] rendered {f}", file=sys.stderr)
            if f.endswith(".sh"):
                print(open(f).read())
        return 0
    print(f"[slurm] code: {code}", file=sys.stderr)
    subs = submit(f"mt-{name}", [job], job_dir)
    for sub in subs:
        report("slurm", sub, describe(job))
    return wait("slurm", subs) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Launch `megatron-trace train` on Slurm through NeMo-Run's SlurmExecutor (torchrun per node).

    python launch/slurm.py --config configs/qwen3_8b_trace_fkl.yaml --account A --partition P \\
        [--nodes 2] [--gpus-per-node 8] --container-image IMG [--mounts /lustre:/lustre ...] \\
        [--time 08:00:00] [--job-dir DIR] [--out DIR] [--dry-run] [key=value ...]

Nodes, GPUs per node and time default to the config's `cluster.*` keys (set per size in
configs/base/size_*.yaml). Every GPU is a rank: the job starts nodes x gpus_per_node =
tp x pp x dp ranks, dp = nodes x gpus_per_node / (tp x pp). A size that tp x pp does not divide,
or that disagrees with an explicit parallel.dp, is refused. The layout line (stderr) gives tp,
pp, dp and the rollout engines: dp of them with rollout.placement=colocated, 0 with remote.

--dry-run renders the sbatch script with no cluster and no ssh (LocalTunnel +
Experiment.dryrun) into --out (default launch_out/<run.name>) and prints it.
Run from a login node that shares the job directory with the compute nodes (--job-dir).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cluster_layout, render, resolve, slurm_executor, train_task  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--account", required=True)
    p.add_argument("--partition", required=True)
    p.add_argument("--nodes", type=int, default=None, help="default: cluster.nodes of the config")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: cluster.gpus_per_node")
    p.add_argument("--container-image", required=True)
    p.add_argument("--mounts", nargs="*", default=[], help="container mounts, SRC:DST")
    p.add_argument("--time", default=None, help="default: cluster.time")
    p.add_argument("--job-dir", default=None,
                   help="shared directory for job files and logs (default: ./nemo_jobs; <out>/nemo_jobs with --dry-run)")
    p.add_argument("--out", default=None, help="where --dry-run writes the rendered script")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)

    over = list(args.overrides)
    if args.nodes is not None:
        over.append(f"cluster.nodes={args.nodes}")
    if args.gpus_per_node is not None:
        over.append(f"cluster.gpus_per_node={args.gpus_per_node}")
    cfg, text = resolve(args.config, over)
    layout = cluster_layout(cfg)  # refuses a size the layout does not fit, before anything is rendered
    print(f"[slurm] {cfg.run.name}: {layout.line()}", file=sys.stderr)
    out = args.out or os.path.join("launch_out", cfg.run.name)
    job_dir = os.path.abspath(args.job_dir or (os.path.join(out, "nemo_jobs") if args.dry_run else "nemo_jobs"))
    ex = slurm_executor(account=args.account, partition=args.partition, nodes=cfg.cluster.nodes,
                        gpus_per_node=cfg.cluster.gpus_per_node, container_image=args.container_image,
                        mounts=args.mounts, time=args.time or cfg.cluster.time, job_dir=job_dir,
                        dry_run=args.dry_run)
    files = render(f"mt-{cfg.run.name}", [(cfg.run.name, train_task(args.config, over), ex)], out,
                   {cfg.run.name: text}, args.dry_run)
    for f in files:
        print(f"[slurm] {'rendered' if args.dry_run else 'wrote'} {f}", file=sys.stderr)
        if args.dry_run and f.endswith(".sh"):
            print(open(f).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())

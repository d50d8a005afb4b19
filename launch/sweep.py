#!/usr/bin/env python
"""The scaling ablation as one NeMo-Run experiment: one Slurm job per (size, variant).

    python launch/sweep.py --sizes 0p6b,1p7b,8b --variants grpo,trace_fkl,trace_rkl,all_token_fkl \\
        --account A --partition P --container-image IMG [--mounts ...] [--seeds 1234] [--dry-run] [key=value ...]

Each job trains configs/qwen3_<size>_<variant>.yaml; nodes, GPUs, TP/PP and time come from the
size's config (configs/base/size_<size>.yaml). Each job starts nodes x gpus_per_node =
tp x pp x dp ranks (dp derived; a layout that does not fit is refused before anything is
rendered). Overrides apply to every job; each seed gets its own run directory (run.dir gets a
_s<seed> suffix when several seeds are given).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import REPO, cluster_layout, render, resolve, slurm_executor, train_task  # noqa: E402

SIZES = ("0p6b", "1p7b", "4b", "8b", "14b", "32b")
VARIANTS = ("grpo", "trace_fkl", "trace_rkl", "all_token_fkl")


def _split(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [x for x in value.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"error: {flag} {value!r}: unknown {bad or 'empty'}; choose from {', '.join(allowed)}")
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", required=True, help=f"comma-separated, from {','.join(SIZES)}")
    p.add_argument("--variants", required=True, help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: the configs' seed)")
    p.add_argument("--account", required=True)
    p.add_argument("--partition", required=True)
    p.add_argument("--container-image", required=True)
    p.add_argument("--mounts", nargs="*", default=[])
    p.add_argument("--job-dir", default=None)
    p.add_argument("--out", default=os.path.join("launch_out", "sweep"))
    p.add_argument("--title", default="mt-scaling")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides for every job, key=value")
    args = p.parse_args(argv)

    sizes, variants = _split(args.sizes, SIZES, "--sizes"), _split(args.variants, VARIANTS, "--variants")
    seeds = [int(s) for s in args.seeds.split(",") if s] or [None]
    job_dir = os.path.abspath(args.job_dir or (os.path.join(args.out, "nemo_jobs") if args.dry_run else "nemo_jobs"))
    jobs, resolved = [], {}
    for size in sizes:
        for variant in variants:
            config = os.path.join(REPO, "configs", f"qwen3_{size}_{variant}.yaml")
            for seed in seeds:
                over = list(args.overrides)
                if seed is not None:
                    over.append(f"seed={seed}")
                cfg, text = resolve(config, over)
                if seed is not None and len(seeds) > 1:
                    over += [f"run.dir={cfg.run.dir}_s{seed}", f"run.name={cfg.run.name}_s{seed}"]
                    cfg, text = resolve(config, over)
                layout = cluster_layout(cfg)
                ex = slurm_executor(account=args.account, partition=args.partition, nodes=cfg.cluster.nodes,
                                    gpus_per_node=cfg.cluster.gpus_per_node, container_image=args.container_image,
                                    mounts=args.mounts, time=cfg.cluster.time, job_dir=job_dir, dry_run=args.dry_run)
                jobs.append((cfg.run.name, train_task(config, over), ex))
                resolved[cfg.run.name] = text
                print(f"[sweep] {cfg.run.name}: {layout.line()}", file=sys.stderr)
    files = render(args.title, jobs, args.out, resolved, args.dry_run)
    for f in files:
        print(f"[sweep] {'rendered' if args.dry_run else 'wrote'} {f}", file=sys.stderr)
    if args.dry_run:
        print(f"[sweep] {len(jobs)} jobs rendered into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

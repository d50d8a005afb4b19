#!/usr/bin/env python
"""A sweep as one NeMo-Run experiment: one Slurm job per (size, variant[, seed]).

    # the scaling ablation over the Qwen3 recipes (configs/qwen3_<size>_<variant>.yaml)
    python launch/sweep.py --sizes 0p6b,1p7b,8b --variants grpo,trace_fkl,trace_rkl,all_token_fkl \\
        --partition P [--account A] --container-image IMG [--mounts ...] [--seeds 1,2] [--wait] [key=value ...]
    # the paper's ablations and baselines as recipe sets (see ABLATIONS)
    python launch/sweep.py --ablation localisation --partition P --container-image IMG [--seeds 1,2]
    # the variants of any one config (configs/base/variant_<variant>.yaml merged over it)
    python launch/sweep.py --config configs/tiny_cpu.yaml --variants grpo,trace_fkl --partition batch \\
        --gpus-per-node 0 --no-container --wait train.steps=2 run.dir=/shared/runs/tiny

With --ablation, each job trains one recipe of the named set: localisation (the 1.7B mask
ablation: all-token, random 25%, inverted 25% and annotated spans, RKL, annealed), baselines
(8B: GRPO, TRACE-FKL and the self-OPD family: all-token FKL/RKL, OPSD, SRPO-like) or teacher
(1.7B TRACE-RKL with the teacher's default context, type only, and student NoThink / teacher
Think). With --sizes, each job trains configs/qwen3_<size>_<variant>.yaml; nodes, GPUs, TP/PP and time
come from the size's config (configs/base/size_<size>.yaml). With --config, each job is that
config with configs/base/variant_<variant>.yaml on top, and run.dir / run.name get a
_<variant> suffix. Overrides and the cluster flags (see launch/slurm.py) apply to every job;
each seed gets its own run directory (a _s<seed> suffix when several seeds are given). Every job
is planned, resolved and validated before anything is submitted (a layout that does not fit is
refused), and carries its resolved config. The job folder (default: <common parent of the
runs>/slurm) holds the scripts, the packaged code and the logs; the launcher prints each job's
id, files and commands. --wait blocks until every job ends: exit 0 when all COMPLETED.
--dry-run renders every sbatch script into --out, for inspection only (not submittable).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    REPO,
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

SIZES = ("0p6b", "1p7b", "4b", "8b", "14b", "32b")
VARIANTS = ("grpo", "trace_fkl", "trace_rkl", "all_token_fkl", "all_token_rkl", "opsd", "srpo_like")
# --ablation NAME: the recipes (configs/<name>.yaml) each set submits
ABLATIONS = {
    "localisation": ("qwen3_1p7b_ablation_all_token", "qwen3_1p7b_ablation_random25",
                     "qwen3_1p7b_ablation_inverted25", "qwen3_1p7b_ablation_trace_rkl"),
    "baselines": ("qwen3_8b_grpo", "qwen3_8b_trace_fkl", "qwen3_8b_all_token_fkl", "qwen3_8b_all_token_rkl",
                  "qwen3_8b_opsd", "qwen3_8b_srpo_like"),
    "teacher": ("qwen3_1p7b_trace_rkl", "qwen3_1p7b_teacher_type_only", "qwen3_1p7b_teacher_nothink"),
}


def _split(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [x for x in value.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"error: {flag} {value!r}: unknown {bad or 'empty'}; choose from {', '.join(allowed)}")
    return items


def variant_overrides(variant: str) -> list[str]:
    """configs/base/variant_<variant>.yaml as key=value overrides."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "configs", "base", f"variant_{variant}.yaml")))

    def flat(prefix: str, value) -> list[str]:
        if isinstance(value, dict):
            return [o for k, v in value.items() for o in flat(f"{prefix}{k}.", v)]
        return [f"{prefix[:-1]}={value}"]

    return flat("", node)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--sizes", help=f"comma-separated, from {','.join(SIZES)}: the Qwen3 recipes")
    what.add_argument("--config", help="one config whose variants to sweep")
    what.add_argument("--ablation", choices=sorted(ABLATIONS), help="a set of the paper's ablation/baseline recipes")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from {','.join(VARIANTS)} (with --sizes or --config)")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: the configs' seed)")
    add_cluster_flags(p)
    p.add_argument("--out", default=os.path.join("launch_out", "sweep"),
                   help="where --dry-run writes the rendered scripts and resolved configs")
    p.add_argument("--title", default=None, help="the experiment's title (default mt-scaling, or mt-<run.name>)")
    p.add_argument("overrides", nargs="*", help="config overrides for every job, key=value")
    args = p.parse_args(argv)
    split_mounts(args)

    if args.ablation and args.variants:
        raise SystemExit(f"error: --variants {args.variants}: --ablation {args.ablation} sets its own recipes")
    if not args.ablation and not args.variants:
        raise SystemExit("error: --variants is required with --sizes and --config")
    variants = [] if args.ablation else _split(args.variants, VARIANTS, "--variants")
    seeds = [int(s) for s in args.seeds.split(",") if s] or [None]
    absolute_env("sweep")
    if args.ablation:
        plan = [(os.path.join(REPO, "configs", f"{name}.yaml"), [], "") for name in ABLATIONS[args.ablation]]
    elif args.sizes:
        sizes = _split(args.sizes, SIZES, "--sizes")
        plan = [(os.path.join(REPO, "configs", f"qwen3_{size}_{v}.yaml"), [], "") for size in sizes for v in variants]
        missing = [os.path.basename(c) for c, _, _ in plan if not os.path.exists(c)]
        if missing:
            raise SystemExit(f"error: --sizes {args.sizes} --variants {args.variants}: no recipe {', '.join(missing)} "
                             "(the self-OPD baselines all_token_rkl, opsd, srpo_like exist at 8b; use --config "
                             "configs/qwen3_<size>_grpo.yaml --variants ... for another size)")
    else:
        plan = [(args.config, variant_overrides(v), f"_{v}") for v in variants]
    common_over = [*args.overrides, *cluster_overrides(args)]
    specs = []
    for config, var_over, suffix in plan:
        for seed in seeds:
            over = [*var_over, *common_over]
            if seed is not None:
                over.append(f"seed={seed}")
            cfg, _ = resolve(config, over)
            tail = suffix + (f"_s{seed}" if seed is not None and len(seeds) > 1 else "")
            if tail:
                over += [f"run.dir={cfg.run.dir}{tail}", f"run.name={cfg.run.name}{tail}"]
                cfg, _ = resolve(config, over)
            cfg, text, layout, cpu = prepare(cfg, args, "sweep")
            print(f"[sweep] {cfg.run.name}: {layout.line()}", file=sys.stderr)
            specs.append((cfg, text, layout, cpu))
    names = [cfg.run.name for cfg, *_ in specs]
    if len(set(names)) < len(names):
        raise SystemExit(f"error: two jobs would share a run name ({', '.join(names)}); give each its own")
    if args.ablation:
        title = args.title or f"mt-ablation-{args.ablation}"
    else:
        title = args.title or ("mt-scaling" if args.sizes else f"mt-{resolve(args.config, common_over)[0].run.name}-sweep")
    if args.dry_run:
        out = os.path.abspath(args.out)
        job_dir = os.path.join(out, "nemo_jobs")
    else:
        runs = [os.path.abspath(cfg.run.dir) for cfg, *_ in specs]
        job_dir = os.path.abspath(args.job_dir or os.path.join(os.path.commonpath(runs) if len(runs) > 1 else runs[0],
                                                                "slurm"))
    jobs, code = [], ""
    for cfg, text, layout, cpu in specs:
        packager, code = code_packager(args.code, "sweep", dry_run=args.dry_run, files={f"{cfg.run.name}.yaml": text})
        ex = slurm_executor(cfg, layout, cpu, job_dir=job_dir, packager=packager, tag="sweep", strict=not args.dry_run)
        jobs.append(Job(cfg.run.name, text, cfg, layout, cpu, ex))
    if args.dry_run:
        for f in render(title, jobs, out, job_dir):
            print(f"[sweep] rendered {f}", file=sys.stderr)
        print(f"[sweep] {len(jobs)} jobs rendered into {out} (for inspection only, not submittable)")
        return 0
    print(f"[sweep] code: {code}", file=sys.stderr)
    subs = submit(title, jobs, job_dir)
    for sub, job in zip(subs, jobs):
        report("sweep", sub, describe(job))
    return wait("sweep", subs) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())

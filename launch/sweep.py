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

Every cell (size x variant x seed) is a whole experiment: `megatron-trace cell` trains it, then
evaluates its best-on-validation checkpoint (checkpoints/best; --eval-final adds the last) on the
config's final benchmarks into RUN/eval/best/eval.json, in the same job, or in a dependent job
(--dependency=afterok) with --eval-separate; --no-eval trains only. `megatron-trace report
SWEEP_DIR` turns the cells into tables and plots: the sweep writes sweep.json (its cells) into the
common parent of the run directories. A rerun skips the cells whose evaluation exists, submits the
evaluation alone for a cell that finished training, resubmits the others (training resumes from
the latest checkpoint), and says which is which. With --config, --sizes are model sizes of the
registry (model.size; e.g. the CPU sweep's demo-s,demo-m,demo-l) and --sft-config trains an SFT
base per size and seed first. --executor local runs the cells one after the other on this
machine through NeMo-Run's local executor, without Slurm:

    python launch/sweep.py --config configs/tiny_scaling.yaml --sft-config configs/tiny_cpu_sft.yaml \
        --sizes demo-s,demo-m,demo-l --variants grpo,trace_fkl --seeds 1,2 --executor local

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
import copy
import json
import os
import sys
import time

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
    run_local,
    slurm_executor,
    submit,
    wait,
)

from megatron_trace.config import dump_config  # noqa: E402

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


def _model_sizes(value: str) -> list[str]:
    """--sizes with --config: model sizes of the registry (megatron-trace models)."""
    from megatron_trace.models.qwen3 import QWEN3_SIZES, get_arch

    items = [x for x in value.split(",") if x]
    for x in items:
        try:
            get_arch(x)
        except ValueError:
            raise SystemExit(f"error: --sizes {value!r}: unknown model size {x!r}; with --config choose from "
                             f"{', '.join(QWEN3_SIZES)}") from None
    if not items:
        raise SystemExit("error: --sizes is empty")
    return items


def _plan(args, variants: list[str]) -> list[tuple[str, list[str], str]]:
    """(config, overrides, run-name suffix) per size x variant, before seeds."""
    if args.ablation:
        return [(os.path.join(REPO, "configs", f"{name}.yaml"), [], "") for name in ABLATIONS[args.ablation]]
    if args.sizes and not args.config:
        sizes = _split(args.sizes, SIZES, "--sizes")
        plan = [(os.path.join(REPO, "configs", f"qwen3_{size}_{v}.yaml"), [], "") for size in sizes for v in variants]
        missing = [os.path.basename(c) for c, _, _ in plan if not os.path.exists(c)]
        if missing:
            raise SystemExit(f"error: --sizes {args.sizes} --variants {args.variants}: no recipe {', '.join(missing)} "
                             "(the self-OPD baselines all_token_rkl, opsd, srpo_like exist at 8b; use --config "
                             "configs/qwen3_<size>_grpo.yaml --variants ... for another size)")
        return plan
    if args.sizes:
        return [(args.config, [f"model.size={size}", *variant_overrides(v)], f"_{size}_{v}")
                for size in _model_sizes(args.sizes) for v in variants]
    return [(args.config, variant_overrides(v), f"_{v}") for v in variants]


def _cell_state(cfg, args) -> tuple[str, str]:
    """(what to submit, why): done (skip), eval (the evaluation alone), cell (train + eval), with
    the reason a rerun gives for a cell that was there before."""
    from megatron_trace.cell import cell_done
    from megatron_trace.report.runs import read_metrics

    run_dir = cfg.run.dir
    if not os.path.exists(os.path.join(run_dir, "config.yaml")):
        return "cell", "new"
    if not args.no_eval and cell_done(run_dir, args.eval_final):
        return "done", "finished: eval/best/eval.json exists"
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if _trained(cfg, rows) and args.no_eval:
        return "done", f"finished: trained {cfg.train.steps} steps"
    if _trained(cfg, rows) and os.path.exists(os.path.join(run_dir, "checkpoints", "best")):
        return "eval", "trained, not evaluated: the evaluation alone"
    return "cell", f"resubmitted (was: {_why_not(cfg, rows)})"


def _trained(cfg, rows: list[dict]) -> bool:
    """metrics.jsonl reached the config's last step."""
    return bool(rows) and rows[-1].get("step", -1) + 1 >= cfg.train.steps


def _why_not(cfg, rows: list[dict]) -> str:
    """Why a run has no evaluation, as the report says it (FAILED's first line, or how far it got)."""
    from megatron_trace.report.runs import failure_reason

    return failure_reason(cfg.run.dir, {"train": {"steps": cfg.train.steps}}, rows, "best")


def _cell_args(name: str, stage: str, args, sft: bool) -> list[str]:
    out = ["cell", "--config", f"/nemo_run/{name}.yaml", "--stage", stage]
    if sft and stage != "eval":
        out += ["--sft-config", f"/nemo_run/{name}.sft.yaml"]
    return out + (["--eval-final"] if args.eval_final else [])


def _local_check(job, args) -> str | None:
    """After a local job: None when it left what it owes, else why not (FAILED's first line)."""
    from megatron_trace.cell import cell_done
    from megatron_trace.report.runs import read_metrics

    rows = read_metrics(os.path.join(job.cfg.run.dir, "metrics.jsonl"))
    stage = job.args[job.args.index("--stage") + 1] if job.args and "--stage" in job.args else None
    if stage in ("all", "eval") and cell_done(job.cfg.run.dir, args.eval_final):
        return None
    if stage in (None, "train") and _trained(job.cfg, rows):
        return None
    return _why_not(job.cfg, rows)


def _manifest(root: str, cells: list[dict]) -> str:
    from megatron_trace.report import MANIFEST

    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, MANIFEST)
    with open(path, "w") as f:
        json.dump({"command": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cells": cells}, f, indent=1)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--config", help="one config whose variants (and --sizes) to sweep")
    what.add_argument("--ablation", choices=sorted(ABLATIONS), help="a set of the paper's ablation/baseline recipes")
    p.add_argument("--sizes", help=f"comma-separated: without --config the Qwen3 recipes ({','.join(SIZES)}); with "
                                   "--config model sizes of the registry (megatron-trace models)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from {','.join(VARIANTS)} (with --sizes or --config)")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: the configs' seed)")
    p.add_argument("--sft-config", default=None,
                   help="with --config: train (or reuse) an SFT base per size and seed first (the demo sizes)")
    ev = p.add_mutually_exclusive_group()
    ev.add_argument("--eval-separate", action="store_true",
                    help="evaluate in a dependent job (--dependency=afterok) instead of after training in the same job")
    ev.add_argument("--no-eval", action="store_true", help="train only (no eval/best/eval.json: the report lists none)")
    p.add_argument("--eval-final", action="store_true", help="also evaluate each cell's last checkpoint (eval/final)")
    p.add_argument("--executor", choices=("slurm", "local"), default="slurm",
                   help="slurm (default), or local: every cell on this machine, one after the other, through "
                        "NeMo-Run's local executor (blocks until all end)")
    add_cluster_flags(p)
    p.add_argument("--out", default=os.path.join("launch_out", "sweep"),
                   help="where --dry-run writes the rendered scripts, resolved configs and sweep.json")
    p.add_argument("--title", default=None, help="the experiment's title (default mt-scaling, or mt-<run.name>)")
    p.add_argument("overrides", nargs="*", help="config overrides for every job, key=value")
    return p


def _check_args(args) -> None:
    if not (args.sizes or args.config or args.ablation):
        raise SystemExit("error: give --sizes (the Qwen3 recipes), --config or --ablation")
    if args.ablation and (args.variants or args.sizes):
        raise SystemExit(f"error: --variants/--sizes: --ablation {args.ablation} sets its own recipes")
    if not args.ablation and not args.variants:
        raise SystemExit("error: --variants is required with --sizes and --config")
    if args.sft_config and not args.config:
        raise SystemExit("error: --sft-config goes with --config (the recipes start from their HF checkpoints)")
    if args.executor == "local" and args.eval_separate:
        raise SystemExit("error: --eval-separate is for Slurm's job dependencies; --executor local evaluates each "
                         "cell right after it trains")


def _specs(args, variants: list[str], seeds: list, common_over: list[str]) -> list[tuple]:
    """Every cell's (config, resolved text, SFT config text or None, layout, cpu), validated."""
    specs = []
    for config, var_over, suffix in _plan(args, variants):
        for seed in seeds:
            over = [*var_over, *common_over]
            if seed is not None:
                over.append(f"seed={seed}")
            cfg, _ = resolve(config, over)
            tail = suffix + (f"_s{seed}" if seed is not None and len(seeds) > 1 else "")
            if tail:
                over += [f"run.dir={cfg.run.dir}{tail}", f"run.name={cfg.run.name}{tail}"]
                cfg, _ = resolve(config, over)
            if not args.no_eval and not cfg.checkpoint.keep_best:
                raise SystemExit(f"error: {cfg.run.name}: a sweep cell evaluates checkpoints/best, so "
                                 f"checkpoint.keep_best must be true (with eval.every > 0; got "
                                 f"checkpoint.keep_best={cfg.checkpoint.keep_best}, eval.every={cfg.eval.every}); "
                                 "set them, or pass --no-eval to train only")
            sft_text = dump_config(resolve(args.sft_config, over)[0]) if args.sft_config else None
            cfg, text, layout, cpu = prepare(cfg, args, "sweep")
            print(f"[sweep] {cfg.run.name}: {layout.line()}", file=sys.stderr)
            specs.append((cfg, text, sft_text, layout, cpu))
    names = [cfg.run.name for cfg, *_ in specs]
    if len(set(names)) < len(names):
        raise SystemExit(f"error: two jobs would share a run name ({', '.join(names)}); give each its own")
    return specs


def _title(args, common_over: list[str]) -> str:
    if args.title:
        return args.title
    if args.ablation:
        return f"mt-ablation-{args.ablation}"
    return "mt-scaling" if args.sizes else f"mt-{resolve(args.config, common_over)[0].run.name}-sweep"


def _cell_jobs(spec: tuple, todo: str, args, job_dir: str, packager) -> list[Job]:
    """A cell's job(s): train and evaluate in one, or training then a dependent evaluation."""
    cfg, text, sft_text, layout, cpu = spec
    fleet = cfg.cluster.rollout_nodes > 0

    def executor(c=cfg):
        if args.executor == "local":
            return None  # run_local makes NeMo-Run's local executor per cell
        return slurm_executor(c, layout, cpu, job_dir=job_dir, packager=packager, tag="sweep", strict=not args.dry_run)

    name = cfg.run.name
    if args.no_eval:
        return [Job(name, text, cfg, layout, cpu, executor())]
    if todo == "eval":
        return [Job(name, text, cfg, layout, cpu, executor(), args=_cell_args(name, "eval", args, False))]
    if args.eval_separate or fleet:  # a fleet job trains through fleet-job: its evaluation follows
        train = None if fleet else _cell_args(name, "train", args, bool(sft_text))
        one = copy.deepcopy(cfg)
        one.cluster.nodes = 1  # the evaluation runs on one node: parallel.dp engines on its GPUs
        return [Job(name, text, cfg, layout, cpu, executor(), args=train),
                Job(f"{name}_eval", text, cfg, layout, cpu, executor(c=one),
                    args=_cell_args(name, "eval", args, False), after=name)]
    return [Job(name, text, cfg, layout, cpu, executor(), args=_cell_args(name, "all", args, bool(sft_text)))]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    split_mounts(args)
    _check_args(args)
    variants = [] if args.ablation else _split(args.variants, VARIANTS, "--variants")
    seeds = [int(s) for s in args.seeds.split(",") if s] or [None]
    absolute_env("sweep")
    common_over = [*args.overrides, *cluster_overrides(args)]
    specs = _specs(args, variants, seeds, common_over)
    title = _title(args, common_over)
    runs = [os.path.abspath(cfg.run.dir) for cfg, *_ in specs]
    root = os.path.commonpath(runs) if len(runs) > 1 else os.path.dirname(runs[0])
    if args.dry_run:
        out = os.path.abspath(args.out)
        job_dir = os.path.join(out, "nemo_jobs")
    else:
        job_dir = os.path.abspath(args.job_dir or os.path.join(root, "slurm" if args.executor == "slurm" else "jobs"))
    jobs, cells, code = [], [], ""
    for spec in specs:
        cfg, text, sft_text = spec[:3]
        todo, why = ("cell", "dry run") if args.dry_run else _cell_state(cfg, args)
        cells.append({"name": cfg.run.name, "run_dir": os.path.relpath(os.path.abspath(cfg.run.dir), root),
                      "size": cfg.model.size, "variant": cfg.loss.variant, "seed": cfg.seed, "state": todo,
                      "note": why})
        if not args.dry_run:
            print(f"[sweep] {cfg.run.name}: {why}", file=sys.stderr)
        if todo == "done":
            continue
        files = {f"{cfg.run.name}.yaml": text, **({f"{cfg.run.name}.sft.yaml": sft_text} if sft_text else {})}
        packager, code = code_packager(args.code, "sweep", dry_run=args.dry_run, files=files)
        for job in _cell_jobs(spec, todo, args, job_dir, packager):
            job.files = files
            jobs.append(job)
    if args.dry_run:
        for f in render(title, jobs, out, job_dir):
            print(f"[sweep] rendered {f}", file=sys.stderr)
        print(f"[sweep] manifest {_manifest(out, cells)}", file=sys.stderr)
        print(f"[sweep] {len(jobs)} jobs rendered into {out} (for inspection only, not submittable)")
        return 0
    manifest = _manifest(root, cells)
    print(f"[sweep] manifest {manifest}; `megatron-trace report {root} --out REPORT_DIR` when the cells are done",
          file=sys.stderr)
    if not jobs:
        print(f"[sweep] every cell is finished ({len(cells)}); nothing to submit")
        return 0
    if args.executor == "local":
        return run_local(title, jobs, job_dir, lambda job: _local_check(job, args))
    print(f"[sweep] code: {code}", file=sys.stderr)
    subs = submit(title, jobs, job_dir)
    for sub, job in zip(subs, jobs):
        report("sweep", sub, describe(job))
    return wait("sweep", subs) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())

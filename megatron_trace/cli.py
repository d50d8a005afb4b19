"""`megatron-trace` command line.

Subcommands available now:
  demo     the embedded demo: SFT base -> TRACE RL -> held-out eval on CPU (--compare: 5 variants)
  smoke    the foundation smoke path: tiny Qwen3 -> Megatron (TP=2, gloo) -> logits parity -> back to HF
  train    run the TRACE/GRPO loop from a YAML config (--dry-run: validate and print it resolved)
  sft      cross-entropy warm start on reference solutions (same config, same machinery)
  eval     avg@k / pass@k with bootstrap CIs on MATH-500, AIME24/25, AMC23, GPQA-Diamond, arith
  grade    grade a JSONL of responses against a benchmark (math-verify, hard time limits)
  plan     per-GPU memory estimate of a config (weights, grads, optimizer, teacher, activations,
           rollout engine) against cluster.gpu_memory_gb; exit 1 when it does not fit
  models   the Qwen3 size registry with parameter counts

"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# `megatron-trace demo --task NAME`: the RL and SFT configs of each embedded task.
DEMO_CONFIGS = {"arith": ("tiny_cpu_demo.yaml", "tiny_cpu_sft.yaml"),
                "product_chain": ("tiny_cpu_demo_product_chain.yaml", "tiny_cpu_sft_product_chain.yaml")}


def _cmd_models(args) -> int:
    from .models.qwen3 import QWEN3_SIZES

    def human(n: int) -> str:
        return next(f"{n / scale:8.3f}{unit}" for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3), ("", 1.0)) if n >= scale)

    print(f"{'size':>6} {'params':>9} {'hidden':>7} {'layers':>6} {'heads':>5} {'kv':>3} {'ffn':>6} tied")
    for name, a in QWEN3_SIZES.items():
        print(f"{name:>6} {human(a.num_params)} {a.hidden_size:7d} {a.num_hidden_layers:6d} "
              f"{a.num_attention_heads:5d} {a.num_key_value_heads:3d} {a.intermediate_size:6d} {a.tie_word_embeddings}")
    print("tiny and demo*: counted at the registry's vocabulary of 1000; the embedded tasks' 102-character tokenizer "
          "replaces it (demo-s 0.20M, demo-m 0.80M, demo-l 3.17M)")
    return 0


def _cmd_demo(args) -> int:
    from .config import load_config
    from .demo import format_report, run_demo

    rl_default, sft_default = DEMO_CONFIGS[args.task]
    args.config = args.config or os.path.join(_CONFIGS, rl_default)
    args.sft_config = args.sft_config or os.path.join(_CONFIGS, sft_default)
    for flag, path in (("--config", args.config), ("--sft-config", args.sft_config)):
        task = load_config(path, args.overrides).data.task
        if task != args.task:
            raise SystemExit(f"error: {flag} {path} trains data.task={task}, but --task is {args.task}")

    variants = [v for v in (args.variants or "").split(",") if v] or None
    if (variants or args.seeds) and not args.compare:
        raise SystemExit("error: --variants and --seeds go with --compare")
    if variants:
        from .loss.routed import ROUTE_VARIANTS

        bad = [v for v in variants if v not in ROUTE_VARIANTS]
        if bad:
            raise SystemExit(f"error: --variants {args.variants}: unknown {bad}; choose from {sorted(ROUTE_VARIANTS)}")
    if args.seeds:
        from .demo_study import format_study, run_study

        try:
            seeds = [int(s) for s in args.seeds.split(",") if s]
        except ValueError:
            raise SystemExit(f"error: --seeds {args.seeds!r}: comma-separated integers") from None
        study = run_study(args.out, seeds=seeds, config=args.config, sft_config=args.sft_config,
                          overrides=args.overrides, variants=variants)
        print(format_study(study))
        print(f"[demo] report: {os.path.join(os.path.abspath(args.out), 'compare_report.json')}; "
              f"forest plot: {study['forest_plot']}")
        return 0
    report = run_demo(args.out, config=args.config, sft_config=args.sft_config, overrides=args.overrides,
                      compare=args.compare, variants=variants)
    print(format_report(report))
    print(f"[demo] report: {os.path.join(os.path.abspath(args.out), 'demo_report.json')}")
    return 0


def _cmd_smoke(args) -> int:
    from tqdm import tqdm

    from .models.hf_io import make_random_hf_model
    from .models.jobs import check_parity, convert_hf_to_megatron, convert_megatron_to_hf
    from .models.qwen3 import QWEN3_SIZES

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    hf_dir, ckpt, back = (os.path.join(out, n) for n in ("hf_tiny", f"ckpt_tp{args.tp}", "hf_roundtrip"))
    report: dict = {}
    stages = [
        ("random tiny Qwen3 (transformers)", lambda: make_random_hf_model(QWEN3_SIZES["tiny"], hf_dir) and None),
        (f"HF -> Megatron torch_dist at TP={args.tp}",
         lambda: report.update(convert=convert_hf_to_megatron(hf_dir, ckpt, tp=args.tp, device="cpu"))),
        ("logits parity at PP=2 from the checkpoint",
         lambda: report.update(parity=check_parity(hf_dir, ckpt, tp=1, pp=2, device="cpu"))),
        ("Megatron -> HF", lambda: report.update(export=convert_megatron_to_hf(ckpt, back, device="cpu"))),
    ]
    t0 = time.time()
    for desc, fn in tqdm(stages, desc="smoke", unit="stage"):
        tqdm.write(f"[smoke] {desc}")
        fn()
    report["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "smoke_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    p = report["parity"]
    print(f"[smoke] max |logit diff| Megatron(PP=2, from a TP={args.tp} checkpoint) vs transformers: "
          f"{p['max_abs_logit_diff']:.2e} ({'ok' if p['max_abs_logit_diff'] <= 1e-4 else 'FAIL'})")
    print(f"[smoke] artifacts and report in {out}")
    return 0 if p["max_abs_logit_diff"] <= 1e-4 else 1


def _cmd_grade(args) -> int:
    from .reward.grade import grade_responses

    report = grade_responses(args.benchmark, args.responses, args.out, timeout_s=args.timeout,
                             num_workers=args.workers, gpqa_csv=args.gpqa_csv)
    print(json.dumps(report))
    return 0


def _cmd_train(args) -> int:
    from .config import check_teacher_data, dump_config, load_config

    cfg = load_config(args.config, args.overrides)  # fails here, before any work, on a bad key
    check_teacher_data(cfg)  # a teacher-using variant needs data with reference solutions
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    from .parallel import launch_layout
    from .train.loop import run_training

    launch_layout(run_training, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp, cfg)
    print(f"[train] done; metrics in {cfg.run.dir}/metrics.jsonl")
    return 0


def _cmd_fleet_job(args) -> int:
    from .fleet.job import main as fleet_main

    return fleet_main(args.config, args.overrides)


def _cmd_plan(args) -> int:
    from .config import load_config
    from .plan import plan_memory

    cfg = load_config(args.config, args.overrides)
    kwargs = {} if args.prompt_tokens is None else {"prompt_tokens": args.prompt_tokens}
    plan = plan_memory(cfg, source=args.config, **kwargs)
    print(plan.table(), end="")
    if args.json:
        print(json.dumps(plan.to_dict()))
    return 0 if plan.fits else 1


def _cmd_sft(args) -> int:
    from .config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    from .parallel import launch_layout
    from .train.sft import run_sft

    report = next(r for r in launch_layout(run_sft, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp, cfg) if r)
    how = "reused the cached model" if report.get("cached") else f"trained {report['steps']} steps"
    print(f"[sft] {how}: loss {report['first_loss']:.3f} -> {report['final_loss']:.3f}")
    if "heldout_accuracy" in report:
        print(f"[sft] held-out accuracy {report['heldout_accuracy']:.3f} on {report['num_heldout']} problems; "
              f"reference log-prob student {report['ref_logprob_student']:.3f} vs privileged teacher "
              f"{report['ref_logprob_teacher']:.3f}")
    print(f"[sft] HF model in {report['hf_dir']}; report in {os.path.join(cfg.run.dir, 'sft_report.json')}")
    return 0


_EVAL_SHORTHANDS = ("benchmarks", "k", "limit", "temperature", "top_p", "top_k", "max_new_tokens", "thinking")


def _cmd_eval(args) -> int:
    from .config import load_config

    overrides = [f"eval.{o}" if o.split("=", 1)[0] in _EVAL_SHORTHANDS else o for o in args.overrides]
    cfg = load_config(args.config, overrides)
    from .eval.job import run_eval
    from .eval.report import comparison_table

    report = run_eval(cfg, ckpt=args.ckpt, hf_dir=args.hf_dir, out_dir=args.out, name=args.name)
    print(comparison_table([report]), end="")
    out = args.out or os.path.join(cfg.run.dir, "eval", os.path.basename(os.path.normpath(args.ckpt or args.hf_dir)))
    if args.ckpt and os.path.realpath(args.ckpt) != os.path.abspath(args.ckpt):  # checkpoints/best
        print(f"[eval] --ckpt {args.ckpt} is {report['checkpoint']}")
    print(f"[eval] eval.json, eval.md and samples.jsonl in {out}")
    return 0


def _cmd_cell(args) -> int:
    from .cell import run_cell

    out = run_cell(args.config, args.overrides, sft_config=args.sft_config, eval_final=args.eval_final,
                   stage=args.stage)
    for tag, path in out["evals"].items():
        print(f"[cell] eval/{tag}: {path}{' (already there: skipped)' if tag in out['skipped'] else ''}")
    print(f"[cell] done: {out['run_dir']}")
    return 0


def _cmd_report(args) -> int:
    from .report import build_report

    rep = build_report(args.paths, args.out, baseline=args.baseline, metric=args.metric, eval_tag=args.eval)
    md = open(os.path.join(args.out, "report.md")).read().split("\n## ")
    print("## " + md[1].rstrip() if len(md) > 1 else md[0])
    bad = [r for r in rep["runs"] if r["status"] != "ok"]
    for r in bad:
        print(f"[report] {r['name']}: {r['status']}: {r['reason']}")
    print(f"[report] {len(rep['runs'])} runs, {len(bad)} without an evaluation; report.md, report.html, report.json "
          f"and {len(rep['plots'])} PNGs in {os.path.abspath(args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-trace", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the embedded demo: SFT base -> TRACE RL -> held-out eval, on CPU")
    d.add_argument("--out", default="runs/demo", help="directory for everything (default: runs/demo)")
    d.add_argument("--task", default="arith", choices=sorted(DEMO_CONFIGS),
                   help="the embedded task (data.task): arith, the short default, or product_chain, a long chain "
                        "whose one product decides (configs/tiny_cpu_{demo,sft}_product_chain.yaml)")
    d.add_argument("--config", default=None, help="the RL config (default: the task's, configs/tiny_cpu_demo*.yaml)")
    d.add_argument("--sft-config", default=None, help="the base's SFT config (default: the task's, configs/tiny_cpu_sft*.yaml)")
    d.add_argument("--compare", action="store_true", help="GRPO, all-token FKL, TRACE-FKL, TRACE-RKL and random_mask from one base, with the key-token lift")
    d.add_argument("--variants", default=None,
                   help="with --compare: comma-separated loss.variant names (default grpo,all_token_fkl,trace_fkl,"
                        "trace_rkl,random_mask)")
    d.add_argument("--seeds", default=None,
                   help="with --compare: comma-separated seeds; each gets its own SFT base and run of every "
                        "variant (<out>/seed_<s>), pooled into compare_report.json and forest.png")
    d.add_argument("overrides", nargs="*", help="key=value overrides for every stage")
    d.set_defaults(fn=_cmd_demo)
    sm = sub.add_parser("smoke", help="CPU smoke run of the Megatron/Qwen3 foundation (convert, parity, export)")
    sm.add_argument("--out", default="runs/smoke", help="directory for the artifacts (default: runs/smoke)")
    sm.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the converted checkpoint")
    sm.set_defaults(fn=_cmd_smoke)
    g = sub.add_parser("grade", help="grade a JSONL of responses against a benchmark")
    g.add_argument("--benchmark", required=True, help="math500 | aime24 | aime25 | amc23 | gpqa_diamond | arith")
    g.add_argument("--responses", required=True, help='JSONL lines {"index": row, "response": text}')
    g.add_argument("--out", default=None, help="also write a report with per-item results here")
    g.add_argument("--timeout", type=float, default=5.0, help="hard time limit per verification, seconds")
    g.add_argument("--workers", type=int, default=2, help="verifier processes")
    g.add_argument("--gpqa-csv", default=None, help="official GPQA-Diamond CSV (never bundled)")
    g.set_defaults(fn=_cmd_grade)
    t = sub.add_parser("train", help="TRACE/GRPO training from a YAML config")
    t.add_argument("--config", required=True, help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rollout.n=8 loss.variant=grpo")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.set_defaults(fn=_cmd_train)
    fj = sub.add_parser("fleet-job", help="one node's part of a Slurm job with its own rollout fleet "
                                          "(launch/slurm.py --rollout-nodes; not for interactive use)")
    fj.add_argument("--config", required=True, help="the job's resolved config")
    fj.add_argument("overrides", nargs="*", help="key=value overrides for the trainer")
    fj.set_defaults(fn=_cmd_fleet_job)
    pl = sub.add_parser("plan", help="per-GPU memory estimate of a training config (no model is built)")
    pl.add_argument("--config", required=True, help="YAML config (see configs/)")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=4 optim.recompute=full")
    pl.add_argument("--json", action="store_true", help="also print the plan as one JSON line (last line)")
    pl.add_argument("--prompt-tokens", type=int, default=None,
                    help="prompt length assumed for every rollout (default: megatron_trace.plan.PROMPT_TOKENS)")
    pl.set_defaults(fn=_cmd_plan)
    f = sub.add_parser("sft", help="cross-entropy warm start on reference solutions")
    f.add_argument("--config", required=True, help="YAML config (see configs/); the sft.* keys")
    f.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sft.steps=100")
    f.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    f.set_defaults(fn=_cmd_sft)
    e = sub.add_parser("eval", help="avg@k evaluation of a checkpoint or an HF directory")
    e.add_argument("--config", required=True, help="YAML config (the eval.* keys; model.dtype, rollout.engine)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a megatron-trace checkpoint (run checkpoint or model checkpoint)")
    src.add_argument("--hf-dir", help="an HF directory (config.json, safetensors, tokenizer)")
    e.add_argument("--out", default=None, help="output directory (default: <run.dir>/eval/<name>); reruns resume")
    e.add_argument("--name", default=None, help="the model's name in the tables")
    e.add_argument("overrides", nargs="*",
                   help="key=value overrides; benchmarks=[...], k=8, limit=N are short for eval.*")
    e.set_defaults(fn=_cmd_eval)
    c = sub.add_parser("cell", help="one sweep cell: [SFT base ->] train -> evaluate checkpoints/best (and the last)")
    c.add_argument("--config", required=True, help="the cell's training config")
    c.add_argument("--sft-config", default=None,
                   help="train (or reuse) an SFT base into <run.dir>/sft first and start from it (the demo sizes)")
    c.add_argument("--eval-final", action="store_true", help="also evaluate the last checkpoint (eval/final)")
    c.add_argument("--stage", default="all", choices=["all", "train", "eval"],
                   help="all (default), or one half: a sweep's --eval-separate runs eval as a dependent job")
    c.add_argument("overrides", nargs="*", help="key=value overrides for every stage")
    c.set_defaults(fn=_cmd_cell)
    r = sub.add_parser("report", help="a sweep's runs -> tables, paired differences, compute and plots")
    r.add_argument("paths", nargs="+", help="sweep directories (searched for runs; sweep.json names the expected "
                                            "cells) or run directories")
    r.add_argument("--out", required=True, help="where report.md, report.html, report.json and the PNGs go")
    r.add_argument("--baseline", default="grpo", help="the variant every other is paired against (default grpo)")
    r.add_argument("--metric", default="avg@k", choices=["avg@k", "pass@k"], help="the benchmark metric")
    r.add_argument("--eval", default="best", help="which evaluation of each run: eval/<this>/eval.json (default best)")
    r.set_defaults(fn=_cmd_report)
    m = sub.add_parser("models", help="list the Qwen3 sizes")
    m.set_defaults(fn=_cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    from .extras import MissingExtra

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, MissingExtra) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

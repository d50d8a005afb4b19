"""The embedded demo: SFT base -> TRACE RL -> held-out evaluation, end to end on CPU.

    megatron-trace demo [--out runs/demo] [--compare] [key=value ...]

1. base: `megatron-trace sft` with configs/tiny_cpu_sft.yaml (cached in <out>/sft);
2. RL: `megatron-trace train` with configs/tiny_cpu_demo.yaml from that base (hf engine, oracle
   annotator, live teacher with the reference solution as privileged context) into <out>/<variant>;
3. evaluation of the base and of the final policy on the same held-out problems, same seed
   (`megatron-trace eval`), a paired bootstrap CI of the gain, plots, and demo_report.json.
With --compare, step 2 and 3 run for GRPO, all-token FKL, TRACE-FKL and TRACE-RKL from the same
base and seeds, and a comparison table and overlaid plots are written.
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["run_demo"]

VARIANTS_COMPARE = ("grpo", "all_token_fkl", "trace_fkl", "trace_rkl")


def _per_problem(samples_path: str) -> dict[int, float]:
    by: dict[int, list[bool]] = {}
    for line in open(samples_path):
        r = json.loads(line)
        by.setdefault(r["index"], []).append(r["correct"])
    return {i: sum(v) / len(v) for i, v in by.items()}


def _eval(cfg, out_dir: str, name: str, *, hf_dir: str | None = None, ckpt: str | None = None) -> dict:
    from .eval.job import run_eval

    rep = run_eval(cfg, hf_dir=hf_dir, ckpt=ckpt, out_dir=out_dir, name=name)
    b = rep["benchmarks"]["arith"]
    rows = [json.loads(x) for x in open(os.path.join(out_dir, "samples.jsonl"))]
    return {"accuracy": b["avg@k"], "ci95": b["ci95"], "mean_length": b["mean_length"],
            "scores": _per_problem(os.path.join(out_dir, "samples.jsonl")), "num": b["num_problems"],
            "no_answer_rate": b["no_answer_rate"], "samples": len(rows)}


def _train(cfg) -> None:
    from .parallel import launch
    from .train.checkpoint import find_latest
    from .train.loop import run_training

    latest = find_latest(cfg.run.dir)
    if latest is not None and json.load(open(os.path.join(latest, "trainer_state.json")))["next_step"] >= cfg.train.steps:
        return  # finished before: reuse
    launch(run_training, cfg.parallel.tp * cfg.parallel.pp, cfg)


def _metrics_rows(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]


def run_demo(out: str, *, config: str, sft_config: str, overrides: list[str], compare: bool = False) -> dict:
    from tqdm.auto import tqdm

    from .config import load_config
    from .eval.metrics import paired_bootstrap_ci
    from .observability.plots import plot_runs
    from .parallel import launch
    from .train.checkpoint import find_latest
    from .train.sft import run_sft

    t0 = time.time()
    out = os.path.abspath(out)
    sft_cfg = load_config(sft_config, [f"run.dir={os.path.join(out, 'sft')}", *overrides])
    variants = VARIANTS_COMPARE if compare else (load_config(config, overrides).loss.variant,)
    stages = ["SFT base (cached after the first run)", "evaluate the base"]
    for v in variants:
        stages += [f"RL: {v}", f"evaluate {v}"]
    bar = tqdm(total=len(stages), desc="demo", unit="stage")

    def stage(i):
        tqdm.write(f"[demo] {stages[i]}")

    stage(0)
    sft = next(r for r in launch(run_sft, sft_cfg.parallel.tp * sft_cfg.parallel.pp, sft_cfg) if r)
    bar.update(1)
    base_hf = sft["hf_dir"]
    stage(1)
    eval_over = ["eval.limit=null", "log.progress=false"]
    common = load_config(config, [f"model.hf_dir={base_hf}", *overrides, *eval_over])
    base = _eval(common, os.path.join(out, "eval_base"), "base", hf_dir=base_hf)
    bar.update(1)
    runs, finals = {}, {}
    for k, v in enumerate(variants):
        stage(2 + 2 * k)
        lam = ["schedule.lambda0=0.0"] if v == "grpo" else []
        cfg = load_config(config, [f"model.hf_dir={base_hf}", f"run.dir={os.path.join(out, v)}", f"run.name={v}",
                                   f"loss.variant={v}", *lam, *overrides])
        _train(cfg)
        bar.update(1)
        stage(3 + 2 * k)
        ckpt = find_latest(cfg.run.dir)
        finals[v] = _eval(load_config(config, [f"model.hf_dir={base_hf}", *overrides, *eval_over]),
                          os.path.join(out, f"eval_{v}"), v, ckpt=ckpt)
        runs[v] = cfg.run.dir
        bar.update(1)
    bar.close()
    plots = plot_runs(list(runs.values()), os.path.join(out, "plots"), labels=list(runs))
    idx = sorted(base["scores"])
    report = {"base_accuracy": base["accuracy"], "num_heldout": base["num"], "k": common.eval.k,
              "base_mean_length": base["mean_length"], "sft": {k: sft[k] for k in sft if k != "samples"},
              "variants": {}, "plots": os.path.join(out, "plots"), "plot_files": sorted(plots)}
    for v, f in finals.items():
        gain_ci = paired_bootstrap_ci([f["scores"][i] for i in idx], [base["scores"][i] for i in idx],
                                      num_samples=4000, seed=common.seed)
        rows = _metrics_rows(runs[v])
        last = rows[-1] if rows else {}
        report.setdefault("base_entropy", rows[0].get("entropy/all") if rows else None)  # step 0 = the base
        report["variants"][v] = {"final_accuracy": f["accuracy"], "accuracy_gain": f["accuracy"] - base["accuracy"],
                                 "accuracy_gain_ci95": list(gain_ci), "mean_length": f["mean_length"],
                                 "final_entropy": last.get("entropy/all"),
                                 "exposure": last.get("exposure/lambda2_coverage_cum"), "run_dir": runs[v]}
    main = variants[-1] if not compare else "trace_fkl"
    m = report["variants"][main]
    report.update({"variant": main, "final_accuracy": m["final_accuracy"], "accuracy_gain_ci95": m["accuracy_gain_ci95"],
                   "wall_seconds": time.time() - t0})
    with open(os.path.join(out, "demo_report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    return report


def format_report(report: dict) -> str:
    lines = [f"held-out problems: {report['num_heldout']} (avg@{report['k']}), wall time {report['wall_seconds']:.0f} s",
             "", "| policy | accuracy | gain [95% CI] | mean length | entropy | exposure |", "| --- | --- | --- | --- | --- | --- |",
             f"| base (SFT) | {100 * report['base_accuracy']:.1f}% | | {report['base_mean_length']:.1f} | "
             f"{'-' if report.get('base_entropy') is None else format(report['base_entropy'], '.3f')} | |"]
    for v, m in report["variants"].items():
        lo, hi = m["accuracy_gain_ci95"]
        ent = "-" if m["final_entropy"] is None else f"{m['final_entropy']:.3f}"
        exp = "-" if m["exposure"] is None else f"{m['exposure']:.3f}"
        lines.append(f"| {v} | {100 * m['final_accuracy']:.1f}% | {100 * m['accuracy_gain']:+.1f} "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {m['mean_length']:.1f} | {ent} | {exp} |")
    lines += ["", f"plots: {report['plots']}"]
    return "\n".join(lines)

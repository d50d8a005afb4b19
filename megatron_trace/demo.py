"""The embedded demo: SFT base -> TRACE RL -> held-out evaluation, end to end on CPU.

    megatron-trace demo [--out runs/demo] [--compare [--variants a,b] [--seeds 1,2,3]] [key=value ...]

1. base: `megatron-trace sft` with configs/tiny_cpu_sft.yaml (cached in <out>/sft);
2. RL: `megatron-trace train` with configs/tiny_cpu_demo.yaml from that base (hf engine, oracle
   annotator, live teacher with the reference solution as privileged context) into <out>/<variant>;
3. evaluation of the base and of the final policy on the same held-out problems, same seed
   (`megatron-trace eval`), a paired bootstrap CI of the gain, plots, and demo_report.json.
With --compare, step 2 and 3 run for GRPO, all-token FKL (constant lambda, as in its recipes),
TRACE-FKL, TRACE-RKL and the random-mask ablation (TRACE-FKL's annotated coverage per rollout,
random positions) from the same base and seeds, and a comparison table and overlaid plots are
written. Every variant measures the key-token lift at every step (`train.lift_annotate=true`,
`train.key_token_lift_every=1`): the change of the actor's log-prob of the teacher's top-1
token at annotated key positions across the step's update, and of the token the teacher supports
most beyond the actor there (argmax of p_teacher - p_actor: the under-allocated token). Step 0's
rollouts are the same for every variant (same base, same seeds), so its lift compares the
variants on the same positions. `--variants` picks the compared variants; `--seeds` runs the
whole comparison once per seed, each with its own SFT base, and pools them (`demo_study.py`).
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["run_demo"]

VARIANTS_COMPARE = ("grpo", "all_token_fkl", "trace_fkl", "trace_rkl", "random_mask")
# Per-variant keys in --compare: GRPO has no KL; the all-token baseline distils for the whole run.
VARIANT_OVERRIDES = {"grpo": ["schedule.lambda0=0.0"], "all_token_fkl": ["schedule.kind=constant"]}
# --compare measures the key-token lift of every variant at every step.
LIFT_OVERRIDES = ["train.lift_annotate=true", "train.key_token_lift_every=1"]
LIFT_KEY = "lift/key_teacher"
LIFT_UNDER_KEY = "lift/key_underallocated"


def _per_problem_correct(samples_path: str) -> dict[int, list[bool]]:
    """Each held-out problem's sample correctness, in sample order."""
    by: dict[int, list[tuple[int, bool]]] = {}
    for line in open(samples_path):
        r = json.loads(line)
        by.setdefault(r["index"], []).append((r["sample"], bool(r["correct"])))
    return {i: [c for _, c in sorted(v)] for i, v in by.items()}


def _per_problem(samples_path: str) -> dict[int, float]:
    return {i: sum(v) / len(v) for i, v in _per_problem_correct(samples_path).items()}


def _eval(cfg, out_dir: str, name: str, *, hf_dir: str | None = None, ckpt: str | None = None) -> dict:
    from .eval.job import run_eval

    rep = run_eval(cfg, hf_dir=hf_dir, ckpt=ckpt, out_dir=out_dir, name=name)
    b = rep["benchmarks"]["arith"]
    rows = [json.loads(x) for x in open(os.path.join(out_dir, "samples.jsonl"))]
    return {"accuracy": b["avg@k"], "ci95": b["ci95"], "mean_length": b["mean_length"],
            "scores": _per_problem(os.path.join(out_dir, "samples.jsonl")), "num": b["num_problems"],
            "correct": _per_problem_correct(os.path.join(out_dir, "samples.jsonl")),
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


def run_demo(out: str, *, config: str, sft_config: str, overrides: list[str], compare: bool = False,
             variants: list[str] | None = None) -> dict:
    """One base, one seed: the demo (or, with compare, every variant of `variants`, default
    VARIANTS_COMPARE). The report keeps each policy's per-problem held-out correctness."""
    from tqdm.auto import tqdm

    from .config import load_config
    from .eval.metrics import paired_bootstrap_ci
    from .extras import require
    from .observability.plots import plot_runs
    from .parallel import launch
    from .train.checkpoint import find_latest
    from .train.sft import run_sft

    require("matplotlib", "plots", "megatron-trace demo (its plots)")  # before minutes of training, not after
    t0 = time.time()
    out = os.path.abspath(out)
    sft_cfg = load_config(sft_config, [f"run.dir={os.path.join(out, 'sft')}", *overrides])
    if variants and not compare:
        raise ValueError("--variants needs --compare")
    variants = tuple(variants or VARIANTS_COMPARE) if compare else (load_config(config, overrides).loss.variant,)
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
        extra = [*VARIANT_OVERRIDES.get(v, []), *LIFT_OVERRIDES] if compare else []
        cfg = load_config(config, [f"model.hf_dir={base_hf}", f"run.dir={os.path.join(out, v)}", f"run.name={v}",
                                   f"loss.variant={v}", *extra, *overrides])
        kl_end = cfg.schedule.warmup_steps + cfg.schedule.decay_steps
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
              "base_correct": {str(i): base["correct"][i] for i in idx},
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
                                 "exposure": last.get("exposure/lambda2_coverage_cum"), "run_dir": runs[v],
                                 "correct": {str(i): f["correct"][i] for i in idx},
                                 **_lift_summary(rows, kl_end)}
    main = "trace_fkl" if compare and "trace_fkl" in variants else variants[-1]
    m = report["variants"][main]
    report.update({"variant": main, "final_accuracy": m["final_accuracy"], "accuracy_gain_ci95": m["accuracy_gain_ci95"],
                   "wall_seconds": time.time() - t0})
    with open(os.path.join(out, "demo_report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    return report


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float)) and x == x]
    return sum(xs) / len(xs) if xs else None


def _lift_summary(rows: list[dict], kl_end: int) -> dict:
    """The key-token lift (teacher top-1 token, nats) at step 0, its mean over the KL phase (the
    demo schedule's steps with lambda > 0, whatever the variant's own lambda), and after it; the
    under-allocated token's lift at step 0 and over the KL phase."""
    at = {r["step"]: r.get(LIFT_KEY) for r in rows}
    under = {r["step"]: r.get(LIFT_UNDER_KEY) for r in rows}
    return {"lift_step0": _mean([at.get(0)]),
            "lift_kl_phase": _mean([v for s, v in at.items() if s < kl_end]),
            "lift_after": _mean([v for s, v in at.items() if s >= kl_end]),
            "under_lift_step0": _mean([under.get(0)]),
            "under_lift_kl_phase": _mean([v for s, v in under.items() if s < kl_end]),
            "span_coverage_kl_phase": _mean([r.get("route/span_coverage") for r in rows if r["step"] < kl_end])}


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_report(report: dict) -> str:
    digest = report.get("sft", {}).get("weights_sha256")
    lines = [f"held-out problems: {report['num_heldout']} (avg@{report['k']}), wall time {report['wall_seconds']:.0f} s",
             *([f"base weights sha256 {digest[:16]} (equal digests: the same base, bit for bit)"] if digest else []),
             "", "| policy | accuracy | gain [95% CI] | mean length | entropy | exposure | key-token lift: step 0 "
             "| KL phase | after | under-allocated lift: step 0 | KL phase | span coverage |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| base (SFT) | {100 * report['base_accuracy']:.1f}% | | {report['base_mean_length']:.1f} | "
             f"{_fmt(report.get('base_entropy'), '.3f')} | | | | | | | |"]
    for v, m in report["variants"].items():
        lo, hi = m["accuracy_gain_ci95"]
        lines.append(f"| {v} | {100 * m['final_accuracy']:.1f}% | {100 * m['accuracy_gain']:+.1f} "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {m['mean_length']:.1f} | {_fmt(m['final_entropy'], '.3f')} | "
                     f"{_fmt(m['exposure'], '.3f')} | {_fmt(m.get('lift_step0'), '+.4f')} | "
                     f"{_fmt(m.get('lift_kl_phase'), '+.4f')} | {_fmt(m.get('lift_after'), '+.4f')} | "
                     f"{_fmt(m.get('under_lift_step0'), '+.4f')} | {_fmt(m.get('under_lift_kl_phase'), '+.4f')} | "
                     f"{_fmt(m.get('span_coverage_kl_phase'), '.3f')} |")
    lines.append("key-token lift: mean change (nats) of the actor's log-prob of the teacher's top-1 token at annotated "
                 "key positions across one step's update; step 0 is the same rollouts for every variant")
    lines.append("under-allocated lift: the same for the token the teacher supports most beyond the actor there "
                 "(argmax of p_teacher - p_actor before the update)")
    lines += ["", f"plots: {report['plots']}"]
    return "\n".join(lines)

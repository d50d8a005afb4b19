"""Multi-seed studies of the demo: `megatron-trace demo --compare --seeds 1,2,3 [--variants ...]`.

Every seed is a whole `demo --compare` in `<out>/seed_<s>/`: its own SFT base (the seed changes
the base's initialisation and data order, so the pooled CI covers base variation too), its own
held-out draw, every variant trained from that base. Each stage is cached per seed, as in the
one-seed demo, so a rerun only does what is missing.

`compare_report.json` then holds:
- per seed, the base's and every variant's per-problem held-out correctness (sample by sample),
  so that every figure can be recomputed;
- per variant, the pooled gain over the base: the mean over seeds of the seed's mean paired
  difference, with a bootstrap CI that resamples problems within each seed
  (`eval.metrics.pooled_paired_bootstrap`);
- per pair in PAIRS present (TRACE vs GRPO, TRACE vs the random mask), the pooled difference
  between the two variants on the same problems of the same seed, with its CI.
A table is printed and a forest plot of the pairwise differences drawn (`forest.png`).
"""

from __future__ import annotations

import json
import os

__all__ = ["PAIRS", "format_study", "run_study", "study_statistics"]

# (a, b): the pooled difference a - b, reported when both variants ran
PAIRS = (("trace_fkl", "grpo"), ("trace_rkl", "grpo"), ("trace_fkl", "random_mask"), ("trace_rkl", "random_mask"))


def _scores(correct: dict[str, list[bool]], order: list[str]) -> list[float]:
    return [sum(correct[i]) / len(correct[i]) for i in order]


def _accuracy(correct: dict[str, list[bool]], order: list[str]) -> float:
    return sum(_scores(correct, order)) / len(order)


def study_statistics(per_seed: dict[str, dict], *, num_samples: int = 4000, seed: int = 0) -> dict:
    """Pooled gains and pairwise differences from per-seed correctness (pure; no training).

    per_seed: seed -> {"base": {problem: [bool, ...]}, "variants": {variant: {problem: [bool, ...]}}}.
    Problems are paired by id within a seed; every variant of a seed must have its base's."""
    from .eval.metrics import pooled_paired_bootstrap

    seeds = sorted(per_seed, key=lambda s: int(s) if str(s).lstrip("-").isdigit() else str(s))
    variants = [v for v in per_seed[seeds[0]]["variants"] if all(v in per_seed[s]["variants"] for s in seeds)]
    order = {}
    for s in seeds:
        order[s] = sorted(per_seed[s]["base"], key=lambda i: int(i))
        for v in variants:
            if set(per_seed[s]["variants"][v]) != set(order[s]):
                raise ValueError(f"seed {s}: {v}'s held-out problems differ from the base's")

    def pooled(a_of, b_of) -> dict:
        after = [_scores(a_of(s), order[s]) for s in seeds]
        before = [_scores(b_of(s), order[s]) for s in seeds]
        mean, (lo, hi) = pooled_paired_bootstrap(after, before, num_samples=num_samples, seed=seed)
        per = [(sum(a) - sum(b)) / len(a) for a, b in zip(after, before)]
        return {"mean": mean, "ci95": [lo, hi], "per_seed": dict(zip(seeds, per))}

    gains = {v: pooled(lambda s, v=v: per_seed[s]["variants"][v], lambda s: per_seed[s]["base"]) for v in variants}
    for v in variants:
        gains[v]["accuracy_per_seed"] = {s: _accuracy(per_seed[s]["variants"][v], order[s]) for s in seeds}
    pairs = {f"{a} - {b}": pooled(lambda s, a=a: per_seed[s]["variants"][a], lambda s, b=b: per_seed[s]["variants"][b])
             for a, b in PAIRS if a in variants and b in variants}
    base = {s: _accuracy(per_seed[s]["base"], order[s]) for s in seeds}
    return {"seeds": seeds, "variants": variants, "base_accuracy": base, "gains": gains, "pairs": pairs,
            "num_problems": {s: len(order[s]) for s in seeds}}


def format_study(stats: dict) -> str:
    seeds = stats["seeds"]
    base = ", ".join(f"{100 * stats['base_accuracy'][s]:.1f}%" for s in seeds)
    lines = [f"seeds {', '.join(map(str, seeds))}; bases (held-out avg@k): {base}", "",
             "| variant | pooled gain [95% CI] | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "| --- | --- | " + " | ".join("---" for _ in seeds) + " |"]
    for v, g in stats["gains"].items():
        lo, hi = g["ci95"]
        per = " | ".join(f"{100 * g['per_seed'][s]:+.1f}" for s in seeds)
        lines.append(f"| {v} | {100 * g['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | {per} |")
    if stats["pairs"]:
        lines += ["", "| difference | pooled [95% CI] | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in seeds) + " |"]
        for name, d in stats["pairs"].items():
            lo, hi = d["ci95"]
            per = " | ".join(f"{100 * d['per_seed'][s]:+.1f}" for s in seeds)
            lines.append(f"| {name} | {100 * d['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | {per} |")
    lines.append("points of held-out avg@k; CIs resample problems within each seed")
    return "\n".join(lines)


def run_study(out: str, *, seeds: list[int], config: str, sft_config: str, overrides: list[str],
              variants: list[str] | None = None) -> dict:
    """Every seed's `demo --compare` (cached per seed), then the pooled statistics, the table and
    the forest plot; writes and returns compare_report.json's content."""
    from .config import load_config
    from .demo import run_demo
    from .observability.plots import forest_plot

    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"--seeds: give distinct seeds, got {seeds}")
    out = os.path.abspath(out)
    reports = {}
    for s in seeds:
        print(f"[demo] seed {s}: {os.path.join(out, f'seed_{s}')}", flush=True)
        reports[str(s)] = run_demo(os.path.join(out, f"seed_{s}"), config=config, sft_config=sft_config,
                                   overrides=[*overrides, f"seed={s}"], compare=True, variants=variants)
    per_seed = {s: {"base": r["base_correct"], "variants": {v: m["correct"] for v, m in r["variants"].items()}}
                for s, r in reports.items()}
    boot_seed = load_config(config, overrides).seed
    stats = study_statistics(per_seed, seed=boot_seed)
    rows = [(name, d["mean"], *d["ci95"]) for name, d in stats["pairs"].items()]
    rows += [(f"{v} - base", g["mean"], *g["ci95"]) for v, g in stats["gains"].items()]
    plot = forest_plot(rows, os.path.join(out, "forest.png"),
                       title=f"pooled held-out differences, seeds {', '.join(map(str, seeds))} (95% CI)")
    report = {**stats, "per_seed": per_seed, "forest_plot": plot,
              "seed_reports": {s: os.path.join(out, f"seed_{s}", "demo_report.json") for s in reports},
              "wall_seconds": {s: r["wall_seconds"] for s, r in reports.items()},
              "base_weights_sha256": {s: r["sft"].get("weights_sha256") for s, r in reports.items()}}
    with open(os.path.join(out, "compare_report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    return report

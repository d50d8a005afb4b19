"""The numbers of a scaling report.

- A cell (size x variant) is the benchmark average of `--metric` (avg@k or pass@k), averaged over
  its seeds, with a 95% CI: Student's t over the seeds' values when there are two or more, else a
  percentile bootstrap over problems (resampled within each benchmark, the benchmarks averaged
  with equal weight, as the average itself is).
- A paired difference (variant - baseline at one size) uses the seeds both have and, within each
  seed and benchmark, the same problems: the mean over (seed, benchmark) groups of the mean
  per-problem difference, with `pooled_paired_bootstrap`'s CI (problems resampled within groups).
- Compute per run comes from its metrics.jsonl and its layout (compute.py).
"""

from __future__ import annotations

import math
import statistics

from ..eval.metrics import pass_at_k, pooled_paired_bootstrap
from .runs import Run, load_samples

__all__ = ["METRICS", "benchmark_value", "cell_summary", "paired_difference", "problem_scores", "run_value",
           "t_quantile_975"]

METRICS = ("avg@k", "pass@k")

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom: a table to 30, then the
    expansion in 1/df around the normal quantile (Abramowitz & Stegun 26.7.5), exact to 1e-4."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")


def benchmark_value(b: dict, metric: str) -> float:
    """One benchmark's entry of eval.json -> the metric (pass@k is the harness's `pass@<k>`)."""
    _check_metric(metric)
    return float(b["avg@k"] if metric == "avg@k" else b[f"pass@{b['k']}"])


def run_value(run: Run, metric: str) -> float:
    """The unweighted average over the run's benchmarks (eval.json's `average` for avg@k)."""
    bs = run.eval["benchmarks"]
    return sum(benchmark_value(b, metric) for b in bs.values()) / len(bs)


def problem_scores(samples: dict[int, list[bool]], metric: str, k: int) -> dict[int, float]:
    """Per problem: the fraction of correct samples (avg@k) or the unbiased pass@k."""
    _check_metric(metric)
    if metric == "avg@k":
        return {i: sum(c) / len(c) for i, c in samples.items()}
    return {i: pass_at_k(len(c), sum(c), min(k, len(c))) for i, c in samples.items()}


def _scores(run: Run, metric: str, cache: dict) -> dict[str, dict[int, float]] | None:
    """benchmark -> problem -> score, from the run's samples.jsonl (None when there is none)."""
    if run.run_dir not in cache:
        samples = load_samples(run.eval_dir) if run.eval_dir else {}
        ks = {b: v["k"] for b, v in run.eval["benchmarks"].items()}
        cache[run.run_dir] = {b: problem_scores(samples[b], metric, ks[b]) for b in ks if b in samples} or None
    return cache[run.run_dir]


def _mean_ci(values: list[float]) -> tuple[float, list[float]]:
    """Mean and Student's t interval, clipped to [0, 1] (the metric's range: with two seeds the
    t interval is wide and would otherwise leave it)."""
    mean = sum(values) / len(values)
    half = t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, [max(0.0, mean - half), min(1.0, mean + half)]


def cell_summary(runs: list[Run], metric: str, *, cache: dict, seed: int = 0) -> dict:
    """The evaluated runs of one cell (one per seed) -> mean, CI, how the CI was made, the
    per-seed values and the same per benchmark."""
    values = {str(r.seed): run_value(r, metric) for r in runs}
    out: dict = {"n_seeds": len(runs), "per_seed": values, "benchmarks": {}}
    names = sorted({b for r in runs for b in r.eval["benchmarks"]})
    for b in names:
        vals = [benchmark_value(r.eval["benchmarks"][b], metric) for r in runs if b in r.eval["benchmarks"]]
        if len(vals) >= 2:
            m, ci = _mean_ci(vals)
            out["benchmarks"][b] = {"mean": m, "ci95": ci, "n_seeds": len(vals)}
        else:
            entry = next(r.eval["benchmarks"][b] for r in runs if b in r.eval["benchmarks"])
            ci = list(entry["ci95"]) if metric == "avg@k" else None
            out["benchmarks"][b] = {"mean": vals[0], "ci95": ci, "n_seeds": 1}
    if len(runs) >= 2:
        out["mean"], out["ci95"] = _mean_ci(list(values.values()))
        out["ci_kind"] = f"t over {len(runs)} seeds"
        return out
    scores = _scores(runs[0], metric, cache)
    out["mean"] = next(iter(values.values()))
    if scores is None:
        out["ci95"], out["ci_kind"] = None, "no samples.jsonl: no CI"
        return out
    groups = [[scores[b][i] for i in sorted(scores[b])] for b in sorted(scores)]
    _, ci = pooled_paired_bootstrap(groups, [[0.0] * len(g) for g in groups], seed=seed)
    out["ci95"], out["ci_kind"] = list(ci), "bootstrap over problems (1 seed)"
    return out


def paired_difference(runs: list[Run], base: list[Run], metric: str, *, cache: dict, seed: int = 0) -> dict:
    """variant - baseline at one size over the seeds both evaluated (problems paired by index)."""
    by_seed = {r.seed: r for r in base}
    pairs = [(r, by_seed[r.seed]) for r in runs if r.seed in by_seed]
    if not pairs:
        return {"mean": None, "ci95": None, "seeds": [], "reason": "no seed evaluated on both sides"}
    after, before, per_seed = [], [], {}
    for a, b in pairs:
        sa, sb = _scores(a, metric, cache), _scores(b, metric, cache)
        if sa is None or sb is None:
            return {"mean": None, "ci95": None, "seeds": [str(a.seed) for a, _ in pairs],
                    "reason": f"no samples.jsonl in {(a if sa is None else b).eval_dir}"}
        diffs = []
        for bench in sorted(set(sa) & set(sb)):
            common = sorted(set(sa[bench]) & set(sb[bench]))
            if not common:
                continue
            after.append([sa[bench][i] for i in common])
            before.append([sb[bench][i] for i in common])
            diffs.append(sum(x - y for x, y in zip(after[-1], before[-1])) / len(common))
        per_seed[str(a.seed)] = sum(diffs) / len(diffs) if diffs else None
    if not after:
        return {"mean": None, "ci95": None, "seeds": list(per_seed), "reason": "no problem evaluated on both sides"}
    mean, ci = pooled_paired_bootstrap(after, before, seed=seed)
    return {"mean": mean, "ci95": list(ci), "seeds": list(per_seed), "per_seed": per_seed, "groups": len(after)}

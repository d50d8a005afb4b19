"""Evaluation statistics: avg@k, the unbiased pass@k estimator, percentile bootstrap confidence
intervals over problems, and their pooled form over seeds (`pooled_paired_bootstrap`)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

__all__ = ["avg_at_k", "bootstrap_ci", "pass_at_k", "pass_at_k_mean", "paired_bootstrap_ci", "pooled_paired_bootstrap"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n samples, c of
    them correct, is correct: 1 - C(n-c, k) / C(n, k) (the unbiased estimator of pass@k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # The product form avoids huge binomials: prod_{i=n-c+1}^{n} (1 - k / i).
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of correct samples (each problem weighs the same)."""
    if not correct:
        return float("nan")
    return sum(sum(row) / len(row) for row in correct) / len(correct)


def pass_at_k_mean(correct: Sequence[Sequence[bool]], k: int) -> float:
    if not correct:
        return float("nan")
    return sum(pass_at_k(len(row), sum(row), k) for row in correct) / len(correct)


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default rule)."""
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def bootstrap_ci(scores: Sequence[float], *, num_samples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-problem scores (problems resampled with replacement)."""
    n = len(scores)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(sum(scores[rng.randrange(n)] for _ in range(n)) / n for _ in range(num_samples))
    a = (1.0 - confidence) / 2
    return (_quantile(means, a), _quantile(means, 1.0 - a))


def paired_bootstrap_ci(after: Sequence[float], before: Sequence[float], *, num_samples: int = 2000,
                        confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(after - before) over the same problems (paired resampling)."""
    if len(after) != len(before):
        raise ValueError(f"paired scores differ in length: {len(after)} vs {len(before)}")
    return bootstrap_ci([a - b for a, b in zip(after, before)], num_samples=num_samples, confidence=confidence,
                        seed=seed)


def pooled_paired_bootstrap(after: Sequence[Sequence[float]], before: Sequence[Sequence[float]], *,
                            num_samples: int = 4000, confidence: float = 0.95,
                            seed: int = 0) -> tuple[float, tuple[float, float]]:
    """The mean over seeds of the per-seed mean paired difference (after - before on the same
    problems of that seed), and its percentile bootstrap CI resampling problems *within* each
    seed: every replicate draws each seed's problems with replacement and averages the seeds'
    means, so each seed weighs the same and the CI covers the problems' spread in every seed.

    after[s], before[s]: per-problem scores of seed s (same problems, same order; seeds may have
    different problems and counts). Draws: torch.Generator(seed), one `randint` of
    [num_samples, n_s] per seed in seed order (the reference in the tests uses the same draws).
    """
    import torch

    if len(after) != len(before) or not after:
        raise ValueError(f"pooled bootstrap needs the same number (>= 1) of seeds on both sides, got "
                         f"{len(after)} and {len(before)}")
    diffs = []
    for s, (a, b) in enumerate(zip(after, before)):
        if len(a) != len(b) or not a:
            raise ValueError(f"seed #{s}: paired scores differ in length or are empty: {len(a)} vs {len(b)}")
        diffs.append(torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64))
    mean = float(torch.stack([d.mean() for d in diffs]).mean())
    gen = torch.Generator().manual_seed(seed)
    reps = torch.zeros(num_samples, dtype=torch.float64)
    for d in diffs:
        idx = torch.randint(len(d), (num_samples, len(d)), generator=gen)
        reps += d[idx].mean(dim=1)
    reps = sorted((reps / len(diffs)).tolist())
    a = (1.0 - confidence) / 2
    return mean, (_quantile(reps, a), _quantile(reps, 1.0 - a))

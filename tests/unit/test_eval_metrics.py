"""Evaluation statistics against brute force and closed forms."""

import itertools
import math
import random

import pytest

from megatron_trace.eval import (
    avg_at_k,
    bootstrap_ci,
    paired_bootstrap_ci,
    pass_at_k,
    pass_at_k_mean,
    pooled_paired_bootstrap,
    summarize,
)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_brute_force_over_subsets(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
            assert math.isclose(pass_at_k(n, c, k), brute, abs_tol=1e-12), (n, c, k)
            assert math.isclose(pass_at_k(n, c, k), 1 - math.comb(n - c, k) / math.comb(n, k), abs_tol=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_avg_and_pass_means_weigh_problems_equally():
    correct = [[True, False, False, False], [True, True, True, True], [False, False, False, False]]
    assert math.isclose(avg_at_k(correct), (0.25 + 1 + 0) / 3)
    assert math.isclose(pass_at_k_mean(correct, 1), avg_at_k(correct))  # pass@1 is avg@k
    assert math.isclose(pass_at_k_mean(correct, 4), 2 / 3)


def test_bootstrap_matches_the_exact_bootstrap_distribution():
    # n = 4 problems: all 4^4 equally likely resamples give the exact bootstrap distribution.
    scores = [0.0, 0.25, 1.0, 0.5]
    means = sorted(sum(scores[i] for i in idx) / 4 for idx in itertools.product(range(4), repeat=4))

    def q(p):  # same interpolation rule as the implementation
        pos = p * (len(means) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return means[lo] + (means[hi] - means[lo]) * (pos - lo)

    lo, hi = bootstrap_ci(scores, num_samples=40000, seed=1)
    assert abs(lo - q(0.025)) <= 0.02 and abs(hi - q(0.975)) <= 0.02


def test_bootstrap_agrees_with_the_normal_approximation_for_many_problems():
    rng = random.Random(0)
    scores = [float(rng.random() < 0.3) for _ in range(400)]
    p = sum(scores) / len(scores)
    half = 1.96 * math.sqrt(p * (1 - p) / len(scores))
    lo, hi = bootstrap_ci(scores, num_samples=4000, seed=2)
    assert abs(lo - (p - half)) <= 0.01 and abs(hi - (p + half)) <= 0.01


def test_paired_ci_of_a_constant_gain_is_that_gain():
    before = [0.0, 0.5, 0.25, 1.0]
    lo, hi = paired_bootstrap_ci([b + 0.1 for b in before], before, num_samples=500)
    assert math.isclose(lo, 0.1) and math.isclose(hi, 0.1)
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_ci([1.0], [1.0, 2.0])


def test_summarize_rates():
    def rec(correct, grade, finish, length):
        return {"correct": correct, "grade": grade, "finish_reason": finish, "length": length}

    per_problem = [[rec(True, "correct", "stop", 10), rec(False, "no_answer", "length", 30)],
                   [rec(False, "wrong", "stop", 20), rec(False, "timeout", "stop", 40)]]
    s = summarize(per_problem, 2, bootstrap_samples=200)
    assert s["avg@k"] == 0.25 and s["pass@2"] == 0.5 and s["pass@1"] == 0.25 and s["num_problems"] == 2
    assert s["mean_length"] == 25 and s["truncation_rate"] == 0.25 and s["no_answer_rate"] == 0.25
    assert s["timeout_rate"] == 0.25 and s["ci95"][0] <= 0.25 <= s["ci95"][1]


def _slow_pooled(after, before, num_samples, confidence, seed):
    """The pooled bootstrap written out loop by loop, on the same draws (one randint per seed)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    draws = [torch.randint(len(a), (num_samples, len(a)), generator=gen).tolist() for a in after]
    reps = []
    for r in range(num_samples):
        per_seed = []
        for s, (a, b) in enumerate(zip(after, before)):
            picks = draws[s][r]
            per_seed.append(sum(a[i] - b[i] for i in picks) / len(picks))
        reps.append(sum(per_seed) / len(per_seed))
    reps.sort()
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    return _np_quantile(reps, lo_q), _np_quantile(reps, hi_q)


def _np_quantile(xs, q):
    import numpy as np

    return float(np.quantile(np.asarray(xs), q))


def test_pooled_paired_bootstrap_against_direct_computation():
    """The pooled gain is the mean over seeds of each seed's mean paired difference (exactly);
    its CI equals a slow reference bootstrap on the same draws, and resamples within seeds."""
    import random

    rng = random.Random(3)
    after = [[rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(n)] for n in (30, 45, 20)]
    before = [[rng.choice([0.0, 0.25, 0.5]) for _ in a] for a in after]
    mean, (lo, hi) = pooled_paired_bootstrap(after, before, num_samples=700, seed=11)
    direct = sum(sum(x - y for x, y in zip(a, b)) / len(a) for a, b in zip(after, before)) / 3
    assert mean == pytest.approx(direct, abs=1e-15)
    ref_lo, ref_hi = _slow_pooled(after, before, 700, 0.95, 11)
    assert (lo, hi) == (pytest.approx(ref_lo, abs=1e-12), pytest.approx(ref_hi, abs=1e-12))
    assert lo < mean < hi
    # Each seed weighs the same: a seed with a constant difference pulls the mean by 1/3 of it.
    shifted = [[x + 0.3 for x in after[0]], after[1], after[2]]
    assert pooled_paired_bootstrap(shifted, before, num_samples=50)[0] == pytest.approx(direct + 0.1)
    # One seed: the same point estimate as the single-seed paired mean, CI close to paired_bootstrap_ci's.
    one, (l1, h1) = pooled_paired_bootstrap(after[:1], before[:1], num_samples=4000, seed=1)
    pl, ph = paired_bootstrap_ci(after[0], before[0], num_samples=4000, seed=1)
    assert one == pytest.approx(sum(a - b for a, b in zip(after[0], before[0])) / 30)
    assert abs(l1 - pl) < 0.03 and abs(h1 - ph) < 0.03
    with pytest.raises(ValueError, match="seed #1"):
        pooled_paired_bootstrap([[1.0], [1.0, 0.0]], [[1.0], [1.0]])
    with pytest.raises(ValueError, match="same number"):
        pooled_paired_bootstrap([[1.0]], [])

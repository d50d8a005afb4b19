"""The hf engine's sampler (rollout/sampling.py): the counter-based generator against a pure-Python
splitmix64, its uniforms and the sampled tokens against their distributions (chi-square), and the
inverse CDF's edges."""

import random

import pytest
import torch

from megatron_trace.rollout.sampling import _inverse_cdf, counter_uniforms, sample_next, splitmix64

M64 = (1 << 64) - 1


def _fmix(x: int) -> int:  # splitmix64's finaliser on Python ints, the unsigned algorithm as published
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _uniform(seed: int, position: int) -> float:
    state = _fmix(seed & M64)
    z = _fmix((state + (position + 1) * 0x9E3779B97F4A7C15) & M64)
    return (z >> 11) * 2.0 ** -53


def _chi2_pvalue(stat: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum()), len(probs) - 1


def test_chi2_pvalue_matches_tables():
    # upper quantiles of the chi-square distribution (any statistics table)
    assert _chi2_pvalue(16.919, 9) == pytest.approx(0.05, abs=2e-4)
    assert _chi2_pvalue(21.666, 9) == pytest.approx(0.01, abs=1e-4)
    assert _chi2_pvalue(3.841, 1) == pytest.approx(0.05, abs=2e-4)


def test_counter_uniforms_match_a_python_splitmix64():
    rng = random.Random(0)
    seeds = [0, 1, 2, 2**31 - 2, 2**31 - 1, 12345] + [rng.randrange(2**31) for _ in range(200)]
    for position in (0, 1, 47, 4095, 10**6):
        got = counter_uniforms(torch.tensor(seeds), position).tolist()
        assert got == [_uniform(s, position) for s in seeds]  # bit for bit, wraparound included
    x = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)], dtype=torch.int64)
    want = [_fmix(v & M64) for v in x.tolist()]
    assert [v & M64 for v in splitmix64(x).tolist()] == want
    # a tensor of positions (one per row) equals the scalar form
    pos = torch.tensor([3, 3, 9])
    assert counter_uniforms(torch.tensor([5, 6, 7]), pos).tolist() == [_uniform(5, 3), _uniform(6, 3), _uniform(7, 9)]


@pytest.mark.parametrize("axis", ["seeds", "positions"])
def test_uniforms_are_uniform(axis):
    n, bins = 20000, 20
    if axis == "seeds":  # consecutive seeds at one position (the rows of a batch)
        u = counter_uniforms(torch.arange(n), 3)
    else:  # one seed along the response (a row's tokens)
        u = torch.cat([counter_uniforms(torch.tensor([77]), t) for t in range(n)])
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    counts = torch.bincount((u * bins).long(), minlength=bins).double()
    stat, df = _chi2(counts, torch.full((bins,), 1.0 / bins, dtype=torch.float64))
    assert _chi2_pvalue(stat, df) > 0.001, stat
    # neighbours are not correlated
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.03


def _filtered_reference(logits: list[float], temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p in float64, written out independently of the engine's tensor code."""
    z = [x / temperature for x in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = order[:top_k] if top_k > 0 else order
    p = torch.softmax(torch.tensor([z[i] for i in keep], dtype=torch.float64), 0).tolist()
    kept, mass = [], 0.0
    for i, q in zip(keep, p):
        if mass >= top_p:
            break
        kept.append(i)
        mass += q
    w = torch.zeros(len(z), dtype=torch.float64)
    for i in kept:
        w[i] = torch.tensor(z[i], dtype=torch.float64).exp()
    return w / w.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, -1, 1.0), (0.8, 7, 0.9), (1.3, 4, 1.0),
                                                       (1.0, -1, 0.75)])
def test_sampler_draws_the_filtered_distribution(temperature, top_k, top_p):
    logits = [1.2, 0.3, -0.5, 2.0, 0.9, -1.5, 0.0, 1.6, -0.2, 0.4]
    n = 20000
    probs = _filtered_reference(logits, temperature, top_k, top_p)
    batch = torch.tensor(logits, dtype=torch.float32).expand(n, -1).contiguous()
    tokens, logp = sample_next(batch, torch.arange(n) * 7 + 1, 5, temperature, top_k, top_p)
    counts = torch.bincount(tokens, minlength=len(logits)).double()
    assert counts[probs == 0].sum() == 0  # filtered tokens never drawn
    support = probs > 0
    stat, df = _chi2(counts[support], probs[support])
    assert _chi2_pvalue(stat, df) > 0.001, (stat, counts.tolist(), probs.tolist())
    # the reported log-prob is the tempered, unfiltered one
    want = torch.log_softmax(torch.tensor(logits, dtype=torch.float64) / temperature, 0)[tokens]
    assert torch.allclose(logp.double(), want, atol=1e-6)


def test_greedy_and_top_k_one_take_the_argmax():
    logits = torch.randn(50, 30, generator=torch.Generator().manual_seed(0))
    g, lp = sample_next(logits, torch.arange(50), 0, 0.0)
    assert torch.equal(g, logits.argmax(-1))
    assert torch.allclose(lp, torch.log_softmax(logits, -1).gather(1, g[:, None])[:, 0])
    k1, _ = sample_next(logits, torch.arange(50), 0, 1.0, top_k=1)
    assert torch.equal(k1, g)


def test_a_row_depends_on_its_seed_and_position_only():
    logits = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    seeds = torch.arange(100, 108)
    full, _ = sample_next(logits, seeds, 4, 1.0)
    alone = torch.cat([sample_next(logits[i:i + 1], seeds[i:i + 1], 4, 1.0)[0] for i in range(8)])
    assert torch.equal(full, alone)
    later = torch.stack([sample_next(logits, seeds, t, 1.0)[0] for t in range(20)])
    assert (later != later[0]).any()  # the position changes the draw


def test_inverse_cdf_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.2, 0.3, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.25, 0.75, 0.0]])
    top = torch.full((3,), 1 - 2.0 ** -53, dtype=torch.float64)  # the largest uniform
    assert _inverse_cdf(probs, top).tolist() == [2, 1, 3]
    assert _inverse_cdf(probs, torch.zeros(3, dtype=torch.float64)).tolist() == [0, 1, 2]
    # u exactly on a CDF step goes to the next token: P(token 0) = P(u < 0.2)
    assert _inverse_cdf(probs[:1], torch.tensor([0.2], dtype=torch.float64)).tolist() == [1]

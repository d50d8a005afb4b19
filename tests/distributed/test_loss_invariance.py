"""The routed loss and its gradient do not depend on DP size or micro-batching (gloo, DP=2).

Normalisation uses global counts, so the step loss is the plain sum of micro-batch/rank partials,
and each token's gradient is the same wherever it is computed. Metrics reduce to the same values.
"""

import math

import pytest
import torch

from megatron_trace.loss import GlobalCounts, LossConfig, LossInputs, Stats, routed_loss
from megatron_trace.parallel import run_on_ranks

VOCAB, WIDTH, B = 50, 64, 8
CFGS = {
    "token-mean": LossConfig(variant="trace_both"),
    "seq-mean-token-mean": LossConfig(variant="trace_both", agg="seq-mean-token-mean", entropy_coef=0.01),
    "sum-norm": LossConfig(variant="all_token_fkl", agg="seq-mean-token-sum-norm", max_response_len=9),
}


def problem():
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(2, 9, (B,), generator=g)
    seq_ids = torch.repeat_interleave(torch.arange(B), lens)
    T = int(lens.sum())
    logits = torch.randn(T, WIDTH, generator=g) * 2
    teacher = torch.randn(T, WIDTH, generator=g) * 2
    batch = LossInputs(
        targets=torch.randint(0, VOCAB, (T,), generator=g),
        old_logprobs=-torch.rand(T, generator=g, dtype=torch.float64) * 4,
        advantages=torch.randn(B, generator=g, dtype=torch.float64)[seq_ids],
        routes=torch.randint(0, 3, (T,), generator=g).to(torch.int8),
        seq_ids=seq_ids,
        seq_lens=lens,
    )
    return logits, teacher, batch, GlobalCounts(T, B)


def select(logits, teacher, batch, rollouts):
    """The sub-batch holding `rollouts` (whole rollouts), re-indexed from 0."""
    tok = torch.isin(batch.seq_ids, torch.tensor(rollouts))
    remap = {r: i for i, r in enumerate(rollouts)}
    sub = LossInputs(batch.targets[tok], batch.old_logprobs[tok], batch.advantages[tok], batch.routes[tok],
                     torch.tensor([remap[int(s)] for s in batch.seq_ids[tok]]), batch.seq_lens[rollouts])
    routed = sub.routes != 0
    return logits[tok], teacher[tok][routed], sub, tok


def run(rollout_groups, cfg, group=None):
    """Loss partials summed over micro-batches; per-token grads scattered back; merged stats."""
    logits, teacher, batch, counts = problem()
    grad = torch.zeros_like(logits)
    total, stats = 0.0, Stats()
    for rollouts in rollout_groups:
        x, t, sub, tok = select(logits, teacher, batch, rollouts)
        x = x.clone().requires_grad_()
        loss, st = routed_loss(x, t, sub, counts, cfg, lam=0.3, vocab_size=VOCAB)
        loss.backward()
        grad[tok] = x.grad
        total += loss.item()
        stats.merge(st)
    return total, grad, stats.reduce(group)


def _dp_rank(cfg_name):
    import torch.distributed as dist

    from megatron_trace.parallel import initialize

    groups = initialize()  # world 2, tp 1 -> DP = 2
    rank, cfg = dist.get_rank(), CFGS[cfg_name]
    mine = [[r] for r in range(B) if r % 2 == rank]  # each rank: its rollouts, one micro-batch each
    total, grad, metrics = run(mine, cfg, group=groups.dp)
    t = torch.tensor([total], dtype=torch.float64)
    dist.all_reduce(t, group=groups.dp)
    return t.item(), grad, metrics, groups.dp_size


@pytest.fixture(scope="module")
def reference():
    return {name: run([list(range(B))], cfg) for name, cfg in CFGS.items()}


def _same(a, b, tol=1e-6):
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or abs(a[k] - b[k]) <= tol * max(1.0, abs(a[k])), k


@pytest.mark.parametrize("name", sorted(CFGS))
def test_four_micro_batches_equal_one(reference, name):
    total, grad, metrics = run([[0, 1], [2, 3, 4], [5], [6, 7]], CFGS[name])
    ref_total, ref_grad, ref_metrics = reference[name]
    assert abs(total - ref_total) <= 1e-6 and torch.allclose(grad, ref_grad, rtol=0, atol=1e-6)
    _same(metrics, ref_metrics)


@pytest.mark.dist
@pytest.mark.parametrize("name", sorted(CFGS))
def test_dp2_equals_dp1(reference, name):
    results = run_on_ranks(_dp_rank, 2, name)
    ref_total, ref_grad, ref_metrics = reference[name]
    grad = torch.zeros_like(ref_grad)
    for total, g, metrics, dp in results:
        assert dp == 2 and abs(total - ref_total) <= 1e-6
        _same(metrics, ref_metrics)
        grad += g  # each rank filled only its own tokens
    assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-6)
    assert ref_grad.abs().max() > 1e-3  # the comparison is not between zeros

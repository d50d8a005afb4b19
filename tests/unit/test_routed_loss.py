"""The routed objective: a hand-computed example, a dense float64 reference, metrics."""

import math

import dense_reference as ref
import pytest
import torch

from megatron_trace.loss import GlobalCounts, LossConfig, LossInputs, Route, Stats, routed_loss

LN2, LN3 = math.log(2), math.log(3)


def _hand_batch():
    # rollout 0 (correct, A=+1): tokens 0, 1; rollout 1 (incorrect, A=-1): token 2. Token 1 is FKL-routed.
    logits = torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0], [0.0, LN3, 0.0]], dtype=torch.float64, requires_grad=True)
    batch = LossInputs(
        targets=torch.tensor([0, 0, 1]),
        old_logprobs=torch.tensor([-LN3, math.log(0.4), math.log(0.3)], dtype=torch.float64),
        advantages=torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64),
        routes=torch.tensor([Route.GRPO, Route.FKL, Route.GRPO], dtype=torch.int8),
        seq_ids=torch.tensor([0, 0, 1]),
        seq_lens=torch.tensor([2, 1]),
    )
    teacher = torch.tensor([[0.0, LN2, 0.0]], dtype=torch.float64)
    return logits, batch, teacher


def test_hand_computed_example_value_and_gradient():
    logits, batch, teacher = _hand_batch()
    cfg = LossConfig(entry_clip=None)
    loss, stats = routed_loss(logits, teacher, batch, GlobalCounts(3, 2), cfg, lam=0.25)
    # GRPO: ratios 1, 1.25 (unclipped, < 1.28), 2 (A<0: the unclipped branch binds)
    pg = (1 / 3) * (-1.0 + 0.5 * -1.25 + 2.0)  # routed token weighted 1 - 0.25/0.5
    kl = 0.25 / (2 * 2) * (0.25 * LN2)  # FKL(p=[.25,.5,.25] || q=[.5,.25,.25]) = ln2/4
    assert loss.item() == pytest.approx(pg + kl, abs=1e-12)
    loss.backward()
    want = torch.tensor([
        [-(1 / 3) * (2 / 3), (1 / 3) * (1 / 3), (1 / 3) * (1 / 3)],
        [-1.25 / 6 * 0.5 + 0.0625 * 0.25, 1.25 / 6 * 0.25 - 0.0625 * 0.25, 1.25 / 6 * 0.25],  # KL coef 0.25/(2*2)
        [(2 / 3) * -0.2, (2 / 3) * 0.4, (2 / 3) * -0.2],
    ], dtype=torch.float64)
    assert torch.allclose(logits.grad, want, atol=1e-12)
    m = stats.reduce()
    assert m["route/fkl_frac"] == pytest.approx(1 / 3) and m["route/grpo_frac"] == pytest.approx(2 / 3)
    assert m["kl/fkl_mean"] == pytest.approx(0.25 * LN2) and math.isnan(m["kl/rkl_mean"])
    assert m["ppo/ratio_max"] == pytest.approx(2.0) and m["ppo/ratio_min"] == pytest.approx(1.0)
    assert m["ppo/clip_frac_high"] == 0 and m["ppo/clip_frac_low"] == 0
    assert m["route/span_coverage"] == pytest.approx((1 / 2 + 0) / 2) and m["kl/lambda"] == 0.25
    assert m["loss/total"] == pytest.approx(pg + kl) and m["loss/kl"] == pytest.approx(kl)


def test_hand_computed_clip_and_aggregation_modes():
    logits, batch, teacher = _hand_batch()
    loss, stats = routed_loss(logits, teacher, batch, GlobalCounts(3, 2), LossConfig(entry_clip=0.05), lam=0.25)
    d = 0.25 * math.log(0.5) + 0.05 + 0.0  # the +0.5*ln2 entry is clipped to 0.05
    assert stats.reduce()["kl/fkl_mean"] == pytest.approx(d) and stats.reduce()["kl/entry_clip_frac"] == pytest.approx(1 / 3)
    seq = LossConfig(entry_clip=None, agg="seq-mean-token-mean")
    loss, _ = routed_loss(logits, teacher, batch, GlobalCounts(3, 2), seq, lam=0.0)
    assert loss.item() == pytest.approx(0.25 * -1 + 0.25 * -1.25 + 0.5 * 2)  # lam=0: span weight back to 1
    norm = LossConfig(entry_clip=None, agg="seq-mean-token-sum-norm", max_response_len=4)
    loss, _ = routed_loss(logits, None, batch, GlobalCounts(3, 2), norm, lam=0.0)
    assert loss.item() == pytest.approx((-1 - 1.25 + 2) / (4 * 2))


def _dense_objective(logits, teacher_full, batch, counts, cfg, lam, vocab):
    """Independent float64 implementation of the same objective on full (unsharded) logits."""
    z = logits[:, :vocab].double()
    lp, ent = ref.logprob_entropy(z, batch.targets, cfg.temperature)
    ratio = torch.exp(lp - batch.old_logprobs.double())
    a = batch.advantages.double()
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * a)
    routed = batch.routes != 0
    lens = batch.seq_lens[batch.seq_ids].double()
    w = {"token-mean": torch.full_like(lp, 1 / counts.num_tokens),
         "seq-mean-token-mean": 1 / (lens * counts.num_seqs)}[cfg.agg]
    span_w = {"anneal": 1 - lam / cfg.lambda0, "full": 1.0, "none": 0.0}[cfg.span_grpo_mode]
    span = torch.where(routed, torch.tensor(span_w, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    loss = (span * w * pg).sum()
    for route, kind in ((1, "forward"), (2, "reverse")):
        m = batch.routes == route
        if m.any() and lam > 0:
            d = ref.divergence(z[m], teacher_full[m][:, :vocab], kind, cfg.temperature, cfg.entry_clip)
            loss = loss + (lam / (lens[m] * counts.num_seqs) * d).sum()
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * (w * ent).sum()
    return loss


def random_problem(seed, T=24, B=5, vocab=50, width=64, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 8, (B,), generator=g)
    lens[-1] = T - lens[:-1].sum() if T > lens[:-1].sum() else 1
    seq_ids = torch.repeat_interleave(torch.arange(B), lens)[:T]
    T = seq_ids.numel()
    logits = torch.randn(T, width, generator=g, dtype=dtype) * 2
    teacher = torch.randn(T, width, generator=g, dtype=dtype) * 2
    targets = torch.randint(0, vocab, (T,), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)[seq_ids]
    old = -torch.rand(T, generator=g, dtype=torch.float64) * 5
    routes = torch.randint(0, 3, (T,), generator=g).to(torch.int8)
    batch = LossInputs(targets, old, adv, routes, seq_ids, lens)
    return logits, teacher, batch


@pytest.mark.parametrize("cfg", [
    LossConfig(), LossConfig(agg="seq-mean-token-mean", entry_clip=None, temperature=0.8),
    LossConfig(variant="all_token_rkl", entropy_coef=0.01), LossConfig(routed_grpo="none"),
], ids=["default", "seqmean-noclip-temp", "alltoken-entropy", "no-span-grpo"])
def test_matches_dense_reference(cfg):
    logits, teacher, batch = random_problem(0)
    vocab = 50
    counts = GlobalCounts(logits.shape[0], batch.seq_lens.numel())
    x = logits.clone().requires_grad_()
    routed = batch.routes != 0
    loss, _ = routed_loss(x, teacher[routed], batch, counts, cfg, lam=0.3, vocab_size=vocab, tp_group=None)
    loss.backward()
    y = logits.clone().requires_grad_()
    want = _dense_objective(y, teacher, batch, counts, cfg, 0.3, vocab)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-10)
    assert torch.allclose(x.grad[:, :vocab], y.grad[:, :vocab], atol=1e-10) and torch.all(x.grad[:, vocab:] == 0)


def test_errors():
    logits, batch, teacher = _hand_batch()
    with pytest.raises(ValueError, match="teacher logits"):
        routed_loss(logits, None, batch, GlobalCounts(3, 2), LossConfig(), lam=0.5)
    with pytest.raises(ValueError, match="loss.agg"):
        LossConfig(agg="mean")
    with pytest.raises(ValueError, match="max_response_len"):
        LossConfig(agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="global counts"):
        GlobalCounts(0, 1)


def test_stats_reductions_merge_like_ranks():
    a, b = Stats(), Stats()
    a.mean("x", torch.tensor([1.0, 2.0]))
    b.mean("x", torch.tensor([6.0]))
    a.sum("s", 1.5)
    b.sum("s", 2.0)
    a.max("m", 3.0)
    b.max("m", 5.0)
    a.min("n", -1.0)
    b.min("n", 2.0)
    out = a.merge(b).reduce()
    assert out == {"x": 3.0, "s": 3.5, "m": 5.0, "n": -1.0}

"""Train/rollout mismatch metrics and truncated importance sampling in the GRPO term."""

import math

import pytest
import torch

from megatron_trace.loss import (
    GlobalCounts,
    LossConfig,
    LossInputs,
    rollout_mismatch,
    routed_loss,
    tis_weights,
)


def test_mismatch_sums():
    a = torch.tensor([-1.0, -2.0, -0.5])
    e = torch.tensor([-1.1, -2.0, -0.2])
    m = rollout_mismatch(a, e)
    d = [0.1, 0.0, -0.3]
    assert m["abs_sum"].item() == pytest.approx(0.4) and m["max_abs"].item() == pytest.approx(0.3)
    assert m["k3_sum"].item() == pytest.approx(sum(math.exp(x) - x - 1 for x in d)) and m["count"].item() == 3


def test_tis_caps_and_scales_the_grpo_term():
    w = tis_weights(torch.tensor([0.0, -1.0]), torch.tensor([-2.0, -1.0]), cap=2.0)
    assert w.tolist() == [2.0, 1.0]
    logits = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    batch = LossInputs(torch.tensor([0, 1]), torch.full((2,), math.log(0.25), dtype=torch.float64),
                       torch.tensor([1.0, 1.0], dtype=torch.float64), torch.zeros(2, dtype=torch.int8),
                       torch.tensor([0, 1]), torch.tensor([1, 1]), is_weights=w)
    loss, stats = routed_loss(logits, None, batch, GlobalCounts(2, 2), LossConfig(), lam=0.0)
    assert loss.item() == pytest.approx(-(2.0 + 1.0) / 2)  # ratio 1, A=1: -w/2 per token
    assert stats.reduce()["ppo/tis_weight_mean"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="tis_cap"):
        tis_weights(torch.zeros(1), torch.zeros(1), cap=0)


def _perturbed_batch(seed=0):
    """Two rollouts (5 and 4 tokens), both routes, behaviour log-probs off by known amounts."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(9, 7, generator=g, dtype=torch.float64)
    teacher = torch.randn(4, 7, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 7, (9,), generator=g)
    old = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]  # pi_old = the current policy
    delta = torch.tensor([0.1, -0.9, 0.4, 1.2, -0.05, 0.3, -0.2, 0.8, -1.5], dtype=torch.float64)
    behaviour = old - delta  # log rho = delta, known
    routes = torch.tensor([0, 1, 0, 1, 0, 0, 2, 0, 2], dtype=torch.int8)
    seq_ids, seq_lens = torch.tensor([0] * 5 + [1] * 4), torch.tensor([5, 4])
    adv = torch.tensor([1.0] * 5 + [-1.0] * 4, dtype=torch.float64)
    return logits, teacher, targets, old, behaviour, delta, routes, seq_ids, seq_lens, adv


@pytest.mark.parametrize("mode", ["truncate", "mask", "sequence"])
def test_importance_weights_multiply_the_grpo_and_kl_terms(mode):
    """Against a float64 recomputation: the weights of each tis_mode, the tokens the mask drops,
    and the weight on every term of the loss (GRPO and both KL routes)."""
    logits, teacher, targets, old, behaviour, delta, routes, seq_ids, seq_lens, adv = _perturbed_batch()
    cap = 2.0
    w = tis_weights(old, behaviour, cap, mode, seq_ids)
    rho = [math.exp(d) for d in delta.tolist()]
    if mode == "truncate":
        want = [min(r, cap) for r in rho]
    elif mode == "mask":
        want = [r if 1 / cap <= r <= cap else 0.0 for r in rho]
        # rho 0.41 (an FKL token), 3.32, 2.23 and 0.22 (an RKL token) fall outside [0.5, 2]
        assert [x == 0 for x in want] == [False, True, False, True, False, False, False, True, True]
    else:
        gm = [math.exp(sum(delta[:5].tolist()) / 5), math.exp(sum(delta[5:].tolist()) / 4)]
        want = [min(gm[0], cap)] * 5 + [min(gm[1], cap)] * 4
    assert w.tolist() == pytest.approx(want, rel=1e-12)

    batch = LossInputs(targets, old, adv, routes, seq_ids, seq_lens, is_weights=w)
    cfg = LossConfig(variant="trace_both", entry_clip=None)
    lam, counts = 0.25, GlobalCounts(9, 2)
    loss, stats = routed_loss(logits.clone().requires_grad_(True), teacher, batch, counts, cfg, lam)
    # dense float64: ratio 1 (pi = pi_old), so GRPO's term is -A per token, routed tokens weighted 1 - lam/lambda0
    logq, logp = torch.log_softmax(logits, -1), torch.log_softmax(teacher, -1)
    total = 0.0
    r = 0
    for t in range(9):
        span = routes[t] != 0
        total += (1 - lam / cfg.lambda0 if span else 1.0) / 9 * -adv[t].item() * want[t]
        if span:
            q, p = logq[t], logp[r]
            d = (p.exp() * (p - q)).sum() if routes[t] == 1 else (q.exp() * (q - p)).sum()
            total += lam / (seq_lens[seq_ids[t]].item() * 2) * d.item() * want[t]
            r += 1
    assert loss.item() == pytest.approx(total, rel=1e-10)
    m = stats.reduce()
    assert m["ppo/tis_dropped_frac"] == pytest.approx(sum(x == 0 for x in want) / 9)
    assert m["ppo/tis_weight_mean"] == pytest.approx(sum(want) / 9)


def test_tis_mode_rejects_bad_input():
    with pytest.raises(ValueError, match="tis_mode"):
        tis_weights(torch.zeros(2), torch.zeros(2), 2.0, "clip")
    with pytest.raises(ValueError, match="seq_ids"):
        tis_weights(torch.zeros(2), torch.zeros(2), 2.0, "sequence")


def test_tis_mode_config_key():
    import os

    from conftest import REPO

    from megatron_trace.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"), ["loss.tis_cap=2", "loss.tis_mode=mask"])
    assert (cfg.loss.tis_cap, cfg.loss.tis_mode) == (2.0, "mask")
    with pytest.raises(ValueError, match="loss.tis_mode"):
        load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"), ["loss.tis_mode=clip"])

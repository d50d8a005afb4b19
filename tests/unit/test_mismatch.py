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

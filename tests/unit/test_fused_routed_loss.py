"""The routed loss through the fused LM head equals `routed_loss` on the materialised logits
(float64): the loss, the gradients of the hidden states and of the weight, and every metric, for
both ways the fused head forms its gradient (in the forward from the per-token loss, or in the
backward by recomputing the logits)."""

import itertools

import pytest
import torch

from megatron_trace.loss import GlobalCounts, LossConfig, LossInputs, Route, routed_loss
from megatron_trace.loss.routed import routed_loss_fused

T, H, V, VOCAB = 23, 6, 17, 15  # two padding columns: the shard is wider than the vocabulary


def _inputs(routes_kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    t_weight = weight + 0.3 * torch.randn(V, H, generator=g, dtype=torch.float64)  # a snapshot teacher
    targets = torch.randint(0, VOCAB, (T,), generator=g)
    seq_lens = torch.tensor([9, 6, 8])
    seq_ids = torch.repeat_interleave(torch.arange(3), seq_lens)
    route_of = {"fkl": [Route.FKL], "rkl": [Route.RKL], "mixed": [Route.FKL, Route.RKL], "none": []}[routes_kind]
    routes = torch.zeros(T, dtype=torch.int8)
    if route_of:
        pick = torch.randperm(T, generator=g)[:9]
        routes[pick] = torch.tensor([int(route_of[i % len(route_of)]) for i in range(9)], dtype=torch.int8)
    adv = torch.tensor([1.0, -0.5, 0.8], dtype=torch.float64)[seq_ids]
    with torch.no_grad():
        lp0 = torch.log_softmax((hidden @ weight.t())[:, :VOCAB], -1).gather(1, targets[:, None])[:, 0]
    old = lp0 + 0.3 * torch.randn(T, generator=g, dtype=torch.float64)  # some ratios clip
    batch = LossInputs(targets=targets, old_logprobs=old, advantages=adv, routes=routes, seq_ids=seq_ids,
                       seq_lens=seq_lens, ref_logprobs=lp0 - 0.1,
                       is_weights=torch.rand(T, generator=g, dtype=torch.float64) + 0.5)
    t_hidden = hidden[routes != Route.GRPO] + 0.2 * torch.randn(int((routes != 0).sum()), H, generator=g,
                                                                dtype=torch.float64)
    return hidden, weight, t_hidden, t_weight, batch


CONFIGS = {
    "paper": LossConfig(variant="trace_both"),
    "abs-clip-temp": LossConfig(variant="trace_both", entry_clip=0.02, entry_clip_mode="abs", temperature=0.7),
    "grad-clip-seq-mean": LossConfig(variant="trace_both", entry_clip=0.05, entry_clip_mode="grad",
                                     agg="seq-mean-token-mean"),
    "no-clip-extras": LossConfig(variant="trace_both", entry_clip=None, entropy_coef=0.01, kl_ref_coef=0.05,
                                 routed_grpo="full"),
}


@pytest.mark.parametrize("cfg_name, routes_kind", list(itertools.product(CONFIGS, ["mixed", "fkl", "rkl", "none"])))
def test_fused_routed_loss_equals_routed_loss_on_logits(cfg_name, routes_kind):
    cfg = CONFIGS[cfg_name]
    hidden, weight, t_hidden, t_weight, batch = _inputs(routes_kind)
    counts, lam = GlobalCounts(40, 5), 0.3
    runs = {}
    for mode in ("logits", "eager", "recompute"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if mode == "logits":
            teacher = (t_hidden @ t_weight.t()) if t_hidden.shape[0] else None
            loss, stats = routed_loss(h @ w.t(), teacher, batch, counts, cfg, lam, vocab_size=VOCAB)
        else:
            c = LossConfig(**{**cfg.__dict__, "head_chunk_tokens": 4})  # several chunks, KL rows in some
            loss, stats = routed_loss_fused(h, w, t_hidden if t_hidden.shape[0] else None, t_weight, batch, counts, c,
                                            lam, vocab_size=VOCAB, eager_grad=mode == "eager")
        loss.backward()
        runs[mode] = (loss.detach(), h.grad, w.grad, stats.reduce())
    ref = runs["logits"]
    assert ref[1].abs().max() > 0 and ref[2].abs().max() > 0
    for mode in ("eager", "recompute"):
        got = runs[mode]
        for i, what in enumerate(("loss", "d(hidden)", "d(weight)")):
            torch.testing.assert_close(got[i], ref[i], rtol=1e-10, atol=1e-12, msg=f"{mode} {what}")
        assert got[3].keys() == ref[3].keys()
        for k, v in ref[3].items():
            assert got[3][k] == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), (mode, k)


def test_eager_gradient_scales_with_the_upstream_gradient():
    hidden, weight, t_hidden, t_weight, batch = _inputs("mixed", seed=3)
    cfg = LossConfig(variant="trace_both", head_chunk_tokens=5)
    grads = []
    for scale in (1.0, 2.5):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, _ = routed_loss_fused(h, w, t_hidden, t_weight, batch, GlobalCounts(30, 3), cfg, 0.4)
        (scale * loss).backward()
        grads.append((h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, 2.5 * a, rtol=1e-12, atol=0)

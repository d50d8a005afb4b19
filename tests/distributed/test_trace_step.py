"""The TRACE train step on Megatron: TP=2 and PP=2 equal one process; span-sparse teacher head;
a non-finite loss skips the step without touching the weights."""

import math

import pytest
import torch

from megatron_trace.parallel import run_on_ranks

VOCAB = 1000


def samples(nan_at=None):
    from megatron_trace.types import TrainSample

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(6):
        P, L = int(torch.randint(3, 6, (1,), generator=g)), int(torch.randint(2, 7, (1,), generator=g))
        prompt = torch.randint(0, VOCAB, (P,), generator=g).tolist()
        resp = torch.randint(0, VOCAB, (L,), generator=g).tolist()
        routes = [int(x) for x in torch.randint(0, 3, (L,), generator=g)] if i % 2 == 0 else [0] * L
        priv = torch.randint(0, VOCAB, (P + 2,), generator=g).tolist()
        adv = float("nan") if i == nan_at else float(torch.randn(1, generator=g))
        out.append(TrainSample(prompt, resp, adv, routes, None, priv + resp if any(routes) else None, len(priv), i))
    return out


def _rank(hf_dir, tp, pp, lam, nan_at=None):
    from megatron_trace.loss import LossConfig
    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.models.convert import export_hf_stream
    from megatron_trace.parallel import initialize
    from megatron_trace.train.setup import OptimSettings, build_optimizer, wrap_ddp
    from megatron_trace.train.step import train_step

    groups = initialize(tp=tp, pp=pp)
    ddp = wrap_ddp(load_hf(hf_dir, groups), groups)
    opt = build_optimizer(ddp, groups, OptimSettings(optimizer="sgd", lr=1.0, clip_grad=1.0))
    before = {k: v.clone() for k, v in export_hf_stream(ddp, groups)}
    res = train_step(ddp, opt, groups, samples(nan_at), LossConfig(variant="trace_both"), lam, micro_batch_size=4,
                     vocab_size=VOCAB)
    after = {k: v.clone() for k, v in export_hf_stream(ddp, groups)}
    return res.metrics, res.skipped, before, after


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_trace.models.hf_io import make_random_hf_model
    from megatron_trace.models.qwen3 import QWEN3_SIZES

    d = str(tmp_path_factory.mktemp("hf_trace"))
    make_random_hf_model(QWEN3_SIZES["tiny"], d, seed=4)
    return d


@pytest.fixture(scope="module")
def single(hf_dir):
    return run_on_ranks(_rank, 1, hf_dir, 1, 1, 0.3)[0]


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_trace_step_matches_single_process(hf_dir, single, tp, pp):
    ref_metrics, ref_skipped, _, ref_after = single
    assert not ref_skipped and ref_metrics["kl/fkl_mean"] > 0 and ref_metrics["route/fkl_frac"] > 0
    for metrics, skipped, _, after in run_on_ranks(_rank, tp * pp, hf_dir, tp, pp, 0.3):
        assert not skipped
        for k, w in ref_after.items():
            assert (after[k] - w).abs().max().item() <= 1e-5, k
        for k, v in metrics.items():  # non-last PP stages only report the optimizer metrics
            assert math.isclose(v, ref_metrics[k], rel_tol=1e-5, abs_tol=1e-6), (k, v, ref_metrics[k])


def _head_rank(hf_dir, tp):
    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.models.forward import forward_logits
    from megatron_trace.parallel import initialize
    from megatron_trace.train.step import _span_sparse_head

    groups = initialize(tp=tp)
    model = load_hf(hf_dir, groups)
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    rows, cols = torch.tensor([0, 2, 2, 1]), torch.tensor([8, 0, 5, 3])
    dense = forward_logits(model, groups, ids)[rows, cols]
    with _span_sparse_head(model, rows, cols):
        sparse = forward_logits(model, groups, ids)
    return (sparse[0] - dense).abs().max().item(), tuple(sparse.shape)


@pytest.mark.dist
def test_span_sparse_head_equals_dense_logits_at_routed_positions(hf_dir):
    for diff, shape in run_on_ranks(_head_rank, 2, hf_dir, 2):
        assert shape == (1, 4, 512) and diff <= 1e-6  # V_pad/tp = 1024/2 columns, 4 routed rows


@pytest.mark.dist
def test_non_finite_loss_skips_the_step(hf_dir):
    (metrics, skipped, before, after) = run_on_ranks(_rank, 1, hf_dir, 1, 1, 0.3, 1)[0]
    assert skipped and metrics["optim/skipped"] == 1.0
    assert all(torch.equal(before[k], after[k]) for k in before)

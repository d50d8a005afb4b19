"""GPU only: packed rows through TransformerEngine's THD path (`PackedSeqParams`) equal padded rows.

The CPU suite checks the same step passes with the block-diagonal mask (tests/distributed/
test_packing.py); here the TE layer spec runs the packed micro-batch as THD with cumulative
sequence lengths. fp32; a looser bound than on CPU (different kernels for the two layouts).
"""

import pytest
import torch

from megatron_trace.parallel import run_on_ranks

VOCAB = 1000


@pytest.mark.gpu(1)
def test_thd_packing_equals_padding(tmp_path):
    pytest.importorskip("transformer_engine.pytorch", reason="transformer-engine not installed (the gpu extra)")
    from megatron_trace.models.hf_io import make_random_hf_model
    from megatron_trace.models.qwen3 import QWEN3_SIZES

    d = str(tmp_path / "hf")
    make_random_hf_model(QWEN3_SIZES["tiny"], d, seed=7)
    (res,) = run_on_ranks(_thd_rank, 1, d)
    assert res["thd"], "the packed layout did not take the THD path"
    ref, got = res["padded"], res["packed"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    for u, v in ref["old"].items():
        assert (got["old"][u] - v).abs().max().item() <= 1e-4, u
    for n, g in ref["grads"].items():
        assert (got["grads"][n] - g).abs().max().item() <= 1e-4 * max(1.0, g.abs().max().item()), n


def _thd_rank(hf_dir):
    from megatron_trace.loss import GlobalCounts, LossConfig, Stats
    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.parallel import initialize
    from megatron_trace.train.micro import batching_of as _batching
    from megatron_trace.train.setup import OptimSettings, build_optimizer, wrap_ddp
    from megatron_trace.train.step import _old_logprob_pass, _Step, _update
    from megatron_trace.types import TrainSample

    groups = initialize(device="cuda")
    g = torch.Generator().manual_seed(11)
    batch = []
    for i in range(7):
        P, L = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(2, 40, (1,), generator=g))
        prompt, resp = torch.randint(0, VOCAB, (P,), generator=g).tolist(), torch.randint(0, VOCAB, (L,), generator=g).tolist()
        routes = [int(x) for x in torch.randint(0, 2, (L,), generator=g)] if i % 2 == 0 else [0] * L
        priv = torch.randint(0, VOCAB, (P + 5,), generator=g).tolist()
        batch.append(TrainSample(prompt, resp, float(torch.randn(1, generator=g)), routes, None,
                                 priv + resp if any(routes) else None, len(priv), i))
    counts = GlobalCounts(sum(len(s.response_ids) for s in batch), len(batch))
    ddp = wrap_ddp(load_hf(hf_dir, groups, use_te=True), groups)
    opt = build_optimizer(ddp, groups, OptimSettings(optimizer="sgd", lr=0.0, clip_grad=0.0))
    out = {}
    for name, pack in (("padded", False), ("packed", True)):
        b = _batching(ddp, groups, 3, 0, pack)
        out["thd"] = out.get("thd", False) or b.thd
        st = _Step(groups, LossConfig(variant="trace_fkl"), 0.3, VOCAB, b, None, 2, teacher=ddp)
        _old_logprob_pass(st, ddp, batch)
        stats = Stats()
        _update(st, ddp, opt, batch, counts, False, stats,
                {"time/teacher": 0.0, "time/fwd_bwd": 0.0, "time/optimizer": 0.0})
        out[name] = {"grads": {n: p.main_grad.detach().cpu().clone() for n, p in ddp.named_parameters()},
                     "old": {u: v.cpu() for u, v in st.old.items()}, "loss": stats.reduce()["loss/total"]}
    return out

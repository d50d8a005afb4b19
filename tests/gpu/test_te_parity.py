"""GPU only: the TransformerEngine layer spec (fused layer-norm names) against transformers.

Skipped on CPU machines; run on a CUDA host with `pytest tests/gpu`. fp32 on both sides, with a
looser bound than on CPU because cuBLAS/TE kernels reduce in a different order.
"""

import pytest
import torch
from conftest import VARIANTS, hf_logits
from safetensors.torch import load_file

from megatron_trace.parallel import run_on_ranks


def _te_rank(hf_dirs, ids):
    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.models.convert import export_hf_stream
    from megatron_trace.models.forward import forward_logits, gather_full_logits
    from megatron_trace.parallel import initialize

    groups = initialize(device="cuda")
    out = {}
    for name, d in hf_dirs.items():
        model = load_hf(d, groups, use_te=True)
        arch = model.arch
        names = [n for n, _ in model.named_parameters()]
        logits = gather_full_logits(forward_logits(model, groups, ids), groups, arch.vocab_size, tuple(ids.shape))
        weights = {k: v.cpu().clone() for k, v in export_hf_stream(model, groups)}
        out[name] = (names, logits.cpu(), weights)
    return out


@pytest.mark.gpu(1)
def test_te_spec_parity_and_round_trip(hf_dirs, token_batch):
    pytest.importorskip("transformer_engine.pytorch", reason="transformer-engine not installed (the gpu extra)")
    (res,) = run_on_ranks(_te_rank, 1, hf_dirs, token_batch)
    for name in VARIANTS:
        names, logits, weights = res[name]
        assert any(n.endswith("linear_qkv.layer_norm_weight") for n in names), "TE spec was not used"
        assert (logits - hf_logits(hf_dirs[name], token_batch)).abs().max().item() <= 1e-3
        original = load_file(f"{hf_dirs[name]}/model.safetensors")
        assert all(torch.equal(weights[k], v) for k, v in original.items())

"""Activation recompute and sequence parallelism change memory, never the numbers.

For each layout, every rank builds the same fp32 model several times from one HF checkpoint (no
recompute; selective; full uniform; full block; and sequence parallelism at TP=2), runs one
forward/backward of two micro-batches through Megatron's schedule with DDP, and compares every
`main_grad` and the losses with the model without recompute. Recompute reruns the same ops on
the same inputs, so the gradients agree to float32 rounding; sequence parallelism reorders
reductions (norm-weight grads are summed over TP), so it gets a slightly looser bound.
"""

import pytest
import torch

from megatron_trace.parallel import run_on_ranks

SETTINGS = {
    "none": dict(recompute="none"),
    "selective": dict(recompute="selective"),
    "full_uniform": dict(recompute="full", recompute_method="uniform", recompute_num_layers=1),
    "full_uniform_2": dict(recompute="full", recompute_method="uniform", recompute_num_layers=2),
    "full_block": dict(recompute="full", recompute_method="block", recompute_num_layers=1),
    "sequence_parallel": dict(sequence_parallel=True),
}


def _grads_rank(hf_dir, ids, tp, pp, names):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_trace.models.builder import mask_vocab_padding_, unwrap_model
    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.parallel import initialize
    from megatron_trace.parallel.schedule import run_schedule
    from megatron_trace.train.setup import wrap_ddp

    groups = initialize(tp=tp, pp=pp)
    out = {}
    for name in names:
        model = load_hf(hf_dir, groups, **SETTINGS[name])
        cfg = unwrap_model(model).config
        ddp = wrap_ddp(model, groups)
        ddp.train()
        vocab = model.arch.vocab_size

        def step(data_iter, m, vocab=vocab):
            x = next(data_iter)
            pos = torch.arange(x.shape[1] - 1).unsqueeze(0).expand(x.shape[0], -1)
            logits = m(x[:, :-1], pos, None)

            def loss_func(logits_bsv, x=x, vocab=vocab):
                z = mask_vocab_padding_(logits_bsv.float().clone(), vocab, groups.tp_rank)
                nll = vocab_parallel_cross_entropy(z, x[:, 1:].contiguous())
                return nll.mean(), {"loss": nll.mean().detach()}

            return logits, loss_func

        ddp.zero_grad_buffer()
        micro = list(ids.split(2))
        losses = run_schedule(groups, ddp, step, iter(micro), num_microbatches=len(micro),
                              seq_length=ids.shape[1] - 1, micro_batch_size=2)
        out[name] = {
            "config": (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers,
                       list(cfg.recompute_modules or []), cfg.sequence_parallel),
            "losses": [x["loss"].item() for x in losses],
            "grads": {n: p.main_grad.clone() for n, p in ddp.named_parameters()},
        }
    return out


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_recompute_and_sequence_parallel_keep_the_gradients(hf_dirs, tp, pp):
    names = [n for n in SETTINGS if (n != "sequence_parallel" or tp > 1) and (n != "full_uniform_2" or pp == 1)]
    ids = torch.randint(0, 1000, (4, 13), generator=torch.Generator().manual_seed(5))  # 12 tokens: divisible by tp
    results = run_on_ranks(_grads_rank, tp * pp, hf_dirs["tied"], ids, tp, pp, names)
    for rank, res in enumerate(results):
        base = res["none"]
        assert base["config"][0] is None and not base["config"][4]
        assert res["selective"]["config"][:4] == ("selective", None, None, ["core_attn"])
        assert res["full_uniform"]["config"][:3] == ("full", "uniform", 1)
        assert res["full_block"]["config"][:3] == ("full", "block", 1)
        assert max(g.abs().max().item() for g in base["grads"].values()) > 1e-3, "the gradients must be non-trivial"
        for name in names[1:]:
            r = res[name]
            tol = 1e-5 if name == "sequence_parallel" else 1e-6
            assert r["losses"] == pytest.approx(base["losses"], abs=tol), (rank, name)
            assert r["grads"].keys() == base["grads"].keys()
            for k, g in base["grads"].items():
                err = (r["grads"][k] - g).abs().max().item()
                assert err <= tol * max(1.0, g.abs().max().item()), f"rank {rank} {name}: {k} differs by {err}"
        if tp > 1:
            assert res["sequence_parallel"]["config"][4] is True


def test_recompute_num_layers_is_checked_against_the_stage():
    from megatron_trace.models.builder import transformer_config
    from megatron_trace.models.qwen3 import QWEN3_SIZES

    class _Groups:  # transformer_config reads only these
        device = torch.device("cpu")
        tp_size, pp_size, cp_size = 1, 1, 1

    with pytest.raises(ValueError, match="optim.recompute_num_layers.*3"):
        transformer_config(QWEN3_SIZES["tiny"], _Groups(), recompute="full", recompute_num_layers=3)
    with pytest.raises(ValueError, match="optim.recompute"):
        transformer_config(QWEN3_SIZES["tiny"], _Groups(), recompute="everything")
    cfg = transformer_config(QWEN3_SIZES["tiny"], _Groups(), sequence_parallel=True, recompute="selective")
    assert cfg.sequence_parallel is False, "sequence parallelism needs tp > 1"
    assert (cfg.recompute_granularity, cfg.recompute_modules) == ("selective", ["core_attn"])

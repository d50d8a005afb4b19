"""One optimizer step through Megatron's schedule + DDP + optimizer: TP=2 and PP=2 equal TP=1.

The step uses grad clipping that actually clips (norm ~4 > 0.5), so the TP/PP-aware grad norm
(duplicated/tied parameters counted once) and CPU mode's clip path are both under test.
"""

import pytest
import torch
from conftest import VARIANTS

from megatron_trace.parallel import run_on_ranks

LAYOUTS = [(1, 1), (2, 1), (1, 2)]


def _step_rank(hf_dirs, ids, tp, pp):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_trace.models.builder import mask_vocab_padding_
    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.models.convert import export_hf_stream
    from megatron_trace.parallel import initialize
    from megatron_trace.parallel.schedule import run_schedule
    from megatron_trace.train.setup import OptimSettings, build_optimizer, wrap_ddp

    groups = initialize(tp=tp, pp=pp)
    out = {}
    for name, d in hf_dirs.items():
        model = load_hf(d, groups)
        arch = model.arch
        ddp = wrap_ddp(model, groups)
        opt = build_optimizer(ddp, groups, OptimSettings(optimizer="sgd", lr=1.0, clip_grad=0.5))

        def step(data_iter, m, vocab_size=arch.vocab_size):
            x = next(data_iter)
            pos = torch.arange(x.shape[1] - 1).unsqueeze(0).expand(x.shape[0], -1)
            logits = m(x[:, :-1], pos, None)

            def loss_func(logits_bsv):
                z = mask_vocab_padding_(logits_bsv.float().clone(), vocab_size, groups.tp_rank)
                nll = vocab_parallel_cross_entropy(z, x[:, 1:].contiguous())
                return nll.mean(), {"loss": nll.mean().detach()}

            return logits, loss_func

        ddp.zero_grad_buffer()
        opt.zero_grad()
        micro = list(ids.split(2))
        losses = run_schedule(groups, ddp, step, iter(micro), num_microbatches=len(micro),
                              seq_length=ids.shape[1] - 1, micro_batch_size=2)
        ok, grad_norm, _ = opt.step()
        weights = {k: v.clone() for k, v in export_hf_stream(ddp, groups)}
        out[name] = {"ok": ok, "grad_norm": grad_norm, "losses": [x["loss"].item() for x in losses],
                     "weights": weights}
    return out


@pytest.fixture(scope="module")
def steps(hf_dirs):
    ids = torch.randint(0, 1000, (4, 10), generator=torch.Generator().manual_seed(3))
    return {layout: run_on_ranks(_step_rank, layout[0] * layout[1], hf_dirs, ids, *layout) for layout in LAYOUTS}


@pytest.mark.dist
@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_one_step_matches_single_process(steps, hf_dirs, layout, variant):
    from safetensors.torch import load_file

    base = steps[(1, 1)][0][variant]
    assert base["ok"] and base["grad_norm"] > 0.5, "clipping must be active for this test to mean anything"
    initial = load_file(f"{hf_dirs[variant]}/model.safetensors")
    moved = max((base["weights"][k] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3, "the step must change the weights"
    for rank, res in enumerate(steps[layout]):
        r = res[variant]
        assert r["ok"]
        assert r["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5), f"rank {rank}"
        if r["losses"]:  # last stage only
            assert r["losses"] == pytest.approx(base["losses"], abs=1e-5)
        for k, w in base["weights"].items():
            err = (r["weights"][k] - w).abs().max().item()
            assert err <= 1e-5, f"rank {rank}: {k} differs by {err}"

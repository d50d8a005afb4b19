"""Token budgets and sequence packing change the layout, never the numbers (gloo, TP=2 and PP=2).

For each layout (padded rows of a fixed count, padded rows under a token budget, packed rows
with and without a budget, and random re-orderings of the rollouts) the same TRACE step is run
pass by pass on a tiny Qwen3: the teacher's logits at routed positions, the old log-probs, the
loss and every gradient must equal the padded fixed-count layout within 1e-6 (fp32).
"""

import math

import pytest
import torch

from megatron_trace.parallel import run_on_ranks

VOCAB = 1000
TIMERS = {"time/teacher": 0.0, "time/fwd_bwd": 0.0, "time/optimizer": 0.0}
LAYOUTS = {
    "padded": dict(micro_batch_size=2),
    "padded_budget": dict(micro_batch_size=2, max_tokens=40),
    "packed": dict(micro_batch_size=3, pack=True),
    "packed_budget": dict(micro_batch_size=2, max_tokens=45, pack=True),
    "packed_one_row": dict(micro_batch_size=64, pack=True),
}


def samples():
    from megatron_trace.types import TrainSample

    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(7):
        P, L = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(2, 21, (1,), generator=g))
        prompt = torch.randint(0, VOCAB, (P,), generator=g).tolist()
        resp = torch.randint(0, VOCAB, (L,), generator=g).tolist()
        routes = [int(x) for x in torch.randint(0, 3, (L,), generator=g)] if i % 3 != 1 else [0] * L
        priv = torch.randint(0, VOCAB, (P + 5,), generator=g).tolist()
        out.append(TrainSample(prompt, resp, float(torch.randn(1, generator=g)), routes,
                               (-torch.rand(L, generator=g) * 8).tolist(), priv + resp if any(routes) else None,
                               len(priv), i))
    return out


def _grads(ddp):
    return {n: p.main_grad.detach().clone() for n, p in ddp.named_parameters()}


def _rope_check(ddp):
    """Packed rows: the rotary table is indexed by each token's own position (RoPE is relative, so
    the step's numbers above barely move without this; at long offsets fp32 angles would)."""
    from megatron_trace.models.builder import unwrap_model
    from megatron_trace.train.model_pass import _rope_positions

    rope = unwrap_model(ddp).rotary_pos_emb
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    table = rope(6)  # [6, 1, 1, d]
    with _rope_positions(ddp, pos):
        emb = rope(6)
    return emb.shape == (6, 2, 1, table.shape[-1]) and all(
        torch.equal(emb[:, b, 0], table[pos[b], 0, 0]) for b in range(2))


def _layout_rank(hf_dir, tp, pp):
    from megatron_trace.loss import GlobalCounts, LossConfig, Stats
    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.parallel import initialize
    from megatron_trace.train.setup import OptimSettings, build_optimizer, wrap_ddp
    from megatron_trace.train.step import Batching, _old_logprob_pass, _Step, _update

    groups = initialize(tp=tp, pp=pp)
    ddp = wrap_ddp(load_hf(hf_dir, groups), groups)
    opt = build_optimizer(ddp, groups, OptimSettings(optimizer="sgd", lr=1.0, clip_grad=0.0))
    params0 = [p.detach().clone() for p in ddp.parameters()]
    batch = samples()
    counts = GlobalCounts(sum(len(s.response_ids) for s in batch), len(batch))
    layouts = dict(LAYOUTS)
    g = torch.Generator().manual_seed(3)
    for k in range(3):  # random orders x random budgets (and teacher chunks): other partitions
        layouts[f"random{k}"] = dict(micro_batch_size=int(torch.randint(1, 5, (1,), generator=g)),
                                     max_tokens=int(torch.randint(0, 60, (1,), generator=g)),
                                     pack=bool(k % 2), order=torch.randperm(len(batch), generator=g).tolist(),
                                     teacher_tokens=int(torch.randint(0, 30, (1,), generator=g)))
    out = {"rope": _rope_check(ddp)}
    for name, kw in layouts.items():
        order = kw.pop("order", None)
        tokens = kw.pop("teacher_tokens", 0)
        mine = [batch[i] for i in order] if order else batch
        record = {}
        st = _Step(groups, LossConfig(variant="trace_both"), 0.3, VOCAB, Batching(**kw), None, 2, teacher=ddp,
                   teacher_tokens=tokens, record=record)
        _old_logprob_pass(st, ddp, mine)
        stats = Stats()
        _update(st, ddp, opt, mine, counts, False, stats, TIMERS.copy())
        grads = _grads(ddp)
        with torch.no_grad():
            for p, p0 in zip(ddp.parameters(), params0):
                p.copy_(p0)
        out[name] = {"old": {u: v.clone() for u, v in st.old.items()}, "record": record,
                     "metrics": stats.merge(st.pre).reduce() if groups.is_last_stage else {},
                     "grads": grads, "padding": st.layout.reduce().get("layout/padding_frac")}
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_trace.models.hf_io import make_random_hf_model
    from megatron_trace.models.qwen3 import QWEN3_SIZES

    d = str(tmp_path_factory.mktemp("hf_pack"))
    make_random_hf_model(QWEN3_SIZES["tiny"], d, seed=7)
    return d


def _close(a, b, tol=1e-6):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)], ids=["single", "tp2", "pp2"])
def test_packed_and_budgeted_layouts_equal_padded(hf_dir, tp, pp):
    for rank, res in enumerate(run_on_ranks(_layout_rank, tp * pp, hf_dir, tp, pp)):
        assert res.pop("rope")
        ref = res["padded"]
        assert res["packed_one_row"]["padding"] == 0.0 < ref["padding"], "packing must remove padding"
        for name, r in res.items():
            for n, g in ref["grads"].items():
                assert g.abs().max() > 0 or "layernorm" in n
                assert _close(r["grads"][n], g), (rank, name, n, (r["grads"][n] - g).abs().max().item())
            if not ref["metrics"]:  # not the last stage
                continue
            assert set(r["old"]) == set(ref["old"]) == set(range(7))
            for u, v in ref["old"].items():
                assert _close(r["old"][u], v), (rank, name, "old", u)
            assert set(r["record"]) == set(ref["record"]) and len(ref["record"]) == 5
            for u, v in ref["record"].items():  # the teacher at the routed tokens: log-prob, entropy
                for key in ("logprob", "entropy"):
                    assert r["record"][u][key] == pytest.approx(v[key], abs=1e-6), (rank, name, u, key)
            for k, v in ref["metrics"].items():
                assert math.isclose(r["metrics"][k], v, rel_tol=1e-6, abs_tol=1e-7) or (
                    math.isnan(v) and math.isnan(r["metrics"][k])), (rank, name, k)
            assert ref["metrics"]["loss/kl"] > 0 and ref["metrics"]["teacher/leakage_kl_offspan"] > 0



def _sp_rank(hf_dir):
    """The step's passes at TP=2 with and without sequence parallelism, padded and packed rows
    (under SP the span-sparse head gathers the sequence-sharded hidden states first)."""
    from megatron_trace.loss import GlobalCounts, LossConfig, Stats
    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.parallel import initialize
    from megatron_trace.train.micro import batching_of as _batching
    from megatron_trace.train.setup import OptimSettings, build_optimizer, wrap_ddp
    from megatron_trace.train.step import _old_logprob_pass, _Step, _update

    groups = initialize(tp=2, pp=1)
    batch = samples()
    counts = GlobalCounts(sum(len(s.response_ids) for s in batch), len(batch))
    out = {}
    for sp in (False, True):
        ddp = wrap_ddp(load_hf(hf_dir, groups, sequence_parallel=sp), groups)
        opt = build_optimizer(ddp, groups, OptimSettings(optimizer="sgd", lr=0.0, clip_grad=0.0))
        for pack in (False, True):
            b = _batching(ddp, groups, 3, 0, pack)
            record = {}
            st = _Step(groups, LossConfig(variant="trace_both"), 0.3, VOCAB, b, None, 2, teacher=ddp, record=record)
            _old_logprob_pass(st, ddp, batch)
            stats = Stats()
            _update(st, ddp, opt, batch, counts, False, stats, TIMERS.copy())
            out[sp, pack] = {"multiple": b.multiple, "grads": _grads(ddp), "old": dict(st.old),
                             "teacher": record, "loss": stats.reduce()["loss/total"]}
    return out


@pytest.mark.dist
def test_sequence_parallel_equals_plain_tp(hf_dir):
    for res in run_on_ranks(_sp_rank, 2, hf_dir):
        ref = res[False, False]
        assert res[True, True]["multiple"] == 2 and ref["multiple"] == 1
        for key, r in res.items():
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5), key
            for u, v in ref["old"].items():
                assert _close(r["old"][u], v, 1e-5), (key, u)
            for u, v in ref["teacher"].items():
                assert r["teacher"][u]["logprob"] == pytest.approx(v["logprob"], abs=1e-5), (key, u)
            for n, g in ref["grads"].items():
                assert _close(r["grads"][n], g, 1e-5), (key, n, (r["grads"][n] - g).abs().max().item())

"""The TRACE train step on Megatron: TP=2 and PP=2 equal one process (with 2 PPO mini-batches,
TIS and the diagnostics on); the diagnostics equal dense float64 recomputations; span-sparse
teacher head; a non-finite loss skips the step without touching the weights."""

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
        engine_lp = (-torch.rand(L, generator=g) * 8).tolist()
        # Key-token lift on the FKL-routed positions, and on one rollout the loss does not route
        # (the metric is measured whatever the loss does with the spans).
        keys = [t for t, r in enumerate(routes) if r == 1] or ([0, L - 1] if i == 1 else None)
        out.append(TrainSample(prompt, resp, adv, routes, engine_lp, priv + resp if any(routes) or keys else None,
                               len(priv), i, keys))
    return out


STEP_KW = dict(micro_batch_size=2, mini_batches=2, tis_cap=2.0, probe_tokens=2, key_token_lift=2)


def _dense_lp(model, groups, ids):
    from megatron_trace.models.forward import forward_logits, gather_full_logits

    full = gather_full_logits(forward_logits(model, groups, ids), groups, VOCAB, tuple(ids.shape))
    return torch.log_softmax(full.double(), dim=-1)


def _reference_diagnostics(ddp, groups, batch, step):
    """Dense float64 recomputation of the mismatch, leakage and key-token-lift metrics (the
    under-allocated token included)."""
    from megatron_trace.train.step import probe_positions

    diffs, leaks = [], []
    for s in batch:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        p, n = len(s.prompt_ids), len(s.response_ids)
        lp_all = _dense_lp(ddp, groups, ids)[0, p - 1:p - 1 + n]  # [n, V]
        lp = lp_all.gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
        diffs += (lp - torch.tensor(s.rollout_logprobs, dtype=torch.float64)).abs().tolist()
        if any(s.routes):
            t_lp = _dense_lp(ddp, groups, torch.tensor([s.teacher_ids]))[0]
            for i in probe_positions(s, STEP_KW["probe_tokens"]):
                t = t_lp[s.teacher_prompt_len - 1 + i]
                leaks.append(float((t.exp() * (t - lp_all[i])).sum()))
    lifted = [s for s in batch if s.key_positions]
    assert len(lifted) > STEP_KW["key_token_lift"] and any(not any(s.routes) for s in lifted[:2])
    lifted = lifted[:STEP_KW["key_token_lift"]]  # the cap counts in global order

    def key_rows(s):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        return _dense_lp(ddp, groups, ids)[0, [len(s.prompt_ids) - 1 + i for i in s.key_positions]]

    def key_logprobs(s, *tokens):  # the actor's log-probs of the sampled token and of `tokens`
        rows = key_rows(s)
        return [rows.gather(1, t[:, None])[:, 0] for t in (torch.tensor(s.response_ids)[s.key_positions], *tokens)]

    # The live teacher (the step-start actor) with the privileged prompt: its top-1 (dense argmax)
    # and the token it supports most beyond the actor, argmax p_T - p_S (ties: the first id)
    top1, under, gaps = [], [], []
    for s in lifted:
        t_lp = _dense_lp(ddp, groups, torch.tensor([s.teacher_ids]))[0]
        t_rows = t_lp[[s.teacher_prompt_len - 1 + i for i in s.key_positions]]
        top1.append(t_rows.argmax(-1))
        d = t_rows.exp() - key_rows(s).exp()
        under.append(d.argmax(-1))
        gaps.append(d.max(-1).values)
    assert any((u != t).any() for u, t in zip(under, top1))  # else key_underallocated = key_teacher
    before = [key_logprobs(s, t, u) for s, t, u in zip(lifted, top1, under)]
    step()
    after = [key_logprobs(s, t, u) for s, t, u in zip(lifted, top1, under)]
    d_sampled, d_teacher, d_under = (torch.cat([a[j] - b[j] for a, b in zip(after, before)]) for j in range(3))
    agree = torch.cat([t == torch.tensor(s.response_ids)[s.key_positions] for s, t in zip(lifted, top1)])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"mismatch/logprob_abs_diff": mean(diffs), "mismatch/logprob_abs_diff_max": max(diffs),
            "teacher/leakage_kl_offspan": mean(leaks), "lift/key_sampled": d_sampled.mean().item(),
            "lift/key_teacher": d_teacher.mean().item(), "lift/teacher_agrees_with_sample": agree.double().mean().item(),
            "lift/key_underallocated": d_under.mean().item(), "lift/underallocated_gap": torch.cat(gaps).mean().item()}


def _rank(hf_dir, tp, pp, lam, nan_at=None, with_reference=False, mini_batches=2, **extra):
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
    batch = samples(nan_at)
    box = {}

    def step():
        box["res"] = train_step(ddp, opt, groups, batch, LossConfig(variant="trace_both"), lam, vocab_size=VOCAB,
                                **{**STEP_KW, "mini_batches": mini_batches, **extra})

    ref = _reference_diagnostics(ddp, groups, batch, step) if with_reference else step()
    res = box["res"]
    after = {k: v.clone() for k, v in export_hf_stream(ddp, groups)}
    return (res.metrics, ref) if with_reference else (res.metrics, res.skipped, before, after)


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
    assert ref_metrics["optim/updates"] == 2 and ref_metrics["ppo/tis_weight_mean"] > 0
    # The teacher's logits held one micro-batch at a time (the reference holds them all): the
    # update then takes several schedule calls, and only the last reduces the gradients.
    for metrics, skipped, _, after in run_on_ranks(_rank, tp * pp, hf_dir, tp, pp, 0.3, teacher_tokens=1):
        assert not skipped
        for k, w in ref_after.items():
            assert (after[k] - w).abs().max().item() <= 1e-5, k
        for k, v in metrics.items():  # non-last PP stages only report the optimizer metrics
            if "time" in k:
                continue
            assert math.isclose(v, ref_metrics[k], rel_tol=1e-5, abs_tol=1e-6), (k, v, ref_metrics[k])


def _head_rank(hf_dir, tp):
    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.models.forward import forward_logits
    from megatron_trace.parallel import initialize
    from megatron_trace.train.model_pass import _span_sparse_head

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
    (metrics, skipped, before, after) = run_on_ranks(_rank, 1, hf_dir, 1, 1, 0.3, 1, False, 1)[0]
    assert skipped and metrics["optim/skipped"] == 1.0 and metrics["optim/updates"] == 0.0
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.dist
def test_non_finite_mini_batch_skips_only_its_update(hf_dir):
    (metrics, skipped, before, after) = run_on_ranks(_rank, 1, hf_dir, 1, 1, 0.3, 1, False, 2)[0]
    assert skipped and metrics["optim/skipped"] == 1.0 and metrics["optim/updates"] == 1.0
    assert not all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.dist
@pytest.mark.parametrize("mini_batches", [1, 2])
def test_step_diagnostics_equal_dense_float64_recomputation(hf_dir, mini_batches):
    metrics, ref = run_on_ranks(_rank, 1, hf_dir, 1, 1, 0.3, None, True, mini_batches)[0]
    if mini_batches > 1:
        # The leakage probe reads the update's forward: for mini-batch 2 that is the actor after
        # update 1 (and so is the live teacher); the reference holds the step-start weights.
        del ref["teacher/leakage_kl_offspan"]
    for k, v in ref.items():
        assert math.isclose(metrics[k], v, rel_tol=1e-4, abs_tol=1e-6), (k, metrics[k], v)
    assert ref.get("teacher/leakage_kl_offspan", 1.0) > 0 and ref["lift/key_teacher"] != 0
    assert ref["lift/key_sampled"] != ref["lift/key_teacher"]
    assert ref["lift/key_underallocated"] != ref["lift/key_teacher"] and ref["lift/underallocated_gap"] > 0
    assert metrics["time/teacher"] > 0 and metrics["time/key_token_lift"] > 0


@pytest.mark.dist
def test_lambda_zero_skips_teacher_but_still_measures_the_lift(hf_dir):
    """At lambda = 0 no teacher pass runs for the loss; rollouts that carry key positions still
    get the key-token lift (its teacher is then the actor with the privileged prompt)."""
    metrics, ref = run_on_ranks(_rank, 1, hf_dir, 1, 1, 0.0, None, True, 1)[0]
    assert metrics["time/teacher"] == 0.0 and metrics["loss/kl"] == 0.0
    assert "teacher/leakage_kl_offspan" not in metrics and metrics["time/key_token_lift"] > 0
    for k in ("lift/key_sampled", "lift/key_teacher", "lift/teacher_agrees_with_sample", "lift/key_underallocated",
              "lift/underallocated_gap"):
        assert math.isclose(metrics[k], ref[k], rel_tol=1e-4, abs_tol=1e-6), (k, metrics[k], ref[k])
    off, _, _, _ = run_on_ranks(_rank, 1, hf_dir, 1, 1, 0.0, key_token_lift=0)[0]
    assert off["time/key_token_lift"] == 0.0 and "lift/key_teacher" not in off


def _both_ways(hf_dir, mini_batches):
    return [_rank(hf_dir, 1, 1, 0.3, mini_batches=mini_batches, separate_old_pass=sep) for sep in (True, False)]


@pytest.mark.dist
@pytest.mark.parametrize("mini_batches", [1, 2])
def test_first_mini_batch_gives_its_own_old_logprobs(hf_dir, mini_batches):
    """Before any update the policy is pi_old: the first mini-batch's forward supplies its old
    log-probs (and the mismatch/leakage diagnostics); with one mini-batch the separate pass is gone.
    Metrics and weights are those of the separate pass."""
    (ref, _, _, ref_w), (got, skipped, _, w) = run_on_ranks(_both_ways, 1, hf_dir, mini_batches)[0]
    assert not skipped and ref["time/old_logprobs"] > 0
    assert (got["time/old_logprobs"] == 0.0) == (mini_batches == 1)
    assert ref["mismatch/logprob_abs_diff"] > 0 and ref["teacher/leakage_kl_offspan"] > 0
    # abs_tol 1e-6: the two ways compute pi_old in different passes (equal to fp32 rounding, about
    # 1e-7), and with tis_cap the importance weight, a function of pi_old, scales the KL term too,
    # so the post-update lift metrics move by about 1e-7 absolute
    for k, v in ref.items():
        if "time" not in k:
            assert math.isclose(got[k], v, rel_tol=1e-6, abs_tol=1e-6), (k, got[k], v)
    for k, v in ref_w.items():
        assert (w[k] - v).abs().max().item() <= 1e-6, k

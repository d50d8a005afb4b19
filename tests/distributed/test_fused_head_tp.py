"""The fused LM head with the vocabulary sharded over 2 and 3 gloo ranks equals the unfused path
at TP=1 in float64 (values, d(hidden) after its all-reduce, and each rank's weight rows), the key-token
lift's under-allocated token from hidden states equals a dense float64 recomputation, its
cross-entropy equals Megatron's `vocab_parallel_cross_entropy` on the sharded logits, and under
sequence parallelism (Megatron's gather, d(hidden) left to its reduce-scatter) each rank gets its
rows of the plain path's gradient."""

import fused_cases
import pytest
import torch

from megatron_trace.parallel import run_on_ranks


def _rank(tp, dtype):
    import torch.distributed as dist

    from megatron_trace.parallel import initialize

    groups = initialize(tp=tp)
    rank = dist.get_rank(groups.tp)
    return ([fused_cases.run_fused(case, groups.tp, rank, tp, dtype, 3) for case in fused_cases.CASES],
            fused_cases.run_underallocated(groups.tp, rank, tp, dtype))


@pytest.mark.dist
@pytest.mark.parametrize("tp", [2, 3])
def test_sharded_fused_head_matches_the_unfused_path(tp):
    want = [fused_cases.reference(case) for case in fused_cases.CASES]
    for dtype in (torch.float64, torch.float32):
        per_rank = run_on_ranks(_rank, tp, tp, dtype)
        for rank, (results, under) in enumerate(per_rank):
            for case, got, ref in zip(fused_cases.CASES, results, want):
                fused_cases.compare(got, ref, dtype, (case[0], dtype, tp, rank))
            fused_cases.check_underallocated(under, dtype, ("underallocated", dtype, tp, rank))


def _megatron_ce_rank(tp):
    import torch.distributed as dist
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_trace.loss.fused_head import fused_head
    from megatron_trace.parallel import initialize

    groups = initialize(tp=tp)
    rank = dist.get_rank(groups.tp)
    g = torch.Generator().manual_seed(5)
    T, H, V = 13, 8, 22  # V divisible by tp: Megatron's cross-entropy has no padding mask
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (T,), generator=g)
    rows = slice(rank * V // tp, (rank + 1) * V // tp)
    out = {}
    for name in ("fused", "megatron"):
        h = hidden.clone().requires_grad_(True)
        w = weight[rows].clone().requires_grad_(True)
        if name == "fused":
            nll = -fused_head(h, w, targets, groups.tp, chunk_tokens=4).logprob
        else:
            # Megatron's column-parallel head: the input's gradient is all-reduced over TP
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

            logits = copy_to_tensor_model_parallel_region(h, group=groups.tp) @ w.t()
            nll = vocab_parallel_cross_entropy(logits[:, None].clone(), targets[:, None])[:, 0]
        (nll * torch.linspace(0.5, 1.5, T, dtype=torch.float64)).sum().backward()
        out[name] = (nll.detach(), h.grad, w.grad)
    return out


@pytest.mark.dist
def test_fused_cross_entropy_equals_megatrons():
    for res in run_on_ranks(_megatron_ce_rank, 2, 2):
        for got, want in zip(res["fused"], res["megatron"]):
            assert got.abs().max() > 0
            # Megatron computes its cross-entropy in fp32 whatever the input: fp32 tolerances
            torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6)


def _sequence_parallel_rank(tp):
    """Under sequence parallelism each rank holds T/tp rows of the hidden states; Megatron's
    gather (backward: reduce-scatter) feeds the fused head, which then leaves d(hidden) unreduced.
    Each rank's gradient must be its rows of the plain (all-reduced) path's."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    from megatron_trace.loss.fused_head import fused_head
    from megatron_trace.parallel import initialize

    groups = initialize(tp=tp)
    rank = dist.get_rank(groups.tp)
    g = torch.Generator().manual_seed(11)
    T, H, V = 12, 8, 20
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V - 3, (T,), generator=g)
    kl_index = torch.tensor([1, 4, 5, 10])
    t_hidden = torch.randn(4, H, generator=g, dtype=torch.float64)
    w = weight[rank * V // tp:(rank + 1) * V // tp]
    coef = torch.linspace(0.5, 1.5, T, dtype=torch.float64)
    grads = {}
    for sp in (False, True):
        leaf = (hidden[rank * T // tp:(rank + 1) * T // tp] if sp else hidden).clone().requires_grad_(True)
        h = gather_from_sequence_parallel_region(leaf, tensor_parallel_output_grad=True, group=groups.tp) if sp \
            else leaf
        out = fused_head(h, w, targets, groups.tp, 0.9, vocab_size=V - 3, kl_index=kl_index, teacher_hidden=t_hidden,
                         teacher_weight=w, chunk_tokens=5, reduce_hidden_grad=not sp)
        ((coef * out.logprob).sum() + out.fkl.sum() + 0.5 * out.rkl.sum()).backward()
        grads[sp] = leaf.grad
    return rank, grads


@pytest.mark.dist
def test_sequence_parallel_gather_and_the_fused_head():
    for rank, grads in run_on_ranks(_sequence_parallel_rank, 2, 2):
        want = grads[False][rank * 6:(rank + 1) * 6]
        assert want.abs().max() > 0
        torch.testing.assert_close(grads[True], want, rtol=1e-12, atol=1e-12)

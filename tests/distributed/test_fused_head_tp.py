"""The fused LM head with the vocabulary sharded over 2 and 3 gloo ranks equals the unfused path
at TP=1 in float64 (values, d(hidden) after its all-reduce, and each rank's weight rows)."""

import fused_cases
import pytest
import torch

from megatron_trace.parallel import run_on_ranks


def _rank(tp, dtype):
    import torch.distributed as dist

    from megatron_trace.parallel import initialize

    groups = initialize(tp=tp)
    return [fused_cases.run_fused(case, groups.tp, dist.get_rank(groups.tp), tp, dtype, 3)
            for case in fused_cases.CASES]


@pytest.mark.dist
@pytest.mark.parametrize("tp", [2, 3])
def test_sharded_fused_head_matches_the_unfused_path(tp):
    want = [fused_cases.reference(case) for case in fused_cases.CASES]
    for dtype in (torch.float64, torch.float32):
        per_rank = run_on_ranks(_rank, tp, tp, dtype)
        for rank, results in enumerate(per_rank):
            for case, got, ref in zip(fused_cases.CASES, results, want):
                fused_cases.compare(got, ref, dtype, (case[0], dtype, tp, rank))

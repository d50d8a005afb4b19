"""Loss primitives with the vocabulary sharded over 2 and 3 gloo ranks vs the dense fp64 reference."""

import pytest
import torch
import vp_cases

from megatron_trace.parallel import run_on_ranks


def _rank(tp, dtype):
    import torch.distributed as dist

    from megatron_trace.parallel import initialize

    groups = initialize(tp=tp)
    # A plain torch.distributed group also works: the primitives never touch Megatron.
    return vp_cases.run_cases(groups.tp, dist.get_rank(groups.tp), tp, dtype)


@pytest.mark.dist
@pytest.mark.parametrize("tp", [2, 3])
def test_sharded_primitives_match_dense_reference(tp):
    for dtype in (torch.float64, torch.float32):
        vp_cases.check_results(run_on_ranks(_rank, tp, tp, dtype), dtype)

"""megatron_trace/parallel/megatron_compat.py: Megatron's collectives rebound to torch's current
names, and the distributed optimizer's zero_grad quiet about its non-leaf `.grad` reads only."""

import warnings

import torch
import torch.distributed as dist

from megatron_trace.parallel import megatron_compat


def test_collectives_are_rebound_to_the_current_names():
    from megatron.core.distributed import param_and_grad_buffer as pgb
    from megatron.core.tensor_parallel import mappings

    megatron_compat.apply()
    megatron_compat.apply()  # idempotent
    assert hasattr(dist, "reduce_scatter_single")  # torch 2.13, the pinned CPU wheel
    assert pgb.dist_reduce_scatter_func is dist.reduce_scatter_single
    assert pgb.dist_all_gather_func is dist.all_gather_single
    assert mappings.dist_reduce_scatter_func is dist.reduce_scatter_single


def _non_leaf_params():
    base = torch.nn.Parameter(torch.ones(4))
    view = base.view(-1)[:2]  # a shard view, as the distributed optimizer keeps them
    return [view]


def test_zero_grad_helper_is_quiet_about_non_leaf_reads_only():
    from megatron.core.optimizer import distrib_optimizer, optimizer

    megatron_compat.apply()
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        optimizer._zero_grad_group_helper(_non_leaf_params(), set_to_none=True)
    assert any("not a leaf Tensor" in str(w.message) for w in raw)  # the unwrapped helper warns
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        distrib_optimizer._zero_grad_group_helper(_non_leaf_params(), set_to_none=True)
        warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in quiet] == ["another warning"]

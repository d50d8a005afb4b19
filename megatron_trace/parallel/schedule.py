"""Megatron's forward/backward schedules, called with explicit process groups."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .state import ParallelGroups

__all__ = ["run_schedule"]


def run_schedule(
    groups: ParallelGroups,
    model,
    forward_step_func: Callable,
    data_iterator: Iterator,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list[Any]:
    """Run `get_forward_backward_func` for this layout (no pipelining, or 1F1B for PP>1).

    Returns what the schedule collects on the last stage: the loss functions' reduced outputs,
    or the raw outputs when the step returns `loss_func=None` under `forward_only`. Other
    stages get an empty list.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.utils import get_model_config

    fb = get_forward_backward_func(pp_size=groups.pp_size, vp_size=None)
    kwargs: dict[str, Any] = {}
    if groups.pp_size > 1:
        kwargs.update(
            p2p_communicator=P2PCommunicator(pp_group=groups.pp, config=get_model_config(model)),
            pg_collection=groups.pg_collection,
        )
    else:
        kwargs.update(pg_collection=groups.pg_collection)
    return fb(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        **kwargs,
    )

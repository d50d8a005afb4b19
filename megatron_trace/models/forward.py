"""Forward passes through the Megatron pipeline schedule, for parity checks and debugging.

Training and the routed loss keep logits vocab-parallel; `gather_full_logits` exists for tests
and tools that compare against dense references.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel import ParallelGroups
from ..parallel.schedule import run_schedule

__all__ = ["forward_logits", "gather_full_logits"]


@torch.no_grad()
def forward_logits(model, groups: ParallelGroups, input_ids: torch.Tensor,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Vocab-parallel logits `[b, s, V_pad/tp]` on the last PP stage; None on other stages.

    `input_ids` `[b, s]` must be identical on every rank of the pipeline (only the first stage
    reads it, but the schedule needs the shapes everywhere).
    """
    b, s = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)

    def step(data_iter, m):
        ids, pos = next(data_iter)
        return m(ids, pos, None), None

    model.eval()
    out = run_schedule(groups, model, step, iter([(input_ids.to(groups.device), position_ids.to(groups.device))]),
                       num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    return out[0] if groups.is_last_stage else None


@torch.no_grad()
def gather_full_logits(shard: torch.Tensor | None, groups: ParallelGroups, vocab_size: int,
                       shape: tuple[int, int]) -> torch.Tensor:
    """All-gather TP vocab shards, strip padding, and broadcast from the last stage to all.

    shape: (b, s) of the batch, needed by stages that hold no logits.
    """
    if groups.is_last_stage:
        parts = [torch.empty_like(shard) for _ in range(groups.tp_size)]
        dist.all_gather(parts, shard.contiguous(), group=groups.tp)
        full = torch.cat(parts, dim=-1)[..., :vocab_size].contiguous()
    else:
        full = torch.empty(*shape, vocab_size, device=groups.device)
    if groups.pp_size > 1:
        full = full.float()
        dist.broadcast(full, src=groups.pp_global_rank(groups.pp_size - 1), group=groups.pp)
    return full

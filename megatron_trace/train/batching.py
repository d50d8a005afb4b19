"""How a step's rollouts become micro-batches: the DP partition, token budgets, sequence packing.

Pure bookkeeping, no model: `train/step.py` runs what these functions lay out.

**DP partition** (`partition_dp`). Each mini-batch is split over the DP ranks by a greedy
longest-processing-time partition on each rollout's cost (its tokens in every pass it takes
part in). Bound (tested): the most loaded rank holds at most the mean load plus the single most
expensive rollout, `max_load <= total / dp + max_cost`; every rank gets at least one rollout when
the mini-batch has at least `dp` of them. The loss is normalised by global counts
(`loss/routed.py`), so which rank trains which rollout changes nothing but the speed.

**Micro-batches** (`plan_micro_batches`). With `budget == 0` a micro-batch is `count` rollouts in
order (the layout before budgets existed). With a token budget the count is free:
  - padded rows cost `rows x longest`: rollouts sorted longest first, cut greedily, so that
    similar lengths share a micro-batch and little is padding;
  - packed rows cost the sum of their lengths: first-fit decreasing into bins of `budget`.
Either way a micro-batch stays within the budget unless one sequence alone exceeds it; that
sequence then gets a micro-batch of its own.

**Packing** (`lay_out`). A packed micro-batch is one row `[1, L]` holding its sequences back to
back, each with its own position ids (0, 1, ...). On CPU (the local layer spec) attention gets a
block-diagonal causal mask built from the per-token sequence index (`block_causal_mask`), and
RoPE reads the per-sequence positions (see `model_pass._rope_positions`). On GPU with
TransformerEngine the same row goes through Megatron's THD path (`PackedSeqParams` with the
sequences' cumulative lengths). Rows are padded at the end to a multiple of `multiple` (the TP
size under sequence parallelism); padding is a sequence of its own that no loss reads.

**Pipeline parallelism.** Micro-batches of one schedule call have different shapes; the model
config sets `variable_seq_lengths`, so every stage receives each micro-batch's shape before its
activations. Packing changes nothing there: a packed micro-batch is just a `[1, L]` batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..rollout.dispatch import balance

__all__ = ["Layout", "block_causal_mask", "lay_out", "micro_batch_cost", "partition_dp", "plan_micro_batches"]


def partition_dp(costs: Sequence[int], dp_size: int) -> list[list[int]]:
    """Indices of the rollouts each DP rank trains (ascending within a rank); see the module doc
    for the bound."""
    if dp_size == 1:
        return [list(range(len(costs)))]
    return balance([float(c) for c in costs], dp_size)


def micro_batch_cost(lengths: Sequence[int], packed: bool) -> int:
    """Tokens a micro-batch occupies: the sum when packed, rows x longest when padded."""
    if not lengths:
        return 0
    return sum(lengths) if packed else len(lengths) * max(lengths)


def plan_micro_batches(lengths: Sequence[int], *, count: int, budget: int = 0, packed: bool = False) -> list[list[int]]:
    """Group sequence indices into micro-batches (see the module doc). Deterministic."""
    n = len(lengths)
    if budget <= 0:
        return [list(range(a, min(a + count, n))) for a in range(0, n, count)]
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    if packed:
        bins: list[list[int]] = []
        room: list[int] = []
        for i in order:
            for b, r in enumerate(room):
                if lengths[i] <= r:
                    bins[b].append(i)
                    room[b] -= lengths[i]
                    break
            else:
                bins.append([i])
                room.append(budget - lengths[i])
        return [sorted(b) for b in bins]
    out: list[list[int]] = []
    for i in order:  # longest first: the first of a micro-batch sets its row length
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return [sorted(b) for b in out]


@dataclass
class Layout:
    """Token ids of a micro-batch and where each sequence sits in it."""

    ids: torch.Tensor  # [b, s]
    pos: torch.Tensor  # [b, s] position ids, restarting at 0 for every sequence
    seg: torch.Tensor | None  # [b, s] packed: the sequence index of each token (-1 = row padding); None = one per row
    where: list[tuple[int, int]]  # (row, first column) of each sequence
    lengths: list[int]

    @property
    def packed(self) -> bool:
        return self.seg is not None

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()


def lay_out(seqs: Sequence[Sequence[int]], *, packed: bool, multiple: int = 1) -> Layout:
    """Right-padded rows, one sequence each; or one packed row with all of them."""
    lengths = [len(x) for x in seqs]
    if packed:
        total = sum(lengths)
        s = -(-total // multiple) * multiple
        ids = torch.zeros(1, s, dtype=torch.long)
        pos = torch.zeros(1, s, dtype=torch.long)
        seg = torch.full((1, s), -1, dtype=torch.long)
        where, k = [], 0
        for j, x in enumerate(seqs):
            n = len(x)
            ids[0, k:k + n] = torch.as_tensor(list(x), dtype=torch.long)
            pos[0, k:k + n] = torch.arange(n)
            seg[0, k:k + n] = j
            where.append((0, k))
            k += n
        pos[0, k:] = torch.arange(s - k)
        return Layout(ids, pos, seg, where, lengths)
    s = -(-max(lengths) // multiple) * multiple
    ids = torch.zeros(len(seqs), s, dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, :len(x)] = torch.as_tensor(list(x), dtype=torch.long)
    pos = torch.arange(s).unsqueeze(0).expand(len(seqs), s).contiguous()
    return Layout(ids, pos, None, [(r, 0) for r in range(len(seqs))], lengths)


def block_causal_mask(seg: torch.Tensor) -> torch.Tensor:
    """`[b, 1, s, s]` bool, True = masked: token i sees token j iff both are in the same sequence
    and j <= i (Megatron's convention for `attention_mask`)."""
    s = seg.shape[-1]
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril()
    return ~(same & causal).unsqueeze(1)

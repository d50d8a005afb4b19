"""Micro-batch plans, the DP partition and packed layouts (train/batching.py), property-tested."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_trace.train.batching import (
    block_causal_mask,
    lay_out,
    micro_batch_cost,
    partition_dp,
    plan_micro_batches,
)

# Log-normal-ish lengths: mostly short, a few long (like reasoning rollouts).
lengths = st.lists(st.one_of(st.integers(1, 40), st.integers(41, 600)), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(lengths, st.integers(0, 800), st.booleans(), st.integers(1, 8))
def test_micro_batches_cover_every_rollout_once_within_budget(lens, budget, packed, count):
    plan = plan_micro_batches(lens, count=count, budget=budget, packed=packed)
    flat = [i for mb in plan for i in mb]
    assert sorted(flat) == list(range(len(lens)))
    assert all(mb for mb in plan)
    for mb in plan:
        if budget == 0:
            assert len(mb) <= count
        elif len(mb) > 1:  # a single sequence longer than the budget is alone
            assert micro_batch_cost([lens[i] for i in mb], packed) <= budget
    if budget == 0:  # the fixed-count layout: consecutive rollouts in order
        assert flat == list(range(len(lens)))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(lengths, st.integers(1, 800))
def test_packing_needs_no_more_micro_batches_than_padding(lens, budget):
    packed = plan_micro_batches(lens, count=1, budget=budget, packed=True)
    padded = plan_micro_batches(lens, count=1, budget=budget, packed=False)
    assert len(packed) <= len(padded)


@settings(max_examples=300, deadline=None)
@given(lengths, st.integers(1, 8))
def test_dp_partition_is_balanced_within_the_documented_bound(costs, dp):
    shares = partition_dp(costs, dp)
    assert len(shares) == dp
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) <= sum(costs) / dp + max(costs) + 1e-9
    if len(costs) >= dp:
        assert all(shares), "every rank needs a rollout (the DP all-reduce is collective)"


def test_dp_partition_beats_the_stride_split_on_a_long_tail():
    costs = [1500 if i % 4 == 0 else 100 for i in range(16)]  # every long one lands on rank 0 by stride
    stride = [sum(costs[r::2]) for r in range(2)]
    balanced = [sum(costs[i] for i in s) for s in partition_dp(costs, 2)]
    assert max(balanced) < max(stride) and max(balanced) - min(balanced) <= max(costs)


def test_packed_layout_positions_and_block_causal_mask():
    seqs = [[5, 6, 7], [8, 9], [1, 2, 3, 4]]
    lay = lay_out(seqs, packed=True, multiple=4)
    assert lay.ids.shape == (1, 12) and lay.where == [(0, 0), (0, 3), (0, 5)]
    assert lay.ids[0, :9].tolist() == [5, 6, 7, 8, 9, 1, 2, 3, 4]
    assert lay.pos[0, :9].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    mask = block_causal_mask(lay.seg)[0, 0]
    for i in range(12):
        for j in range(12):
            visible = bool(lay.seg[0, i] == lay.seg[0, j]) and j <= i
            assert bool(mask[i, j]) == (not visible)
    padded = lay_out(seqs, packed=False, multiple=1)
    assert padded.ids.shape == (3, 4) and padded.seg is None and padded.where == [(0, 0), (1, 0), (2, 0)]
    assert torch.equal(padded.pos[1], torch.arange(4))

"""Fused QKV / gate-up layouts, per TP rank, for every Qwen3 head configuration (no Megatron)."""

import dataclasses

import pytest
import torch

from megatron_trace.models.convert import merge_fc1, merge_qkv, split_fc1, split_qkv
from megatron_trace.models.qwen3 import QWEN3_SIZES


def _labelled(rows: int, tag: float, hidden: int = 3) -> torch.Tensor:
    """Row i holds tag*1e6 + i: every row is identifiable after any permutation."""
    return (tag * 1e6 + torch.arange(rows, dtype=torch.float64)).unsqueeze(1).repeat(1, hidden)


# Every size at every TP that divides its KV groups (tiny has 2 groups: TP 1 and 2).
LAYOUTS = [(s, tp) for s in QWEN3_SIZES for tp in (1, 2, 4, 8) if QWEN3_SIZES[s].num_key_value_heads % tp == 0]


@pytest.mark.parametrize("size, tp", LAYOUTS)
def test_qkv_layout_and_shards(size, tp):
    arch = dataclasses.replace(QWEN3_SIZES[size], hidden_size=3)  # layout never depends on hidden
    ng, hd, nq = arch.num_key_value_heads, arch.head_dim, arch.num_attention_heads
    q, k, v = _labelled(nq * hd, 1), _labelled(ng * hd, 2), _labelled(ng * hd, 3)
    fused = merge_qkv(q, k, v, arch)
    assert fused.shape == ((nq + 2 * ng) * hd, 3)
    per = nq // ng
    # Independent statement of the layout: group g = [q heads g*per..g*per+per-1, k_g, v_g].
    expect = []
    for g in range(ng):
        expect += [q[(g * per + j) * hd:(g * per + j + 1) * hd] for j in range(per)]
        expect += [k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
    assert torch.equal(fused, torch.cat(expect))
    # A TP rank's shard is whole KV groups; concatenating shards gives back the global tensor.
    shards = fused.chunk(tp, 0)
    rows_per_group = (per + 2) * hd
    for r, s in enumerate(shards):
        assert torch.equal(s, fused[r * (ng // tp) * rows_per_group:(r + 1) * (ng // tp) * rows_per_group])
    q2, k2, v2 = split_qkv(torch.cat(shards), arch)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_fc1_per_rank_gate_up(tp):
    ffn = 16 * 8
    gate, up = _labelled(ffn, 4), _labelled(ffn, 5)
    shards = [merge_fc1(gate, up, tp, r) for r in range(tp)]
    for r, s in enumerate(shards):
        n = ffn // tp
        assert torch.equal(s[:n], gate[r * n:(r + 1) * n]) and torch.equal(s[n:], up[r * n:(r + 1) * n])
    g2, u2 = split_fc1(shards)
    assert torch.equal(g2, gate) and torch.equal(u2, up)

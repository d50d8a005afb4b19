"""Running the model on a pass's micro-batches: Megatron's schedule, the span-sparse head, packed
rows (block-diagonal mask with per-sequence RoPE, or TransformerEngine's THD), and the head
bypass of the fused LM head.

Every pass goes through Megatron's `get_forward_backward_func` (PP works unchanged), and the LM
head runs only at the positions a pass reads (span-sparse head: a pre-hook on the output layer
selects those hidden states, so the [hidden x V/tp] matmul costs one row per token read). With
`loss.fused_head` the output layer is bypassed: the pass gets those hidden states and the
output weight (`head_weight`), which `loss/fused_head.py` turns into per-token values. The
key-token lift's teacher pass bypasses it whatever the setting (`lift.py` keeps those hidden
states, not `[K, V/tp]` logits).
"""

from __future__ import annotations

import contextlib

import torch

from ..models.builder import unwrap_model
from ..parallel import ParallelGroups
from ..parallel.schedule import run_schedule
from .batching import Layout, block_causal_mask
from .micro import Batching, MicroBatch

__all__ = ["forward_micro_batch", "head_weight", "run_forward"]


def head_weight(model) -> torch.Tensor:
    """The output layer's weight shard `[V/tp, H]` as Megatron passes it to the layer: the shared
    embedding weight when the two are tied (so the fused head's gradient reaches that parameter)."""
    inner = unwrap_model(model)
    if getattr(inner, "share_embeddings_and_output_weights", False):
        return inner.shared_embedding_or_output_weight()
    return inner.output_layer.weight


@contextlib.contextmanager
def _span_sparse_head(model, rows: torch.Tensor, cols: torch.Tensor, fused: bool = False):
    """Make the output layer see only hidden states at (row, col): logits come out [1, T, V/tp].

    Under sequence parallelism the output layer's input is sharded along the sequence: the hook
    gathers it first and the layer runs as plain column-parallel for this call (its input grad
    is then all-reduced over TP, and the gather's backward keeps this rank's slice).

    fused (`loss.fused_head`): the output layer does not run at all. The model returns the
    selected final hidden states `[1, T, H]` (the same on every TP rank) and the caller applies
    `loss/fused_head.py` with `head_weight(model)`. Under sequence parallelism the gather's
    backward reduce-scatters the hidden-state gradient (the fused head then leaves it unreduced).
    """
    inner = unwrap_model(model)
    head = getattr(inner, "output_layer", None)
    if head is None or not getattr(inner, "post_process", False):
        yield
        return
    sp = bool(getattr(head, "sequence_parallel", False))

    def pick(hidden: torch.Tensor) -> torch.Tensor:
        # [s, b, h] ([s/tp, b, h] under sequence parallelism) -> [T, 1, h]
        if sp:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=fused,
                                                          group=head.tp_group)
        return hidden[cols.to(hidden.device), rows.to(hidden.device)].unsqueeze(1)

    if fused:
        def bypass(input_, weight=None, runtime_gather_output=None):
            return pick(input_), None

        head.forward = bypass  # an instance attribute: shadows the class's forward for this block
        try:
            yield
        finally:
            del head.forward
        return

    def pre_hook(_module, args, kwargs):
        return (pick(args[0]), *args[1:]), kwargs

    handle = head.register_forward_pre_hook(pre_hook, with_kwargs=True)
    if sp:
        head.sequence_parallel = False
    try:
        yield
    finally:
        handle.remove()
        if sp:
            head.sequence_parallel = True


@contextlib.contextmanager
def _rope_positions(model, pos: torch.Tensor | None):
    """Packed rows on the local spec: RoPE at each token's own position ids `[b, s]`.

    Megatron computes the rotary table for positions 0..s-1 of the row; the hook re-indexes it by
    the per-sequence positions (a `[s, b, 1, d]` table broadcasts over heads like the usual
    `[s, 1, 1, d]`)."""
    rope = getattr(unwrap_model(model), "rotary_pos_emb", None)
    if pos is None or rope is None:
        yield
        return

    def hook(_module, _args, emb):
        return emb[:, 0, 0][pos.t().to(emb.device)].unsqueeze(2)

    handle = rope.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _thd_params(lay: Layout, device):
    """Megatron's packed-sequence description of one packed row (TransformerEngine attention)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lens = list(lay.lengths)
    pad = lay.ids.shape[1] - sum(lens)
    if pad:
        lens.append(pad)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    cu = cu.to(device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens),
                           max_seqlen_kv=max(lens))


def forward_micro_batch(m, groups: ParallelGroups, mb: MicroBatch, b: Batching, fused: bool = False):
    """The model on one micro-batch, at the positions `mb` reads (last stage): logits `[1, T, V/tp]`,
    or with `fused` the final hidden states `[1, T, H]` (see `_span_sparse_head`)."""
    lay, dev = mb.lay, groups.device
    ids, pos = lay.ids.to(dev), lay.pos.to(dev)
    mask = psp = None
    if lay.packed and b.thd:
        psp = _thd_params(lay, dev)
    elif lay.packed:
        mask = block_causal_mask(lay.seg.to(dev))
    with _span_sparse_head(m, mb.rows, mb.cols, fused), _rope_positions(m, pos if mask is not None else None):
        if psp is not None:
            return m(ids, pos, None, packed_seq_params=psp)
        return m(ids, pos, mask)


def run_forward(model, groups: ParallelGroups, mbs: list[MicroBatch], b: Batching, consume, fused: bool = False) -> None:
    """Forward only, all micro-batches in one schedule call. On the last stage `consume(mb, out)`
    gets each micro-batch's `[T, V/tp]` logits (`[T, H]` hidden states with `fused`) as it is
    computed, so no pass holds more than one micro-batch's beyond what it keeps."""
    if not mbs:
        return

    def step(data_iter, m):
        mb = mbs[next(data_iter)]

        def loss_func(out):
            consume(mb, out[0])
            return torch.zeros((), device=out.device), {}

        return forward_micro_batch(m, groups, mb, b, fused), loss_func

    model.eval()
    with torch.no_grad():
        run_schedule(groups, model, step, iter(range(len(mbs))), num_microbatches=len(mbs),
                     seq_length=max(mb.ids.shape[1] for mb in mbs),
                     micro_batch_size=max(mb.ids.shape[0] for mb in mbs), forward_only=True)


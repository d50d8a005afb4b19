"""Parameters, gradient buffer and optimizer state of one TP rank of a pipeline stage (exact; the
package docstring gives the formulas, `tests/unit/test_plan.py` checks them against the tensors
Megatron allocates)."""

from __future__ import annotations

import math

from ..models.qwen3 import Qwen3Arch

GB = 1e9
MIB = 1 << 20


def _padded_vocab(vocab: int, tp: int) -> int:
    from ..models.builder import padded_vocab

    return padded_vocab(vocab, tp)


def _kv_per_rank(arch: Qwen3Arch, tp: int) -> int:
    """KV width on one TP rank (Megatron needs the KV heads to divide over TP)."""
    g = arch.num_key_value_heads
    if g % tp:
        raise ValueError(f"config key 'parallel.tp': value {tp} does not divide num_key_value_heads={g}; "
                         f"Megatron shards the KV heads over TP")
    return g // tp * arch.head_dim


def param_numels(arch: Qwen3Arch, tp: int, pp: int) -> list[dict[str, int]]:
    """Per pipeline stage, the parameter elements one TP rank holds, by part."""
    L, h, d, f = arch.num_hidden_layers, arch.hidden_size, arch.head_dim, arch.intermediate_size
    if L % pp:
        raise ValueError(f"config key 'parallel.pp': value {pp} does not divide the model's {L} layers")
    if arch.num_attention_heads % tp or f % tp:
        raise ValueError(f"config key 'parallel.tp': value {tp} does not divide the attention heads "
                         f"({arch.num_attention_heads}) and the FFN size ({f})")
    q, kv = arch.num_attention_heads * d // tp, _kv_per_rank(arch, tp)
    vocab = _padded_vocab(arch.vocab_size, tp) // tp * h
    out = []
    for i in range(pp):
        parts = {"linear": (h * (q + 2 * kv) + q * h + 3 * h * f // tp) * (L // pp),
                 "norms": (2 * h + 2 * d) * (L // pp)}
        if i == 0:
            parts["embedding"] = vocab
        if i == pp - 1:
            parts["norms"] += h
            if not arch.tie_word_embeddings or pp > 1:
                parts["lm_head"] = vocab
        out.append(parts)
    return out


def _ddp_buffer_numel(numel: int, num_params: int, dp: int, distributed: bool) -> int:
    """Megatron DDP buffer elements: padded only under the distributed optimizer (each parameter
    starts on a multiple of 64, the buffer ends on a multiple of lcm(dp, 128)); the per-parameter
    padding is bounded by 63 elements each."""
    if not distributed:
        return numel
    m = math.lcm(dp, 128)
    return -(-(numel + 63 * num_params) // m) * m


def _optimizer_bytes(cfg) -> tuple[int, int]:
    """Bytes per parameter of the fp32 master copy (made with the optimizer; only for bf16 weights)
    and of the moments (Adam m + v, SGD momentum; made at the first step)."""
    return (4 if cfg.model.dtype == "bfloat16" else 0), (8 if cfg.optim.optimizer == "adam" else 4)


def static_bytes(cfg, arch: Qwen3Arch, dp: int, te_spec: bool) -> list[dict[str, float]]:
    """Per pipeline stage, bytes one GPU holds in weights, gradient buffer and optimizer state.

    The local spec's RMSNorm weights are fp32 whatever the model dtype (so no master copy); TE's
    norms follow the model dtype."""
    o, B = cfg.optim, 2 if cfg.model.dtype == "bfloat16" else 4
    master, moments = _optimizer_bytes(cfg)
    out = []
    for parts in param_numels(arch, cfg.parallel.tp, cfg.parallel.pp):
        n = sum(parts.values())
        fp32_norms = 0 if te_spec or B == 4 else parts["norms"]
        n_tensors = 9 * (arch.num_hidden_layers // cfg.parallel.pp) + len(parts)  # 9 parameter tensors per layer
        buf = _ddp_buffer_numel(n, n_tensors, dp, o.distributed_optimizer)
        weights = (buf if o.distributed_optimizer else n) * B + fp32_norms * (4 - B)
        opt = (buf / dp if o.distributed_optimizer else n) * (master + moments) - fp32_norms * master
        out.append({"weights": weights, "grads": buf * 4.0, "optimizer": opt})
    return out

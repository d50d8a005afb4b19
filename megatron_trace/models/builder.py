"""Build a Megatron-core `GPTModel` for a Qwen3 architecture on this rank's TP/PP slice.

Logits leave the model vocab-parallel, `[b, s, V_pad/tp]`. Rows past the real vocabulary are
padding: `mask_vocab_padding_` sets them to -inf before any softmax, and the HF export strips
them (`models.convert`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F

from ..parallel import ParallelGroups
from .qwen3 import Qwen3Arch

__all__ = [
    "VOCAB_PAD_MULTIPLE",
    "build_model",
    "have_transformer_engine",
    "mask_vocab_padding_",
    "padded_vocab",
    "transformer_config",
    "unwrap_model",
    "vocab_shard_range",
]

# Megatron pads the vocabulary to a multiple of 128*tp, which makes the padded size (and thus the
# checkpoint's embedding shape) depend on TP: 151936 stays at TP=1 but becomes 152064 at TP=2.
# We pad to a multiple of lcm(1024, tp) instead, so one checkpoint reshards across any TP that
# divides 1024 (1, 2, 4, 8, ...). The cost is at most 1023 dead rows (0.4% of Qwen3's LM head).
# Small vocabularies (the tiny CPU models' 102 characters) pad to lcm(128, tp) instead, so that
# their LM head and vocab-parallel losses are not mostly padding (102 -> 128, not 1024).
VOCAB_PAD_MULTIPLE = 1024
SMALL_VOCAB = 32768
SMALL_VOCAB_PAD_MULTIPLE = 128


def unwrap_model(model):
    """The GPTModel inside DDP / Float16 wrappers (which nest it as `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def padded_vocab(vocab_size: int, tp_size: int, multiple: int | None = None) -> int:
    """The TP-invariant padded vocabulary (see above); depends on the vocabulary size, not on TP
    (for every TP dividing the multiple)."""
    if multiple is None:
        multiple = SMALL_VOCAB_PAD_MULTIPLE if vocab_size < SMALL_VOCAB else VOCAB_PAD_MULTIPLE
    m = math.lcm(multiple, tp_size)
    return -(-vocab_size // m) * m


def vocab_shard_range(padded_size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Global vocab ids `[start, end)` held by `tp_rank` (contiguous, equal shards)."""
    per = padded_size // tp_size
    return tp_rank * per, (tp_rank + 1) * per


def mask_vocab_padding_(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Set padded vocab entries of a vocab-parallel shard `[..., V_pad/tp]` to -inf, in place."""
    per = logits.shape[-1]
    start = tp_rank * per
    if start + per > vocab_size:
        logits[..., max(vocab_size - start, 0):] = float("-inf")
    return logits


def have_transformer_engine() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _recompute_kwargs(recompute: str, method: str, num_layers: int, layers_per_stage: int) -> dict:
    """TransformerConfig's recompute keys for `optim.recompute` (see transformer_config)."""
    if recompute == "none":
        return {}
    if recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if recompute == "full":
        if not 1 <= num_layers <= layers_per_stage or (method == "uniform" and layers_per_stage % num_layers):
            raise ValueError(f"config key 'optim.recompute_num_layers': value {num_layers} is not allowed "
                             f"with recompute_method={method!r}; expected an integer in [1, "
                             f"{layers_per_stage}] (the layers of a pipeline stage)"
                             + (" that divides it" if method == "uniform" else ""))
        return dict(recompute_granularity="full", recompute_method=method, recompute_num_layers=num_layers)
    raise ValueError(f"config key 'optim.recompute': value {recompute!r} is not allowed; "
                     "expected one of ['full', 'none', 'selective']")


def transformer_config(
    arch: Qwen3Arch,
    groups: ParallelGroups,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    recompute: str = "none",
    recompute_method: str = "uniform",
    recompute_num_layers: int = 1,
    **overrides,
):
    """Megatron `TransformerConfig` for `arch` on `groups`' layout.

    Dropout is 0 (RL and deterministic tests need it), and the CUDA-only fusions are off on CPU.
    `sequence_parallel` takes effect only at TP > 1. `recompute` (the `optim.recompute*` keys):
      none       every activation is kept for backward;
      selective  Megatron's selective recompute of the core attention (`recompute_modules=
                 ["core_attn"]`): the [b, heads, s, s] scores of the local spec are recomputed;
                 with TE's fused attention there are none, and this changes little;
      full       each layer chunk keeps only its input and reruns its forward in backward:
                 `uniform` = chunks of `recompute_num_layers` layers (which must divide the
                 layers of a stage), `block` = only the first `recompute_num_layers` layers of
                 each stage.
    Only the training forward recomputes (Megatron checks `self.training`); no-grad passes are
    unaffected.
    """
    from megatron.core.transformer import TransformerConfig

    on_cpu = groups.device.type == "cpu"
    recompute_kwargs = _recompute_kwargs(recompute, recompute_method, recompute_num_layers,
                                         arch.num_hidden_layers // groups.pp_size)
    kwargs = dict(
        num_layers=arch.num_hidden_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,  # Qwen3: head_dim=128 even where heads*128 != hidden
        ffn_hidden_size=arch.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        context_parallel_size=groups.cp_size,
        sequence_parallel=sequence_parallel and groups.tp_size > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        **recompute_kwargs,
        # PP micro-batches of differing lengths (RL rollouts); the MoE dispatcher default
        # refuses this flag although this dense model has no experts.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
    )
    if on_cpu:
        kwargs.update(
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            apply_rope_fusion=False,
        )
    kwargs.update(overrides)
    with warnings.catch_warnings():
        # Megatron warns about core_attn recompute whenever it is asked for, in case the
        # attention is TE's fused one; the local spec's is not, and there it is the point.
        warnings.filterwarnings("ignore", message=".*core_attn.*", category=UserWarning)
        return TransformerConfig(**kwargs)


def build_model(
    arch: Qwen3Arch,
    groups: ParallelGroups,
    *,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    **config_overrides,
):
    """This rank's `GPTModel` stage. `use_te=None` picks the TE spec when TE and CUDA exist."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te is None:
        use_te = have_transformer_engine()
    if use_te and not have_transformer_engine():
        raise ValueError("model.use_te=true but TransformerEngine with CUDA is not available")
    if arch.num_hidden_layers % groups.pp_size:
        raise ValueError(
            f"pipeline size {groups.pp_size} must divide num_hidden_layers={arch.num_hidden_layers}"
        )
    if arch.num_key_value_heads % groups.tp_size and groups.tp_size % arch.num_key_value_heads:
        raise ValueError(
            f"tensor parallel size {groups.tp_size} and num_key_value_heads={arch.num_key_value_heads} "
            "must divide one another"
        )
    config = transformer_config(arch, groups, params_dtype=params_dtype, **config_overrides)
    spec = (
        get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
        if use_te
        else get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    )
    if config.sequence_parallel and not use_te:
        spec = _local_spec_with_sequence_parallel_norms(spec, arch.num_hidden_layers // groups.pp_size)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab(arch.vocab_size, groups.tp_size),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rotary_percent=1.0,
        pg_collection=groups.pg_collection,
    )
    _ensure_tp_attributes(model)
    model.arch = arch  # the HF-side description travels with the module (export, checkpoints)
    return model.to(groups.device)


class _SequenceParallelTorchNorm:
    """The local spec's torch RMSNorm under sequence parallelism.

    Megatron's `WrappedTorchNorm` refuses sequence parallelism: nothing would mark its weight
    for the all-reduce over TP that sequence-sharded inputs need (each rank sees s/tp tokens).
    This builds the same norm and marks it `sequence_parallel`, as TE's norms are marked, so
    `finalize_model_grads` sums its gradient over TP.
    """

    mark = True

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        import copy

        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = cls.mark and config.sequence_parallel
        return norm


class _QKTorchNorm(_SequenceParallelTorchNorm):
    """q/k norms see whole sequences (after the QKV gather); Megatron already sums their grads
    over TP by name (`qk_layernorm`), so they are not marked."""

    mark = False


def _local_spec_with_sequence_parallel_norms(spec, num_layers: int):
    """The local layer spec with every norm (and the final one) built by `_SequenceParallelTorchNorm`."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    sub = spec.submodules
    attn = sub.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(
        attn.submodules, q_layernorm=_QKTorchNorm, k_layernorm=_QKTorchNorm))
    layer = dataclasses.replace(spec, submodules=dataclasses.replace(
        sub, input_layernorm=_SequenceParallelTorchNorm, pre_mlp_layernorm=_SequenceParallelTorchNorm,
        self_attention=attn))
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=_SequenceParallelTorchNorm)


def _ensure_tp_attributes(model) -> None:
    """Mark TP-sharded weights as such even when they were not initialised.

    With `use_cpu_initialization` and `perform_initialization=False` (conversion, loading real
    weights) megatron-core 0.16 never sets `tensor_model_parallel` on the sharded weights. Its
    grad-norm code then treats every shard as a TP duplicate and counts only rank 0's, which
    under-reports the norm and mis-clips at TP>1 (found by tests/distributed/test_loop.py).
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        dim = 1 if isinstance(module, RowParallelLinear) else 0
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            w = getattr(module, "weight", None)
            if w is not None and not getattr(w, "tensor_model_parallel", False):
                set_tensor_model_parallel_attributes(w, True, dim, 1)

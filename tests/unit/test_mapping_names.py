"""Megatron parameter names (local and TE specs, wrapped or not) -> HF names; vocab padding helpers."""

import dataclasses

import pytest
import torch

from megatron_trace.models.builder import mask_vocab_padding_, padded_vocab, vocab_shard_range
from megatron_trace.models.convert import hf_param_names, hf_source
from megatron_trace.models.qwen3 import QWEN3_SIZES

ARCH = QWEN3_SIZES["8b"]


@pytest.mark.parametrize(
    "megatron, hf, kind",
    [
        ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
        ("output_layer.weight", ("lm_head.weight",), "vocab"),
        ("decoder.final_layernorm.weight", ("model.norm.weight",), "rep"),
        ("decoder.layers.3.input_layernorm.weight", ("model.layers.13.input_layernorm.weight",), "rep"),
        ("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", ("model.layers.13.input_layernorm.weight",), "rep"),
        ("decoder.layers.0.self_attention.linear_qkv.weight",
         tuple(f"model.layers.10.self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
        ("decoder.layers.0.self_attention.q_layernorm.weight", ("model.layers.10.self_attn.q_norm.weight",), "rep"),
        ("decoder.layers.0.self_attention.k_layernorm.weight", ("model.layers.10.self_attn.k_norm.weight",), "rep"),
        ("decoder.layers.0.self_attention.linear_proj.weight", ("model.layers.10.self_attn.o_proj.weight",), "row"),
        ("decoder.layers.1.pre_mlp_layernorm.weight", ("model.layers.11.post_attention_layernorm.weight",), "rep"),
        ("decoder.layers.1.mlp.linear_fc1.layer_norm_weight", ("model.layers.11.post_attention_layernorm.weight",), "rep"),
        ("decoder.layers.1.mlp.linear_fc1.weight",
         ("model.layers.11.mlp.gate_proj.weight", "model.layers.11.mlp.up_proj.weight"), "fc1"),
        ("module.module.decoder.layers.1.mlp.linear_fc2.weight", ("model.layers.11.mlp.down_proj.weight",), "row"),
    ],
)
def test_local_and_te_names_map_with_stage_offset(megatron, hf, kind):
    src = hf_source(megatron, 10, ARCH)  # a PP stage whose first layer is global layer 10
    assert src.hf_names == hf and src.kind == kind


def test_tied_output_copy_maps_to_embedding_and_unknown_names_fail():
    tied = QWEN3_SIZES["0.6b"]
    assert hf_source("output_layer.weight", 0, tied).hf_names == ("model.embed_tokens.weight",)
    with pytest.raises(KeyError, match="no HF mapping"):
        hf_source("decoder.layers.0.mlp.router.weight", 0, ARCH)


def test_hf_param_names_cover_a_checkpoint():
    names = hf_param_names(ARCH)
    assert len(names) == 1 + 11 * ARCH.num_hidden_layers + 1 + 1 and len(set(names)) == len(names)
    assert "lm_head.weight" not in hf_param_names(dataclasses.replace(ARCH, tie_word_embeddings=True))


def test_vocab_padding_helpers():
    v, tp = 1000, 2
    pad = padded_vocab(v, tp)
    assert pad == 1024
    ranges = [vocab_shard_range(pad, r, tp) for r in range(tp)]
    assert ranges == [(0, 512), (512, 1024)]
    shards = [torch.zeros(3, 512), torch.zeros(3, 512)]
    for r, s in enumerate(shards):
        mask_vocab_padding_(s, v, r)
    full = torch.cat(shards, -1)
    assert torch.isinf(full[:, v:]).all() and (full[:, v:] < 0).all() and torch.isfinite(full[:, :v]).all()

"""Qwen3 size registry, HF config parsing/validation, and Megatron TransformerConfig mapping."""

import json

import pytest
import torch.nn.functional as F

from megatron_trace.models.qwen3 import QWEN3_SIZES, arch_from_hf_config, get_arch

# Published parameter counts (billions), from the Qwen3 model cards.
PUBLISHED_B = {"0.6b": 0.6, "1.7b": 1.7, "4b": 4.0, "8b": 8.2, "14b": 14.8, "32b": 32.8}


@pytest.mark.parametrize("size", sorted(PUBLISHED_B))
def test_param_counts_match_published(size):
    n = QWEN3_SIZES[size].num_params / 1e9
    assert abs(n - PUBLISHED_B[size]) / PUBLISHED_B[size] < 0.04, (size, n)


def test_table_values():
    a = get_arch("Qwen3-0.6B")
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads) == (1024, 28, 16, 8)
    assert a.head_dim == 128 and a.num_attention_heads * a.head_dim != a.hidden_size
    assert a.tie_word_embeddings and not get_arch("8b").tie_word_embeddings
    assert get_arch("32b").intermediate_size == 25600 and get_arch("0p6b") is a
    with pytest.raises(ValueError, match="model.size"):
        get_arch("7b")


def test_hf_config_round_trip_through_transformers(tmp_path):
    from transformers import Qwen3Config

    for arch in QWEN3_SIZES.values():
        d = arch.to_hf_dict()
        cfg = Qwen3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
        cfg.architectures = ["Qwen3ForCausalLM"]
        cfg.save_pretrained(tmp_path)
        assert arch_from_hf_config(str(tmp_path)) == arch


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "architectures"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": -1}, "hidden_size"),
    ],
)
def test_bad_configs_refused_naming_the_key(tmp_path, patch, key):
    d = QWEN3_SIZES["0.6b"].to_hf_dict()
    d.update(patch)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=key) as err:
        arch_from_hf_config(str(tmp_path))
    assert "config.json" in str(err.value)


def test_missing_key_and_missing_file(tmp_path):
    d = QWEN3_SIZES["tiny"].to_hf_dict()
    del d["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        arch_from_hf_config(d)
    with pytest.raises(FileNotFoundError):
        arch_from_hf_config(str(tmp_path / "nope"))


def test_rope_parameters_layout_of_transformers5():
    d = QWEN3_SIZES["tiny"].to_hf_dict()
    del d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert arch_from_hf_config(d).rope_theta == 5e5


def test_transformer_config_mapping():
    """Every Qwen3 feature reaches Megatron: kv_channels, GQA, qk-norm, SwiGLU, no bias, no dropout."""
    import torch

    from megatron_trace.models.builder import padded_vocab, transformer_config

    class G:  # transformer_config only reads the layout sizes and the device
        tp_size, pp_size, cp_size, device = 2, 1, 1, torch.device("cpu")

    for size in ("0.6b", "32b"):
        a = QWEN3_SIZES[size]
        c = transformer_config(a, G())
        assert c.kv_channels == 128 and c.num_query_groups == 8 and c.qk_layernorm
        assert c.gated_linear_unit and c.activation_func is F.silu and not c.add_bias_linear
        assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-6
        assert c.hidden_dropout == 0 and c.attention_dropout == 0
        assert c.ffn_hidden_size == a.intermediate_size
    # TP-invariant padding: one checkpoint shape for every TP dividing 1024.
    assert {padded_vocab(151936, tp) for tp in (1, 2, 4, 8)} == {152576}
    assert padded_vocab(1000, 3) % 3 == 0 and padded_vocab(1000, 3) >= 1000
    # Small vocabularies (the tiny char-level models) pad to 128, still TP-invariant.
    assert {padded_vocab(102, tp) for tp in (1, 2, 4, 8)} == {128}

"""Qwen3 dense architecture: the size registry and HF `config.json` parsing/validation.

`Qwen3Arch` is the single description of a model's shape. It is built from a named size
(`tiny`, `0.6b`, ..., `32b`) or from an HF config, and turned into a Megatron
`TransformerConfig` by `models.builder`. Values follow the released HF configs (see
`reference/api_notes.md` section 3.1).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["QWEN3_SIZES", "Qwen3Arch", "arch_from_hf_config", "get_arch"]

QWEN3_VOCAB = 151936


@dataclass(frozen=True)
class Qwen3Arch:
    """Shape of a Qwen3 dense decoder. Field names follow HF `Qwen3Config`."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int = 128
    vocab_size: int = QWEN3_VOCAB
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "head_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Qwen3 config: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen3 config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def num_params(self) -> int:
        """Parameter count of the HF model (embeddings counted once when tied)."""
        h, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        per_layer = h * (q + 2 * kv) + q * h + 2 * hd + 3 * h * self.intermediate_size + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` payload that `transformers.Qwen3Config` loads."""
        d = dataclasses.asdict(self)
        d.update(
            architectures=["Qwen3ForCausalLM"],
            model_type="qwen3",
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            initializer_range=0.02,
            use_cache=True,
            use_sliding_window=False,
            rope_scaling=None,
            torch_dtype="float32",
            # Qwen3's <|endoftext|> / <|im_end|>; tiny vocabularies use their last two ids.
            bos_token_id=151643 if self.vocab_size > 151645 else self.vocab_size - 2,
            eos_token_id=151645 if self.vocab_size > 151645 else self.vocab_size - 1,
        )
        return d


# Released Qwen3 dense sizes (HF configs), plus `tiny` for tests and the CPU demo. `tiny` keeps
# the features that break conversions: GQA (4 q heads / 2 kv groups), heads*head_dim != hidden,
# q/k norm, and a vocabulary that Megatron pads at TP=2.
_DEMO = Qwen3Arch(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=384, head_dim=32, vocab_size=1000, tie_word_embeddings=True,
                  max_position_embeddings=2048)
QWEN3_SIZES: dict[str, Qwen3Arch] = {
    "tiny": Qwen3Arch(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, head_dim=32, vocab_size=1000, tie_word_embeddings=True,
                      max_position_embeddings=2048),
    # The embedded demo's policy (about 0.8M parameters with the 102-character vocabulary).
    "demo": _DEMO,
    # The CPU scaling sweep's three sizes of the demo architecture (configs/tiny_scaling.yaml):
    # about 0.20M, 0.80M and 3.2M parameters with the 102-character vocabulary; demo-m is `demo`.
    "demo-s": Qwen3Arch(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=192, head_dim=16, vocab_size=1000, tie_word_embeddings=True,
                        max_position_embeddings=2048),
    "demo-m": _DEMO,
    "demo-l": Qwen3Arch(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                        intermediate_size=768, head_dim=32, vocab_size=1000, tie_word_embeddings=True,
                        max_position_embeddings=2048),
    "0.6b": Qwen3Arch(1024, 28, 16, 8, 3072, tie_word_embeddings=True),
    "1.7b": Qwen3Arch(2048, 28, 16, 8, 6144, tie_word_embeddings=True),
    "4b": Qwen3Arch(2560, 36, 32, 8, 9728, tie_word_embeddings=True),
    "8b": Qwen3Arch(4096, 36, 32, 8, 12288),
    "14b": Qwen3Arch(5120, 40, 40, 8, 17408),
    "32b": Qwen3Arch(5120, 64, 64, 8, 25600),
}


def get_arch(name: str) -> Qwen3Arch:
    key = name.lower().removeprefix("qwen3-").replace("p", ".")
    if key not in QWEN3_SIZES:
        raise ValueError(f"model.size: unknown Qwen3 size {name!r}; choose one of {sorted(QWEN3_SIZES)}")
    return QWEN3_SIZES[key]


def _rope_theta(cfg: dict[str, Any]) -> float:
    # transformers>=5 moves rope_theta into `rope_parameters`.
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return 1_000_000.0


def arch_from_hf_config(cfg: dict[str, Any] | str | os.PathLike, source: str | None = None) -> Qwen3Arch:
    """Parse and validate an HF Qwen3 `config.json` (dict, file or model directory).

    Refuses anything this mapping would silently get wrong: another architecture, biases,
    sliding-window attention, rope scaling, a non-SiLU activation.
    """
    if not isinstance(cfg, dict):
        path = os.fspath(cfg)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no HF config at {path}")
        source = source or path
        with open(path) as f:
            cfg = json.load(f)
    where = source or "HF config"

    def bad(key: str, value: Any, want: str) -> ValueError:
        return ValueError(f"{where}: {key}={value!r} is not supported ({want})")

    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if model_type != "qwen3" or (archs and archs != ["Qwen3ForCausalLM"]):
        raise bad("architectures/model_type", (archs, model_type), "expected Qwen3ForCausalLM / qwen3 (dense)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", cfg["hidden_act"], "Qwen3 uses silu (SwiGLU)")
    if cfg.get("attention_bias", False):
        raise bad("attention_bias", True, "the Megatron mapping has no QKV bias")
    if cfg.get("use_sliding_window", False):
        raise bad("use_sliding_window", True, "sliding-window attention is not mapped")
    scaling = cfg.get("rope_scaling")
    if scaling is None:
        scaling = {k: v for k, v in (cfg.get("rope_parameters") or {}).items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") == "default":
            scaling = None
    if scaling:
        raise bad("rope_scaling", scaling, "rope scaling is not mapped")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        # HF falls back to hidden/heads; Qwen3 releases always set 128 explicitly. Without the
        # key we cannot tell which the checkpoint was trained with, so say what we assume.
        if hidden % heads:
            raise bad("head_dim", None, f"missing, and hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        head_dim = hidden // heads
    try:
        return Qwen3Arch(
            hidden_size=hidden,
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
            intermediate_size=int(cfg["intermediate_size"]),
            head_dim=int(head_dim),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=_rope_theta(cfg),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 40960)),
        )
    except KeyError as exc:
        raise ValueError(f"{where}: required key {exc.args[0]!r} is missing") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None



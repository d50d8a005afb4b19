"""Qwen3 on Megatron-core: size registry, model builder, HF <-> Megatron conversion, checkpoints."""

from .qwen3 import QWEN3_SIZES, Qwen3Arch, arch_from_hf_config, get_arch

__all__ = ["QWEN3_SIZES", "Qwen3Arch", "arch_from_hf_config", "get_arch"]

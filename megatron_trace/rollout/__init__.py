"""Rollout engines (hf on CPU/GPU, sglang on GPU) behind one protocol, and the dispatcher that
spreads a step's prompts over them. Never imports Megatron."""

from .base import (
    FINISH_REASONS,
    MEMORY_TAGS,
    RolloutEngine,
    RolloutGroup,
    Sample,
    SamplingParams,
    prompt_seed,
    sample_groups,
    sample_seed,
)
from .hf import HFEngine

__all__ = ["FINISH_REASONS", "HFEngine", "MEMORY_TAGS", "RolloutEngine", "RolloutGroup", "Sample", "SamplingParams",
           "prompt_seed", "sample_groups", "sample_seed"]

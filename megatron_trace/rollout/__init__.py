"""Rollout engines (hf on CPU/GPU, sglang on GPU) behind one protocol. Never imports Megatron."""

from .base import FINISH_REASONS, RolloutEngine, RolloutGroup, Sample, SamplingParams, sample_groups
from .hf import HFEngine

__all__ = ["FINISH_REASONS", "HFEngine", "RolloutEngine", "RolloutGroup", "Sample", "SamplingParams", "sample_groups"]

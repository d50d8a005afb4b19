"""The rollout-engine protocol and the records it produces.

An engine turns prompt token ids into sampled responses with per-token log-probs. Log-probs are
those of the *sampling distribution after temperature and before top-k/top-p*,
log softmax(logits / temperature), which is what SGLang returns; with temperature 0 (greedy) they
are log softmax(logits). The trainer recomputes the same quantity with the actor to measure the
train/rollout mismatch.

`generate` returns a flat list of `len(prompts) * params.n` samples, prompt-major: the n samples
of prompt 0, then those of prompt 1, and so on.

Seeds. `generate(..., seeds=[s_0, ...])` gives every prompt its own seed (the dispatcher derives it
from (run seed, step, prompt uid) with `prompt_seed`); sample j of prompt i then draws from
`sample_seed(s_i, j)`. A prompt's samples therefore do not depend on which engine serves it or on
what else is in its batch. Without `seeds`, `params.seed` seeds the whole call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

__all__ = ["FINISH_REASONS", "MEMORY_TAGS", "RolloutEngine", "RolloutGroup", "Sample", "SamplingParams", "prompt_seed", "rollout_stats", "sample_groups",
           "sample_seed"]

FINISH_REASONS = ("stop", "length", "abort")
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # SGLang's release/resume tags


_SEED_MOD = 2**31 - 1  # SGLang's sampling_seed and torch generators both accept it


def _mix(*parts: int) -> int:
    """A stable 31-bit hash of integers (splitmix64 steps; no dependence on PYTHONHASHSEED)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x % _SEED_MOD


def prompt_seed(seed: int, step: int, uid: int) -> int:
    """The sampling seed of one prompt: a function of (run seed, step, prompt uid) only."""
    return _mix(seed, step, uid)


def sample_seed(prompt_seed_: int, j: int) -> int:
    """The seed of sample j of a prompt whose seed is `prompt_seed_`."""
    return _mix(prompt_seed_, j, 0x5A)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings: the response ends with the token completing one
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS ids; the stop token is kept
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"sampling.n and sampling.max_new_tokens must be >= 1, got {self.n}, {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k == 0 or self.top_k < -1:
            raise ValueError(
                f"sampling: temperature >= 0, 0 < top_p <= 1 and top_k = -1 or >= 1 are required, got "
                f"{self.temperature}, {self.top_p}, {self.top_k}"
            )


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]  # [L] response tokens, the stop token included
    logprobs: list[float]  # [L] log-prob of each token under the sampling distribution
    finish_reason: str  # stop | length | abort
    weight_version: int


@runtime_checkable
class RolloutEngine(Protocol):
    weight_version: int

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Sample]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        """Load HF-named tensors; returns how many were loaded. `version` (if given) is set after."""
        ...

    def finish_sync(self, version: int) -> None:
        """Called once after the last bucket of a sync: flush caches, record the version."""
        ...

    # Optional: `begin_sync()`, called before the first bucket (remote servers abort what they still
    # run), and `update_weights_per_rank(named_handles)` (colocated SGLang at TP > 1, see
    # `sync/weights.py`).

    def sleep(self, tags: Sequence[str] | None = None) -> None:
        """Release memory for training. tags: a subset of MEMORY_TAGS; None = all of them.
        An asleep engine refuses `generate` with an error that says so."""
        ...

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Restore what `sleep` released (the loop wakes "weights" before a sync and "kv_cache" after)."""
        ...

    def shutdown(self) -> None: ...


@dataclass
class RolloutGroup:
    """The n samples of one prompt (a GRPO group)."""

    prompt_index: int
    prompt_ids: list[int]
    samples: list[Sample]
    meta: dict = field(default_factory=dict)  # problem, answer, ... carried for reward/annotation

    @property
    def num_truncated(self) -> int:
        return sum(s.finish_reason == "length" for s in self.samples)


def sample_groups(engine: RolloutEngine, prompts: Sequence[Sequence[int]], params: SamplingParams,
                  metas: Sequence[dict] | None = None) -> tuple[list[RolloutGroup], dict[str, float]]:
    """Sample `params.n` responses per prompt; returns the groups and truncation statistics."""
    samples = engine.generate(prompts, params)
    if len(samples) != len(prompts) * params.n:
        raise RuntimeError(f"engine returned {len(samples)} samples for {len(prompts)} prompts x n={params.n}")
    groups = [
        RolloutGroup(i, list(p), samples[i * params.n:(i + 1) * params.n], dict(metas[i]) if metas else {})
        for i, p in enumerate(prompts)
    ]
    return groups, rollout_stats(samples)


def rollout_stats(samples: Sequence[Sample]) -> dict[str, float]:
    """Truncated and aborted fractions and the mean response length of a step's samples."""
    total = max(len(samples), 1)
    return {
        "rollout/truncated_frac": sum(s.finish_reason == "length" for s in samples) / total,
        "rollout/aborted_frac": sum(s.finish_reason == "abort" for s in samples) / total,
        "rollout/response_len_mean": sum(len(s.token_ids) for s in samples) / total,
    }

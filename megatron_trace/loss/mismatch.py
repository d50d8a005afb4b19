"""Train/rollout log-prob mismatch and truncated importance sampling (TIS).

The engine samples with its own kernels (and, with SGLang, bf16 weights), so its log-probs of
the sampled tokens differ slightly from the actor's recomputation of the same tokens. We report
that gap every step and can correct the GRPO term for it: with the actor's old log-probs
`actor_lp` (pi_old as the trainer computes it) and the engine's `engine_lp` (the policy that
actually sampled), each token's GRPO loss is multiplied by min(exp(actor_lp - engine_lp), cap),
detached (truncated importance sampling).
"""

from __future__ import annotations

import torch

__all__ = ["rollout_mismatch", "tis_weights"]


def rollout_mismatch(actor_lp: torch.Tensor, engine_lp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-batch sums for mean |diff|, the max |diff| and a k3 KL(engine || actor) estimate.

    Returns sums and a count so that callers can reduce across ranks exactly (see loss.Stats).
    """
    d = (actor_lp.double() - engine_lp.double())
    k3 = torch.exp(d) - d - 1.0  # KL(engine || actor) estimator on samples from the engine
    return {"abs_sum": d.abs().sum(), "max_abs": d.abs().max() if d.numel() else d.new_zeros(()),
            "k3_sum": k3.sum(), "count": torch.tensor(float(d.numel()), dtype=torch.float64)}


def tis_weights(actor_lp: torch.Tensor, engine_lp: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """min(pi_actor / pi_engine, cap) per token, detached."""
    if cap <= 0:
        raise ValueError(f"loss.tis_cap must be positive, got {cap}")
    return torch.exp((actor_lp.double() - engine_lp.double()).clamp(max=50.0)).clamp(max=cap).detach()

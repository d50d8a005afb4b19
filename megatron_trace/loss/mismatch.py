"""Train/rollout log-prob mismatch and truncated importance sampling (TIS).

The engine samples with its own kernels (and, with SGLang, bf16 weights), so its log-probs of
the sampled tokens differ slightly from the actor's recomputation of the same tokens. We report
that gap every step and can correct the loss for it: with the actor's old log-probs `actor_lp`
(pi_old as the trainer computes it) and the engine's `engine_lp` (the policy that actually
sampled), each token's GRPO term and, on routed tokens, its KL term are multiplied by a
detached importance weight built from rho = exp(actor_lp - engine_lp) (`loss.tis_mode`):
  truncate   min(rho, C)                               (truncated importance sampling)
  mask       rho where 1/C <= rho <= C, else 0         (the token is dropped: IcePop's band)
  sequence   min(exp(mean of log rho over the rollout), C), the same for all its tokens
             (the geometric mean of the rollout's ratios)
C is `loss.tis_cap`. With asynchronous rollouts the behaviour policy is older than pi_old, and
the weight corrects every term for that too.
"""

from __future__ import annotations

import torch

__all__ = ["TIS_MODES", "rollout_mismatch", "tis_weights"]

TIS_MODES = ("truncate", "mask", "sequence")


def rollout_mismatch(actor_lp: torch.Tensor, engine_lp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-batch sums for mean |diff|, the max |diff| and a k3 KL(engine || actor) estimate.

    Returns sums and a count so that callers can reduce across ranks exactly (see loss.Stats).
    """
    d = (actor_lp.double() - engine_lp.double())
    k3 = torch.exp(d) - d - 1.0  # KL(engine || actor) estimator on samples from the engine
    return {"abs_sum": d.abs().sum(), "max_abs": d.abs().max() if d.numel() else d.new_zeros(()),
            "k3_sum": k3.sum(), "count": torch.tensor(float(d.numel()), dtype=torch.float64)}


def tis_weights(actor_lp: torch.Tensor, engine_lp: torch.Tensor, cap: float = 2.0, mode: str = "truncate",
                seq_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token importance weights pi_actor / pi_engine under `mode` (module doc), detached, float64.

    seq_ids: `[T]` the rollout of each token, for mode "sequence" (tokens of a rollout are
    averaged together; rollouts are never split across calls)."""
    if cap <= 0:
        raise ValueError(f"loss.tis_cap must be positive, got {cap}")
    if mode not in TIS_MODES:
        raise ValueError(f"loss.tis_mode must be one of {TIS_MODES}, got {mode!r}")
    log_rho = (actor_lp.double() - engine_lp.double()).detach()
    if mode == "truncate":
        return torch.exp(log_rho.clamp(max=50.0)).clamp(max=cap)
    if mode == "mask":
        rho = torch.exp(log_rho.clamp(-50.0, 50.0))
        return torch.where((rho >= 1.0 / cap) & (rho <= cap), rho, torch.zeros_like(rho))
    if seq_ids is None:
        raise ValueError("loss.tis_mode=sequence needs each token's rollout (seq_ids)")
    seq_ids = seq_ids.to(log_rho.device)
    n = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
    total = torch.zeros(n, dtype=log_rho.dtype, device=log_rho.device).index_add_(0, seq_ids, log_rho)
    count = torch.zeros(n, dtype=log_rho.dtype, device=log_rho.device).index_add_(0, seq_ids, torch.ones_like(log_rho))
    return torch.exp((total / count.clamp(min=1)).clamp(max=50.0)).clamp(max=cap)[seq_ids]

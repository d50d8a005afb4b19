"""Independent float64 references for the loss: full vocabulary, plain autograd, no chunking."""

from __future__ import annotations

import torch


def _safe(x: torch.Tensor) -> torch.Tensor:
    """-inf -> 0, so that 0 * log 0 terms have finite (zero) values and gradients."""
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


def logprob_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """logits [T, V] (real vocabulary only). Returns (logprob [T], entropy [T])."""
    logq = torch.log_softmax(logits.double() / temperature, dim=-1)
    q = logq.exp()
    lp = logq.gather(1, targets[:, None])[:, 0]
    ent = -(q * _safe(logq)).sum(-1)
    return lp, ent


def divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float = 1.0,
               entry_clip: float | None = None, mode: str = "upper"):
    """Full-vocabulary KL per token; each entry term clipped from above (`upper`) or to
    [-clip, clip] (`abs`) when entry_clip is set. `grad` mode: see `divergence_grad_clipped`."""
    logq = torch.log_softmax(student.double() / temperature, dim=-1)
    logp = torch.log_softmax(teacher.double().detach() / temperature, dim=-1)
    if kind == "forward":
        terms = logp.exp() * (_safe(logp) - _safe(logq))
    else:
        terms = logq.exp() * (_safe(logq) - _safe(logp))
    if entry_clip is not None and mode == "upper":
        terms = torch.clamp(terms, max=entry_clip)
    elif entry_clip is not None and mode == "abs":
        terms = torch.clamp(terms, -entry_clip, entry_clip)
    return terms.sum(-1)


def divergence_grad_clipped(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float,
                            entry_clip: float, upstream: torch.Tensor):
    """`grad` mode by definition: the unclipped value, and the gradient of sum_t upstream_t D_t
    w.r.t. the student logits with each entry of dD_t/dz (z = logits / temperature) clamped to
    [-clip, clip] before the upstream weight. Returns (value [T], grad [T, V], clipped counts [T],
    the largest unclipped |dD/dz| entry: the scale of fp32 rounding in the clipped gradient)."""
    z = (student.double() / temperature).detach().requires_grad_()
    value = divergence(z, teacher.double() / temperature, kind)
    dz = torch.autograd.grad(value.sum(), z)[0]  # rows are independent: row t is dD_t/dz_t
    counts = (dz.abs() > entry_clip).sum(-1).double()
    grad = dz.clamp(-entry_clip, entry_clip) * upstream[:, None] / temperature
    return value.detach(), grad, counts, dz.abs().max().item() if dz.numel() else 0.0

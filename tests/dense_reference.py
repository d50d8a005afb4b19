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
               entry_clip: float | None = None):
    """Full-vocabulary KL per token; each entry term clipped from above when entry_clip is set."""
    logq = torch.log_softmax(student.double() / temperature, dim=-1)
    logp = torch.log_softmax(teacher.double().detach() / temperature, dim=-1)
    if kind == "forward":
        terms = logp.exp() * (_safe(logp) - _safe(logq))
    else:
        terms = logq.exp() * (_safe(logq) - _safe(logp))
    if entry_clip is not None:
        terms = torch.clamp(terms, max=entry_clip)
    return terms.sum(-1)

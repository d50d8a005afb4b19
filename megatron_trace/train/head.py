"""What the step's passes read from the LM head, with or without `loss.fused_head`.

A pass's forward returns, at the positions it reads, either the vocab-parallel logits
`[T, V/tp]` (the output layer ran on those rows: span-sparse head) or, with the fused head, the
final hidden states `[T, H]` (the output layer was bypassed; `model_pass.py`). `Head` turns
either into the per-token values the step needs: log-probs, entropies, the teacher's top-1
token and the token it supports beyond the student (the key-token lift), the leakage KL and the
routed loss. In fused mode each call goes through
`loss/fused_head.py` with the model's output-weight shard, so no `[T, V/tp]` tensor is formed.
"""

from __future__ import annotations

import torch

from ..loss import (
    GlobalCounts,
    LossConfig,
    LossInputs,
    Stats,
    routed_loss,
    token_argmax,
    token_argmax_prob_gap,
    token_divergence,
    token_logprob_and_entropy,
)
from ..loss.fused_head import auto_chunk_tokens, fused_head
from ..loss.routed import routed_loss_fused
from ..parallel import ParallelGroups

__all__ = ["Head"]


def _rows(x: torch.Tensor, weight: torch.Tensor | None, a: int, chunk: int) -> torch.Tensor:
    """Rows a..a+chunk of `x` as logits: as they are (weight None), or hidden states @ weight^T."""
    return x[a:a + chunk] if weight is None else x[a:a + chunk] @ weight.t()


class Head:
    """Per-token reads of a pass's output `out` (logits, or hidden states with `weight`)."""

    def __init__(self, groups: ParallelGroups, cfg: LossConfig, vocab_size: int, *, sequence_parallel: bool = False):
        self.groups, self.cfg, self.vocab = groups, cfg, vocab_size
        self.fused = cfg.fused_head
        self.sp = sequence_parallel

    def logprob_entropy(self, out: torch.Tensor, weight: torch.Tensor | None,
                        targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log softmax(./T)[target] and the entropy at each row (no gradient wanted)."""
        targets = targets.to(out.device)
        if self.fused:
            r = fused_head(out, weight, targets, self.groups.tp, self.cfg.temperature, vocab_size=self.vocab,
                           chunk_tokens=self.cfg.head_chunk_tokens)
            return r.logprob, r.entropy
        return token_logprob_and_entropy(out, targets, self.groups.tp, self.cfg.temperature, vocab_size=self.vocab,
                                         chunk_size=self.cfg.chunk_size)

    def logprobs(self, out: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        return self.logprob_entropy(out, weight, targets)[0]

    def _chunk(self, weight: torch.Tensor) -> int:
        """Rows of hidden states turned into logits at once (`loss.head_chunk_tokens`, or auto)."""
        return self.cfg.head_chunk_tokens or auto_chunk_tokens(weight.shape[0])

    def argmax(self, out: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """The most likely token id at each row (padding columns excluded). `out`: logits, or
        hidden states when `weight` is given (chunk by chunk, whatever `loss.fused_head`)."""
        if weight is None:
            return token_argmax(out, self.groups.tp, vocab_size=self.vocab)
        chunk = self._chunk(weight)
        return torch.cat([token_argmax(_rows(out, weight, a, chunk), self.groups.tp, vocab_size=self.vocab)
                          for a in range(0, out.shape[0], chunk)]) if out.shape[0] else out.new_zeros(0, dtype=torch.long)

    def underallocated(self, student: torch.Tensor, s_weight: torch.Tensor | None, teacher: torch.Tensor,
                       t_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher-supported token the student under-allocates at each row, v* = argmax_v
        p_teacher(v) - p_student(v), and that gap (`token_argmax_prob_gap`, at `loss.temperature`).

        student, teacher: rows aligned, each logits `[T, V/tp]` (weight None) or final hidden
        states `[T, H]` with its output weight. Hidden states become logits chunk by chunk
        (`head_chunk_tokens` rows at a time), so no `[T, V/tp]` tensor is formed for them."""
        kw = dict(temperature=self.cfg.temperature, vocab_size=self.vocab, chunk_size=self.cfg.chunk_size)
        n = student.shape[0]
        if s_weight is None and t_weight is None:
            return token_argmax_prob_gap(student, teacher, self.groups.tp, **kw)
        chunk = self._chunk(s_weight if s_weight is not None else t_weight)
        parts = [token_argmax_prob_gap(_rows(student, s_weight, a, chunk), _rows(teacher, t_weight, a, chunk),
                                       self.groups.tp, **kw) for a in range(0, n, chunk)]
        if not parts:
            return student.new_zeros(0, dtype=torch.long), student.new_zeros(0, dtype=torch.float32)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def forward_kl(self, student: torch.Tensor, s_weight: torch.Tensor | None, teacher: torch.Tensor,
                   t_weight: torch.Tensor | None) -> torch.Tensor:
        """KL(teacher || student) per row, unclipped (the leakage probe; no gradient)."""
        if not self.fused:
            return token_divergence(student, teacher, "forward", self.groups.tp, self.cfg.temperature, None,
                                    vocab_size=self.vocab)
        rows = torch.arange(student.shape[0], device=student.device)
        r = fused_head(student, s_weight, torch.zeros_like(rows), self.groups.tp, self.cfg.temperature,
                       vocab_size=self.vocab, kl_index=rows, teacher_hidden=teacher, teacher_weight=t_weight,
                       kinds=("forward",), chunk_tokens=self.cfg.head_chunk_tokens)
        return r.fkl

    def loss(self, out: torch.Tensor, weight: torch.Tensor | None, teacher: torch.Tensor | None,
             t_weight: torch.Tensor | None, batch: LossInputs, counts: GlobalCounts,
             lam: float) -> tuple[torch.Tensor, Stats]:
        """The routed loss of one micro-batch (`loss/routed.py`)."""
        if self.fused:
            # Under sequence parallelism the hidden states came through a gather whose backward
            # reduce-scatters their gradient: the fused head must not all-reduce it first.
            return routed_loss_fused(out, weight, teacher, t_weight, batch, counts, self.cfg, lam, self.groups.tp,
                                     self.vocab, reduce_hidden_grad=not self.sp)
        return routed_loss(out, teacher, batch, counts, self.cfg, lam, self.groups.tp, self.vocab)

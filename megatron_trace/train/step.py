"""One TRACE update on Megatron: old log-probs, the teacher pass, the routed loss, the optimizer.

All three passes go through Megatron's `get_forward_backward_func` (so PP works unchanged):
  1. old log-probs   forward only, the actor on [prompt + response]
  2. teacher         forward only, no grad, the same module (live teacher) on [privileged prompt +
                     response], only for micro-batches with routed tokens. The LM head runs only
                     at routed positions: a pre-hook on the output layer selects those hidden
                     states first (span-sparse head), so the [hidden x V/tp] matmul costs R rows.
  3. train           forward + backward with the routed loss on the last stage, then the step.
Micro-batches hold whole rollouts, right-padded; logits at the positions that predict response
tokens are gathered into a packed `[T, V/tp]` block for the loss. The loss is normalised by
global counts (all DP ranks), so Megatron is told to sum (see train/setup.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..loss import GlobalCounts, LossConfig, LossInputs, Stats, routed_loss, token_logprob_and_entropy
from ..models.builder import unwrap_model
from ..models.forward import forward_logits
from ..parallel import ParallelGroups
from ..parallel.schedule import run_schedule
from ..types import TrainSample

__all__ = ["MicroBatch", "StepResult", "make_micro_batches", "train_step"]


@dataclass
class MicroBatch:
    samples: list[TrainSample]
    ids: torch.Tensor  # [b, s] prompt + response, right-padded
    rows: torch.Tensor  # [T] batch row of each response token
    cols: torch.Tensor  # [T] position whose logits predict it
    teacher_ids: torch.Tensor | None  # [b_t, s_t] privileged sequences of samples with routes
    teacher_rows: torch.Tensor | None  # [R]
    teacher_cols: torch.Tensor | None  # [R]


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    s = max(len(x) for x in seqs)
    out = torch.zeros(len(seqs), s, dtype=torch.long)
    for i, x in enumerate(seqs):
        out[i, : len(x)] = torch.tensor(x)
    return out


def make_micro_batches(samples: list[TrainSample], micro_batch_size: int) -> list[MicroBatch]:
    out = []
    for start in range(0, len(samples), micro_batch_size):
        chunk = samples[start:start + micro_batch_size]
        rows, cols, t_seqs, t_rows, t_cols = [], [], [], [], []
        for r, s in enumerate(chunk):
            p, n = len(s.prompt_ids), len(s.response_ids)
            rows += [r] * n
            cols += list(range(p - 1, p - 1 + n))
            if any(s.routes):
                tr = len(t_seqs)
                t_seqs.append(s.teacher_ids)
                for i in s.routed_positions:
                    t_rows.append(tr)
                    t_cols.append(s.teacher_prompt_len - 1 + i)
        out.append(MicroBatch(
            chunk, _pad([s.prompt_ids + s.response_ids for s in chunk]), torch.tensor(rows), torch.tensor(cols),
            _pad(t_seqs) if t_seqs else None, torch.tensor(t_rows) if t_seqs else None,
            torch.tensor(t_cols) if t_seqs else None))
    return out


@contextlib.contextmanager
def _span_sparse_head(model, rows: torch.Tensor, cols: torch.Tensor):
    """Make the output layer see only hidden states at (row, col): logits come out [1, R, V/tp]."""
    inner = unwrap_model(model)
    head = getattr(inner, "output_layer", None)
    if head is None or not getattr(inner, "post_process", False):
        yield
        return

    def pre_hook(_module, args, kwargs):
        hidden = args[0]  # [s, b, h]
        picked = hidden[cols.to(hidden.device), rows.to(hidden.device)].unsqueeze(1)  # [R, 1, h]
        return (picked, *args[1:]), kwargs

    handle = head.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class StepResult:
    metrics: dict[str, float]
    skipped: bool


def _global_counts(samples: list[TrainSample], groups: ParallelGroups) -> GlobalCounts:
    t = torch.tensor([sum(len(s.response_ids) for s in samples), len(samples)], dtype=torch.float64,
                     device=groups.device)
    if groups.dp_size > 1:
        dist.all_reduce(t, group=groups.dp)
    return GlobalCounts(int(t[0].item()), int(t[1].item()))


def _grads_finite(ddp, groups: ParallelGroups) -> bool:
    bad = torch.zeros(1, device=groups.device)
    for p in ddp.parameters():
        g = getattr(p, "main_grad", None)
        if g is not None and not torch.isfinite(g).all():
            bad += 1
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def train_step(ddp, optimizer, groups: ParallelGroups, samples: list[TrainSample], loss_cfg: LossConfig, lam: float,
               *, micro_batch_size: int = 4, vocab_size: int, teacher=None) -> StepResult:
    """One optimizer step over `samples` (this DP rank's share of the step's rollouts).

    teacher: the module for the teacher pass (default: `ddp` itself, the live teacher).
    """
    mbs = make_micro_batches(samples, micro_batch_size)
    counts = _global_counts(samples, groups)
    use_teacher = lam > 0 and any(mb.teacher_ids is not None for mb in mbs)

    # 1. old log-probs (pi_old = the actor before this update)
    with torch.no_grad():
        old = []
        for mb in mbs:
            logits = forward_logits(ddp, groups, mb.ids)
            if logits is None:
                old.append(None)
                continue
            lp, _ = token_logprob_and_entropy(logits[mb.rows, mb.cols], mb.ids[mb.rows, mb.cols + 1].to(logits.device),
                                              groups.tp, loss_cfg.temperature, vocab_size=vocab_size)
            old.append(lp)

    # 2. teacher logits at routed positions only
    teacher_logits: list[torch.Tensor | None] = [None] * len(mbs)
    if use_teacher:
        t_model = teacher if teacher is not None else ddp
        with torch.no_grad():
            for i, mb in enumerate(mbs):
                if mb.teacher_ids is None:
                    continue
                with _span_sparse_head(t_model, mb.teacher_rows, mb.teacher_cols):
                    out = forward_logits(t_model, groups, mb.teacher_ids)
                teacher_logits[i] = None if out is None else out[0]  # [R, V/tp]

    # 3. forward/backward with the routed loss on the last stage
    ddp.train()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    stats = Stats()
    queue = list(range(len(mbs)))

    def step(data_iter, m):
        i = next(data_iter)
        mb = mbs[i]
        ids = mb.ids.to(groups.device)
        pos = torch.arange(ids.shape[1], device=groups.device).unsqueeze(0).expand_as(ids)
        logits = m(ids, pos, None)

        def loss_func(out):
            seq_ids = mb.rows
            batch = LossInputs(
                targets=ids[mb.rows, mb.cols + 1], old_logprobs=old[i].detach(),
                advantages=torch.tensor([mb.samples[r].advantage for r in mb.rows.tolist()], dtype=torch.float64),
                routes=torch.tensor([x for s in mb.samples for x in s.routes], dtype=torch.int8),
                seq_ids=seq_ids, seq_lens=torch.tensor([len(s.response_ids) for s in mb.samples]))
            loss, st = routed_loss(out[mb.rows, mb.cols], teacher_logits[i] if lam > 0 else None, batch, counts,
                                   loss_cfg, lam, groups.tp, vocab_size)
            stats.merge(st)
            # num_tokens = 0: the loss is already globally normalised; Megatron must not divide.
            return loss, torch.zeros((), dtype=torch.int, device=loss.device), {"loss": loss.detach()}

        return logits, loss_func

    # One schedule call for all micro-batches: grads are finalised (DP and tied-embedding
    # all-reduces) exactly once. Shapes may differ: the config sets variable_seq_lengths.
    run_schedule(groups, ddp, step, iter(queue), num_microbatches=len(mbs),
                 seq_length=max(mb.ids.shape[1] for mb in mbs), micro_batch_size=micro_batch_size)
    finite = _grads_finite(ddp, groups)
    if finite:
        ok, grad_norm, _ = optimizer.step()
        skipped = not ok or not math.isfinite(grad_norm)
    else:
        grad_norm, skipped = float("nan"), True
    if groups.is_last_stage:
        metrics = stats.reduce(groups.dp, device=groups.device)
    else:
        metrics = {}
    metrics.update({"optim/grad_norm": float(grad_norm), "optim/skipped": float(skipped),
                    "train/num_tokens": float(counts.num_tokens), "train/num_rollouts": float(counts.num_seqs)})
    return StepResult(metrics, skipped)

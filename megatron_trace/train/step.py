"""One TRACE update on Megatron: old log-probs, the teacher pass, the routed loss, the optimizer.

All three passes go through Megatron's `get_forward_backward_func` (so PP works unchanged):
  1. old log-probs   forward only, the actor on [prompt + response]
  2. teacher         forward only, no grad, the same module (live teacher) on [privileged prompt +
                     response], only for micro-batches with routed tokens. The LM head runs only
                     at routed positions: a pre-hook on the output layer selects those hidden
                     states first (span-sparse head), so the [hidden x V/tp] matmul costs R rows.
  3. train           per PPO mini-batch: forward + backward with the routed loss on the last
                     stage, then one optimizer step (`mini_batches` updates per rollout batch).
  4. key-token lift  (lambda > 0) a forward-only pass after the update on rollouts with key spans.
Micro-batches hold whole rollouts, right-padded; logits at the positions that predict response
tokens are gathered into a packed `[T, V/tp]` block for the loss. The loss is normalised by
global counts of its mini-batch (all DP ranks), so Megatron is told to sum (see train/setup.py).

Diagnostics computed on the way, at little cost: the train/rollout log-prob mismatch (old
log-probs vs the engine's), truncated importance weights (`tis_cap`), and the leakage proxy
(teacher-student forward KL, no grad, at a few off-span positions of each routed rollout, from
the old-log-prob and teacher passes that run anyway).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..loss import (
    GlobalCounts,
    LossConfig,
    LossInputs,
    Route,
    Stats,
    routed_loss,
    token_divergence,
    token_logprob_and_entropy,
)
from ..loss.mismatch import rollout_mismatch, tis_weights
from ..models.builder import unwrap_model
from ..models.forward import forward_logits
from ..parallel import ParallelGroups
from ..parallel.schedule import run_schedule
from ..types import TrainSample

__all__ = ["MicroBatch", "StepResult", "make_micro_batches", "probe_positions", "set_lr", "split_mini_batches",
           "train_step"]


@dataclass
class MicroBatch:
    samples: list[TrainSample]
    ids: torch.Tensor  # [b, s] prompt + response, right-padded
    rows: torch.Tensor  # [T] batch row of each response token
    cols: torch.Tensor  # [T] position whose logits predict it
    teacher_ids: torch.Tensor | None  # [b_t, s_t] privileged sequences of samples with routes
    teacher_rows: torch.Tensor | None  # [R + Q] routed positions, then Q leakage-probe positions
    teacher_cols: torch.Tensor | None  # [R + Q]
    probe_idx: torch.Tensor  # [Q] indices into the packed [T] tokens of the probe positions

    @property
    def num_routed(self) -> int:
        return sum(1 for s in self.samples for r in s.routes if r)


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    s = max(len(x) for x in seqs)
    out = torch.zeros(len(seqs), s, dtype=torch.long)
    for i, x in enumerate(seqs):
        out[i, : len(x)] = torch.tensor(x)
    return out


def probe_positions(sample: TrainSample, k: int) -> list[int]:
    """Up to k off-span response positions, evenly spaced (deterministic, layout-independent)."""
    off = [i for i, r in enumerate(sample.routes) if not r]
    if k <= 0 or not off:
        return []
    step = max(len(off) / k, 1.0)
    return sorted({off[int(j * step)] for j in range(min(k, len(off)))})


def make_micro_batches(samples: list[TrainSample], micro_batch_size: int, probe_tokens: int = 0) -> list[MicroBatch]:
    out = []
    for start in range(0, len(samples), micro_batch_size):
        chunk = samples[start:start + micro_batch_size]
        rows, cols, t_seqs, t_rows, t_cols, q_rows, q_cols, q_idx = [], [], [], [], [], [], [], []
        for r, s in enumerate(chunk):
            p, n = len(s.prompt_ids), len(s.response_ids)
            offset = len(rows)
            rows += [r] * n
            cols += list(range(p - 1, p - 1 + n))
            if any(s.routes):
                tr = len(t_seqs)
                t_seqs.append(s.teacher_ids)
                for i in s.routed_positions:
                    t_rows.append(tr)
                    t_cols.append(s.teacher_prompt_len - 1 + i)
                for i in probe_positions(s, probe_tokens):
                    q_rows.append(tr)
                    q_cols.append(s.teacher_prompt_len - 1 + i)
                    q_idx.append(offset + i)
        out.append(MicroBatch(
            chunk, _pad([s.prompt_ids + s.response_ids for s in chunk]), torch.tensor(rows), torch.tensor(cols),
            _pad(t_seqs) if t_seqs else None, torch.tensor(t_rows + q_rows) if t_seqs else None,
            torch.tensor(t_cols + q_cols) if t_seqs else None, torch.tensor(q_idx, dtype=torch.long)))
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


def _response_logprobs(model, groups: ParallelGroups, mb: MicroBatch, temperature: float, vocab_size: int):
    """Forward only, the LM head at response positions: (log-probs `[T]`, logits `[T, V/tp]`) on
    the last stage, None elsewhere."""
    with _span_sparse_head(model, mb.rows, mb.cols):
        logits = forward_logits(model, groups, mb.ids)
    if logits is None:
        return None
    packed = logits[0]  # [T, V/tp]
    lp, _ = token_logprob_and_entropy(packed, mb.ids[mb.rows, mb.cols + 1].to(packed.device), groups.tp,
                                      temperature, vocab_size=vocab_size)
    return lp, packed


@dataclass
class StepResult:
    metrics: dict[str, float]
    skipped: bool  # True if any mini-batch update was skipped
    # record_teacher: per rollout uid, the teacher's log-prob of each routed token and its entropy
    # there (vocab-reduced, so identical under any TP); filled on the last PP stage only.
    teacher_outputs: dict[int, dict[str, list[float]]] = field(default_factory=dict)


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


def split_mini_batches(samples: list[TrainSample], mini_batches: int, dp_size: int) -> list[list[TrainSample]]:
    """Contiguous global mini-batches (independent of the layout); each needs >= dp_size rollouts."""
    n = len(samples)
    if mini_batches < 1 or n < mini_batches * dp_size:
        raise ValueError(f"optim.mini_batches={mini_batches} with {n} rollouts and data-parallel size {dp_size}: "
                         f"every mini-batch needs at least {dp_size} rollout(s)")
    bounds = [round(i * n / mini_batches) for i in range(mini_batches + 1)]
    return [samples[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def _packed(mb: MicroBatch, field: str) -> list:
    return [x for s in mb.samples for x in getattr(s, field)]


def train_step(ddp, optimizer, groups: ParallelGroups, samples: list[TrainSample], loss_cfg: LossConfig, lam: float,
               *, micro_batch_size: int = 4, vocab_size: int, teacher=None, mini_batches: int = 1,
               tis_cap: float | None = None, lr: float | None = None, probe_tokens: int = 4,
               key_token_lift: int = 4, record_teacher: bool = False) -> StepResult:
    """`mini_batches` optimizer updates over the step's rollouts (the global list, same on every rank).

    Each DP rank trains on its share (every dp_size-th rollout) of each mini-batch. teacher: the
    module for the teacher pass (default: `ddp` itself, the live teacher). lr: set before the
    updates (the LR schedule lives in the loop). key_token_lift: how many rollouts with key spans
    (the first ones in global order, so the number is layout-independent) to re-score after the
    update for the key-token lift; 0 = off.
    """
    timers: dict[str, float] = {}
    t0 = time.perf_counter()
    minis = [m[groups.dp_rank::groups.dp_size] for m in split_mini_batches(samples, mini_batches, groups.dp_size)]
    mbs_per_mini = [make_micro_batches(m, micro_batch_size, probe_tokens if lam > 0 else 0) for m in minis]
    mbs = [mb for group in mbs_per_mini for mb in group]
    # Decided on the global list so that every DP rank declares the same metric names.
    use_teacher = lam > 0 and any(any(s.routes) for s in samples)
    have_engine_lp = all(s.rollout_logprobs is not None for s in samples)
    lift_uids = {s.uid for s in samples if Route.FKL in s.routes}
    lift_uids = set(sorted(lift_uids, key=[s.uid for s in samples].index)[:key_token_lift]) if lam > 0 else set()
    do_lift = bool(lift_uids)
    # While lambda > 0 these columns always exist (NaN when a step has no spans), for plots.
    pre = Stats()  # diagnostics from the forward-only passes (last stage only)
    if have_engine_lp:
        pre.mean_of("mismatch/logprob_abs_diff", 0.0, 0.0)
        pre.mean_of("mismatch/k3_kl", 0.0, 0.0)
        pre.max("mismatch/logprob_abs_diff_max", 0.0)
    if lam > 0:
        pre.mean_of("teacher/leakage_kl_offspan", 0.0, 0.0)
        if key_token_lift:
            pre.mean_of("kl/key_token_lift", 0.0, 0.0)

    # 1. old log-probs (pi_old = the actor before this step's updates), the mismatch and TIS weights
    old: list[torch.Tensor | None] = []
    is_w: list[torch.Tensor | None] = []
    probe_student: list[torch.Tensor | None] = []
    with torch.no_grad():
        for mb in mbs:
            out = _response_logprobs(ddp, groups, mb, loss_cfg.temperature, vocab_size)
            if out is None:
                old.append(None)
                is_w.append(None)
                probe_student.append(None)
                continue
            lp, packed = out
            old.append(lp)
            probe_student.append(packed[mb.probe_idx.to(packed.device)] if use_teacher else None)
            engine_lp = None
            if have_engine_lp:
                engine_lp = torch.tensor(_packed(mb, "rollout_logprobs"), dtype=torch.float64, device=lp.device)
                mm = rollout_mismatch(lp, engine_lp)
                pre.mean_of("mismatch/logprob_abs_diff", mm["abs_sum"], mm["count"])
                pre.mean_of("mismatch/k3_kl", mm["k3_sum"], mm["count"])
                pre.max("mismatch/logprob_abs_diff_max", mm["max_abs"])
            if tis_cap is not None and engine_lp is None:
                raise ValueError("loss.tis_cap is set but the rollouts carry no engine log-probs")
            is_w.append(tis_weights(lp, engine_lp, tis_cap) if tis_cap is not None else None)
    timers["time/old_logprobs"] = time.perf_counter() - t0

    # 2. teacher logits at routed positions (+ the leakage probes) only
    t1 = time.perf_counter()
    teacher_logits: list[torch.Tensor | None] = [None] * len(mbs)
    teacher_outputs: dict[int, dict[str, list[float]]] = {}
    if use_teacher:
        t_model = teacher if teacher is not None else ddp
        with torch.no_grad():
            for i, mb in enumerate(mbs):
                if mb.teacher_ids is None:
                    continue
                with _span_sparse_head(t_model, mb.teacher_rows, mb.teacher_cols):
                    out = forward_logits(t_model, groups, mb.teacher_ids)
                if out is None:
                    continue
                out = out[0]  # [R + Q, V/tp]
                r = mb.num_routed
                teacher_logits[i] = out[:r]
                if record_teacher:
                    _record_teacher(teacher_outputs, mb, out[:r], groups, loss_cfg.temperature, vocab_size)
                if mb.probe_idx.numel():
                    leak = token_divergence(probe_student[i], out[r:], "forward", groups.tp, loss_cfg.temperature,
                                            None, vocab_size=vocab_size)
                    pre.mean("teacher/leakage_kl_offspan", leak)
    timers["time/teacher"] = time.perf_counter() - t1 if use_teacher else 0.0

    # 3. one optimizer update per mini-batch, forward/backward with the routed loss on the last stage
    if lr is not None:
        set_lr(optimizer, lr)
    stats, norms, skipped, first = Stats(), [], 0, 0
    t_fb = t_opt = 0.0
    for group in mbs_per_mini:
        ids_of = list(range(first, first + len(group)))
        first += len(group)
        counts = _global_counts([s for mb in group for s in mb.samples], groups)
        t2 = time.perf_counter()
        ddp.train()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()

        def step(data_iter, m, counts=counts):
            i = next(data_iter)
            mb = mbs[i]
            ids = mb.ids.to(groups.device)
            pos = torch.arange(ids.shape[1], device=groups.device).unsqueeze(0).expand_as(ids)
            logits = m(ids, pos, None)

            def loss_func(out):
                batch = LossInputs(
                    targets=ids[mb.rows, mb.cols + 1], old_logprobs=old[i].detach(),
                    advantages=torch.tensor([mb.samples[r].advantage for r in mb.rows.tolist()], dtype=torch.float64),
                    routes=torch.tensor(_packed(mb, "routes"), dtype=torch.int8),
                    seq_ids=mb.rows, seq_lens=torch.tensor([len(s.response_ids) for s in mb.samples]),
                    is_weights=is_w[i])
                loss, st = routed_loss(out[mb.rows, mb.cols], teacher_logits[i] if lam > 0 else None, batch, counts,
                                       loss_cfg, lam, groups.tp, vocab_size)
                stats.merge(st)
                # num_tokens = 0: the loss is already globally normalised; Megatron must not divide.
                return loss, torch.zeros((), dtype=torch.int, device=loss.device), {"loss": loss.detach()}

            return logits, loss_func

        # One schedule call per mini-batch: grads are finalised (DP and tied-embedding
        # all-reduces) exactly once per update. Shapes may differ: the config sets variable_seq_lengths.
        run_schedule(groups, ddp, step, iter(ids_of), num_microbatches=len(group),
                     seq_length=max(mb.ids.shape[1] for mb in group), micro_batch_size=micro_batch_size)
        t3 = time.perf_counter()
        if _grads_finite(ddp, groups):
            ok, grad_norm, _ = optimizer.step()
            bad = not ok or not math.isfinite(grad_norm)
        else:
            grad_norm, bad = float("nan"), True
        skipped += bad
        if not bad:
            norms.append(float(grad_norm))
        t_fb += t3 - t2
        t_opt += time.perf_counter() - t3
    timers.update({"time/fwd_bwd": t_fb, "time/optimizer": t_opt})

    # 4. key-token lift: mean change of log p on FKL-routed (key-span) tokens across this step
    t4 = time.perf_counter()
    if do_lift:
        old_of = {}  # uid -> its old log-probs (last stage)
        for i, mb in enumerate(mbs):
            if old[i] is not None:
                k = 0
                for s in mb.samples:
                    old_of[s.uid] = old[i][k:k + len(s.response_ids)]
                    k += len(s.response_ids)
        mine = [s for group in minis for s in group if s.uid in lift_uids]
        with torch.no_grad():
            for mb in make_micro_batches(mine, micro_batch_size):
                out = _response_logprobs(ddp, groups, mb, loss_cfg.temperature, vocab_size)
                if out is None:
                    continue
                lp = out[0]
                before = torch.cat([old_of[s.uid] for s in mb.samples])
                key = (torch.tensor(_packed(mb, "routes")) == Route.FKL).to(lp.device)
                pre.mean("kl/key_token_lift", (lp - before)[key])
    timers["time/key_token_lift"] = time.perf_counter() - t4 if do_lift else 0.0

    metrics = stats.merge(pre).reduce(groups.dp, device=groups.device) if groups.is_last_stage else {}
    metrics.update({"optim/grad_norm": sum(norms) / len(norms) if norms else float("nan"),
                    "optim/skipped": float(skipped), "optim/updates": float(len(minis) - skipped),
                    "train/num_tokens": float(sum(len(s.response_ids) for s in samples)),
                    "train/num_rollouts": float(len(samples)), **timers})
    if lr is not None:
        metrics["optim/lr"] = lr
    return StepResult(metrics, skipped > 0, teacher_outputs)


def _record_teacher(out: dict, mb: MicroBatch, logits: torch.Tensor, groups: ParallelGroups, temperature: float,
                    vocab_size: int) -> None:
    targets = torch.tensor([s.response_ids[i] for s in mb.samples for i in s.routed_positions], device=logits.device)
    lp, ent = token_logprob_and_entropy(logits, targets, groups.tp, temperature, vocab_size=vocab_size)
    k = 0
    for s in mb.samples:
        n = len(s.routed_positions)
        if n:
            out[s.uid] = {"logprob": lp[k:k + n].tolist(), "entropy": ent[k:k + n].tolist()}
            k += n

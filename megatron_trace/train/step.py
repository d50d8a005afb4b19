"""One TRACE update on Megatron: old log-probs, the teacher, the routed-loss updates, the lift.

    old        forward only: pi_old on the rollouts of PPO mini-batches 2.. (the first
               mini-batch's own forward gives its old log-probs: before any update the policy
               *is* pi_old, so with one mini-batch this pass does not run)
    update     per PPO mini-batch, in chunks of micro-batches:
      teacher    forward only, no grad, on [privileged prompt + response] of the chunk's routed
                 rollouts, right before the chunk (its logits are never held for a whole step)
      fwd/bwd    the routed loss; gradients accumulate over chunks; one optimizer step at the end
    lift       key-token lift (any lambda, any variant), on the few rollouts that carry
               `key_positions`: before the old pass, the teacher's top-1 token at each key
               position, the token it supports most beyond the actor (argmax of p_teacher -
               p_actor) and the actor's log-probs; after the updates, the actor's again

Every pass goes through Megatron's `get_forward_backward_func` (PP works unchanged), and the LM
head runs only at the positions a pass reads (`model_pass.py`). What a pass reads there, logits
or (with `loss.fused_head`) final hidden states and the output weight, becomes per-token values
in `head.py`; no pass then holds `[T, V/tp]` logits. Micro-batches: `micro.py`; the key-token
lift's passes: `lift.py`.

Layout (`train/batching.py`): each mini-batch is split over DP ranks by a length-balanced
partition; each rank cuts its share into micro-batches of `micro_batch_size` rollouts or, with
`max_tokens_per_micro_batch`, under a token budget (the teacher pass counts the privileged
sequences); with `pack_sequences` the rollouts of a micro-batch share one row. Pass outputs are
kept per rollout, so every pass has its own micro-batches. The loss is normalised by global
counts of its mini-batch, so Megatron is told to sum (see train/setup.py) and no layout choice
changes the loss or the gradients.

Diagnostics computed on the way, at little cost: the train/rollout log-prob mismatch (old
log-probs vs the engine's), truncated importance weights (`tis_cap`), and the leakage proxy
(teacher-student forward KL, no grad, at a few off-span positions of each routed rollout, with
the student's logits of the update forward).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..loss import GlobalCounts, LossConfig, LossInputs, Stats
from ..loss.mismatch import rollout_mismatch, tis_weights
from ..models.builder import unwrap_model
from ..parallel import ParallelGroups
from ..parallel.schedule import run_schedule
from ..types import TrainSample
from .batching import partition_dp
from .head import Head
from .lift import lift_after, lift_before
from .micro import (
    Batching,
    MicroBatch,
    batching_of,
    make_micro_batches,
    probe_positions,
    seq_len,
    teacher_batch,
)
from .model_pass import forward_micro_batch, head_weight, run_forward

__all__ = ["Batching", "MicroBatch", "StepResult", "make_micro_batches", "probe_positions", "set_lr",
           "split_mini_batches", "train_step"]


@dataclass
class StepResult:
    metrics: dict[str, float]
    skipped: bool  # True if any mini-batch update was skipped
    # record_teacher: per rollout uid, the teacher's log-prob of each routed token and its entropy
    # there (vocab-reduced, so identical under any TP); filled on the last PP stage only.
    teacher_outputs: dict[int, dict[str, list[float]]] = field(default_factory=dict)


def _global_counts(samples: list[TrainSample], groups: ParallelGroups) -> GlobalCounts:
    """Counts of this rank's share, summed over DP (for callers that hold only their share)."""
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


class _Step:
    """The state one step's passes share: pass outputs are kept per rollout uid (last stage)."""

    def __init__(self, groups: ParallelGroups, loss_cfg: LossConfig, lam: float, vocab_size: int,
                 batching: Batching, tis_cap: float | None, probe_tokens: int, *, teacher=None,
                 teacher_tokens: int = 0, record: dict | None = None, tis_mode: str = "truncate"):
        self.groups, self.cfg, self.lam, self.vocab, self.b = groups, loss_cfg, lam, vocab_size, batching
        self.head = Head(groups, loss_cfg, vocab_size, sequence_parallel=batching.multiple > 1)
        self.tis_cap, self.tis_mode, self.probe_tokens = tis_cap, tis_mode, probe_tokens
        self.teacher = teacher  # the teacher module; None = no teacher pass this step
        self.teacher_tokens = teacher_tokens  # teacher positions held at once (0 = a whole mini-batch's)
        self.record = record  # record_teacher: uid -> the teacher's log-probs and entropies at routed tokens
        self.old: dict[int, torch.Tensor] = {}  # uid -> old log-probs [n]
        # The teacher's output at routed and probe positions: logits [R, V/tp], or with the fused
        # head its final hidden states [R, H] and its output weight `t_weight` (the actor's own
        # tensor for the live teacher)
        self.t_routed: dict[int, torch.Tensor] = {}  # uid -> at routed positions
        self.t_probe: dict[int, torch.Tensor] = {}  # uid -> at probe positions
        self.t_weight: torch.Tensor | None = None
        self.lift_top1: dict[int, torch.Tensor] = {}  # uid -> the teacher's top-1 token at key positions
        # uid -> the token the teacher supports most beyond the actor there, argmax p_T - p_S
        self.lift_under: dict[int, torch.Tensor] = {}
        self.lift_before: dict[int, tuple] = {}  # uid -> the actor's (sampled, top-1, under) log-probs there
        self.pre = Stats()  # diagnostics of the passes (last stage only)
        self.layout = Stats()  # padding and micro-batch counts (every rank)

    def note_layout(self, mbs: list[MicroBatch]) -> None:
        """Padding share and micro-batch count of the update passes (summed over DP)."""
        total = sum(mb.lay.num_tokens for mb in mbs)
        self.layout.mean_of("layout/padding_frac", total - sum(sum(mb.lay.lengths) for mb in mbs), total)
        self.layout.sum("layout/micro_batches", len(mbs))

    @property
    def fused(self) -> bool:
        return self.head.fused

    def weight(self, model) -> torch.Tensor | None:
        """The output weight the fused head needs with `model`'s hidden states (None: logits)."""
        return head_weight(model) if self.fused else None

    def logprobs(self, out: torch.Tensor, weight: torch.Tensor | None, mb: MicroBatch,
                 targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.head.logprobs(out, weight, mb.targets if targets is None else targets)

    def record_old(self, mb: MicroBatch, lp: torch.Tensor) -> None:
        """Keep pi_old's log-probs of `mb`'s rollouts; the mismatch diagnostics on the way."""
        k = 0
        for s in mb.samples:
            n = len(s.response_ids)
            self.old[s.uid] = lp[k:k + n]
            k += n
        engine = self.engine_logprobs(mb, lp.device)
        if engine is not None:
            mm = rollout_mismatch(lp, engine)
            self.pre.mean_of("mismatch/logprob_abs_diff", mm["abs_sum"], mm["count"])
            self.pre.mean_of("mismatch/k3_kl", mm["k3_sum"], mm["count"])
            self.pre.max("mismatch/logprob_abs_diff_max", mm["max_abs"])

    @staticmethod
    def engine_logprobs(mb: MicroBatch, device) -> torch.Tensor | None:
        if any(s.rollout_logprobs is None for s in mb.samples):
            return None
        return torch.tensor([x for s in mb.samples for x in s.rollout_logprobs], dtype=torch.float64, device=device)

    def old_of(self, mb: MicroBatch) -> torch.Tensor:
        return torch.cat([self.old[s.uid] for s in mb.samples])

    def is_weights(self, mb: MicroBatch, old: torch.Tensor) -> torch.Tensor | None:
        if self.tis_cap is None:
            return None
        seq_ids = torch.repeat_interleave(torch.arange(len(mb.samples)),
                                          torch.tensor([len(s.response_ids) for s in mb.samples]))
        return tis_weights(old, self.engine_logprobs(mb, old.device), self.tis_cap, self.tis_mode, seq_ids)

    def leakage(self, mb: MicroBatch, out: torch.Tensor, weight: torch.Tensor | None) -> None:
        """Teacher-student forward KL (no grad) at the off-span probe positions of `mb`'s rollouts."""
        k = 0
        for s in mb.samples:
            if s.uid in self.t_probe:
                probes = torch.tensor(probe_positions(s, self.probe_tokens), dtype=torch.long, device=out.device)
                leak = self.head.forward_kl(out[k + probes], weight, self.t_probe[s.uid], self.t_weight)
                self.pre.mean("teacher/leakage_kl_offspan", leak)
            k += len(s.response_ids)

    def teacher_of(self, mb: MicroBatch) -> torch.Tensor | None:
        parts = [self.t_routed[s.uid] for s in mb.samples if s.uid in self.t_routed]
        return torch.cat(parts) if parts else None


def _teacher_positions(s: TrainSample, probe_tokens: int) -> int:
    return len(s.routed_positions) + len(probe_positions(s, probe_tokens)) if any(s.routes) else 0


def _teacher_pass(st: _Step, samples: list[TrainSample]) -> None:
    """The teacher's logits (fused head: hidden states) at the routed and probe positions of the
    `samples` that have routes."""
    routed = [s for s in samples if any(s.routes)]
    plan = st.b.plan([len(s.teacher_ids) for s in routed])
    mbs = [teacher_batch([routed[i] for i in idx], st.b, st.probe_tokens) for idx in plan]

    def keep(mb: MicroBatch, out: torch.Tensor) -> None:
        st.t_weight = st.weight(st.teacher)
        r = sum(len(s.routed_positions) for s in mb.samples)
        if st.record is not None:
            _record_teacher(st.record, mb, out[:r], st)
        k, q = 0, r
        for s in mb.samples:
            n, m = len(s.routed_positions), len(probe_positions(s, st.probe_tokens))
            st.t_routed[s.uid] = out[k:k + n]
            if m:
                st.t_probe[s.uid] = out[q:q + m]
            k, q = k + n, q + m

    run_forward(st.teacher, st.groups, mbs, st.b, keep, st.fused)


def _old_logprob_pass(st: _Step, ddp, samples: list[TrainSample]) -> None:
    """pi_old on rollouts whose mini-batch is not the first (the actor before this step's updates)."""
    mbs = make_micro_batches(samples, st.b.micro_batch_size, batching=st.b)
    run_forward(ddp, st.groups, mbs, st.b, lambda mb, out: st.record_old(mb, st.logprobs(out, st.weight(ddp), mb)),
                st.fused)


def _chunks(mbs: list[MicroBatch], st: _Step) -> list[list[int]]:
    """Consecutive micro-batches whose teacher positions fit `st.teacher_tokens` (>= 1 each)."""
    if st.teacher is None or st.teacher_tokens <= 0:
        return [list(range(len(mbs)))]
    out: list[list[int]] = []
    held = 0
    for i, mb in enumerate(mbs):
        n = sum(_teacher_positions(s, st.probe_tokens) for s in mb.samples)
        if out and held + n <= st.teacher_tokens:
            out[-1].append(i)
            held += n
        else:
            out.append([i])
            held = n
    return out


@contextlib.contextmanager
def _finalize_grads(ddp, now: bool):
    """A schedule call that is not the update's last leaves its grads unreduced (no DP all-reduce)."""
    config = unwrap_model(ddp).config
    keep = config.finalize_model_grads_func
    if not now:
        config.finalize_model_grads_func = None
    try:
        yield
    finally:
        config.finalize_model_grads_func = keep


def _update(st: _Step, ddp, optimizer, mine: list[TrainSample], counts: GlobalCounts, on_policy: bool,
            stats: Stats, timers: dict[str, float]) -> tuple[float, bool]:
    """One optimizer update on this rank's share of a mini-batch. Returns (grad norm, skipped).

    on_policy: no update has run this step yet, so the forward's own (detached) log-probs are
    pi_old's. The teacher's logits (hidden states) are computed right before the micro-batches that read them,
    in chunks of at most `teacher_tokens` positions (the update's schedule calls accumulate
    gradients; only the last finalises them), so they are never all held at once. With the live
    teacher that is the actor as it is when its logits are used (its weights move only at the
    optimizer step after the last chunk).
    """
    groups, lam = st.groups, st.lam
    mbs = make_micro_batches(mine, st.b.micro_batch_size, batching=st.b)
    st.note_layout(mbs)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()

    def step(data_iter, m):
        mb = mbs[next(data_iter)]
        out = forward_micro_batch(m, groups, mb, st.b, st.fused)

        def loss_func(out):
            x = out[0]  # [T, V/tp] logits, or [T, H] hidden states with the fused head
            w = st.weight(m)
            with torch.no_grad():
                if on_policy:
                    st.record_old(mb, st.logprobs(x.detach(), w, mb))
                st.leakage(mb, x.detach(), w)
            old = st.old_of(mb)
            seq_lens = torch.tensor([len(s.response_ids) for s in mb.samples])
            seq_ids = torch.repeat_interleave(torch.arange(len(mb.samples)), seq_lens)
            batch = LossInputs(
                targets=mb.targets, old_logprobs=old.detach(),
                advantages=torch.tensor([s.advantage for s in mb.samples], dtype=torch.float64)[seq_ids],
                routes=torch.tensor([r for s in mb.samples for r in s.routes], dtype=torch.int8),
                seq_ids=seq_ids, seq_lens=seq_lens, is_weights=st.is_weights(mb, old))
            loss, s = st.head.loss(x, w, st.teacher_of(mb) if lam > 0 else None, st.t_weight, batch, counts, lam)
            stats.merge(s)
            # num_tokens = 0: the loss is already globally normalised; Megatron must not divide.
            return loss, torch.zeros((), dtype=torch.int, device=loss.device), {"loss": loss.detach()}

        return out, loss_func

    chunks = _chunks(mbs, st)
    for c, chunk in enumerate(chunks):
        if st.teacher is not None:
            t0 = time.perf_counter()
            _teacher_pass(st, [s for i in chunk for s in mbs[i].samples])
            timers["time/teacher"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        ddp.train()
        # Shapes may differ between micro-batches: the config sets variable_seq_lengths.
        with _finalize_grads(ddp, c == len(chunks) - 1):
            run_schedule(groups, ddp, step, iter(chunk), num_microbatches=len(chunk),
                         seq_length=max(mbs[i].ids.shape[1] for i in chunk),
                         micro_batch_size=max(mbs[i].ids.shape[0] for i in chunk))
        timers["time/fwd_bwd"] += time.perf_counter() - t0
        st.t_routed.clear()
        st.t_probe.clear()
    t1 = time.perf_counter()
    try:
        if not _grads_finite(ddp, groups):
            return float("nan"), True
        ok, grad_norm, _ = optimizer.step()
        return float(grad_norm), not ok or not math.isfinite(grad_norm)
    finally:
        timers["time/optimizer"] += time.perf_counter() - t1


def _imbalance(costs: list[list[int]], shares: list[list[list[int]]], dp: int) -> float:
    """The busiest DP rank's cost over the mean (1.0 = perfectly even), over the whole step."""
    loads = [sum(c[i] for c, sh in zip(costs, shares) for i in sh[r]) for r in range(dp)]
    return max(loads) * dp / sum(loads) if sum(loads) else 1.0


def _dp_costs(minis: list[list[TrainSample]], use_teacher: bool, separate_old: bool) -> list[list[int]]:
    """Forward-token cost of each rollout in this step: 3x its sequence for the update (forward +
    backward), 1x for the old-log-prob pass when it runs, its privileged sequence for the teacher."""
    out = []
    for k, mini in enumerate(minis):
        old = 1 if (separate_old or k > 0) else 0
        out.append([(3 + old) * seq_len(s) + (len(s.teacher_ids) if use_teacher and any(s.routes) else 0)
                    for s in mini])
    return out


def train_step(ddp, optimizer, groups: ParallelGroups, samples: list[TrainSample], loss_cfg: LossConfig, lam: float,
               *, micro_batch_size: int = 4, vocab_size: int, teacher=None, mini_batches: int = 1,
               tis_cap: float | None = None, tis_mode: str = "truncate", lr: float | None = None,
               probe_tokens: int = 4,
               key_token_lift: int = 4, record_teacher: bool = False, max_tokens_per_micro_batch: int = 0,
               pack_sequences: bool = False, teacher_tokens: int = 0, separate_old_pass: bool = False) -> StepResult:
    """`mini_batches` optimizer updates over the step's rollouts (the global list, same on every rank).

    teacher: the module for the teacher pass (default: `ddp` itself, the live teacher). lr: set
    before the updates (the LR schedule lives in the loop). key_token_lift: how many rollouts with
    `key_positions` (the first ones in global order, so the number is layout-independent) to
    measure the key-token lift on, whatever lambda and the variant; 0 = off. Its teacher is the
    step's teacher while lambda > 0, else the actor itself (with the privileged prompt). Its
    metrics (`lift.py`): the mean change across the updates of the actor's log-prob at the key
    positions of the teacher's top-1 token (`lift/key_teacher`), of the token the teacher
    supports most beyond the actor, argmax_v p_teacher(v) - p_actor(v) before the updates
    (`lift/key_underallocated`), and of the sampled token (`lift/key_sampled`); before the
    updates, the mean of that largest gap (`lift/underallocated_gap`) and the share of positions
    where the top-1 is the sampled token (`lift/teacher_agrees_with_sample`).
    teacher_tokens: teacher positions (routed + probes) whose logits are
    held at once (0 = a whole mini-batch's). separate_old_pass: compute pi_old for the first
    mini-batch in its own pass too (as before the update provided it; for comparisons).
    """
    # Decided on the global list so that every DP rank declares the same metric names.
    use_teacher = lam > 0 and any(any(s.routes) for s in samples)
    teacher_outputs: dict[int, dict[str, list[float]]] = {}
    st = _Step(groups, loss_cfg, lam, vocab_size,
               batching_of(ddp, groups, micro_batch_size, max_tokens_per_micro_batch, pack_sequences), tis_cap,
               probe_tokens if lam > 0 else 0, teacher=(teacher if teacher is not None else ddp) if use_teacher else None,
               teacher_tokens=teacher_tokens, record=teacher_outputs if record_teacher else None, tis_mode=tis_mode)
    minis = split_mini_batches(samples, mini_batches, groups.dp_size)
    have_engine_lp = all(s.rollout_logprobs is not None for s in samples)
    if tis_cap is not None and not have_engine_lp:
        raise ValueError("loss.tis_cap is set but the rollouts carry no engine log-probs")
    costs = _dp_costs(minis, use_teacher, separate_old_pass)
    shares = [partition_dp(c, groups.dp_size) for c in costs]
    mine = [[mini[i] for i in share[groups.dp_rank]] for mini, share in zip(minis, shares)]
    lift = set([s.uid for s in samples if s.key_positions][:key_token_lift])
    # While lambda > 0 these columns always exist (NaN when a step has no spans), for plots.
    if have_engine_lp:
        st.pre.mean_of("mismatch/logprob_abs_diff", 0.0, 0.0)
        st.pre.mean_of("mismatch/k3_kl", 0.0, 0.0)
        st.pre.max("mismatch/logprob_abs_diff_max", 0.0)
    if lam > 0:
        st.pre.mean_of("teacher/leakage_kl_offspan", 0.0, 0.0)
    if lift:
        for k in ("lift/key_sampled", "lift/key_teacher", "lift/key_underallocated", "lift/underallocated_gap",
                  "lift/teacher_agrees_with_sample"):
            st.pre.mean_of(k, 0.0, 0.0)

    t0 = time.perf_counter()
    lifted = [s for m in mine for s in m if s.uid in lift]
    if lifted:
        lift_before(st, ddp, (teacher if teacher is not None else ddp) if lam > 0 else ddp, lifted)
    t_lift = time.perf_counter() - t0
    t0 = time.perf_counter()
    later = [s for m in (mine if separate_old_pass else mine[1:]) for s in m]
    _old_logprob_pass(st, ddp, later)
    timers = {"time/old_logprobs": time.perf_counter() - t0 if later else 0.0, "time/teacher": 0.0,
              "time/fwd_bwd": 0.0, "time/optimizer": 0.0}

    if lr is not None:
        set_lr(optimizer, lr)
    stats, norms, skipped = Stats(), [], 0
    for k, (mini, share) in enumerate(zip(minis, mine)):
        counts = GlobalCounts(sum(len(s.response_ids) for s in mini), len(mini))
        norm, bad = _update(st, ddp, optimizer, share, counts, k == 0 and not separate_old_pass, stats, timers)
        skipped += bad
        if not bad:
            norms.append(norm)
    t4 = time.perf_counter()
    if lifted:
        lift_after(st, ddp, lifted)
    timers["time/key_token_lift"] = t_lift + time.perf_counter() - t4 if lift else 0.0
    stats.merge(st.pre).merge(st.layout)
    metrics = stats.reduce(groups.dp, device=groups.device) if groups.is_last_stage else {}
    metrics["layout/dp_imbalance"] = _imbalance(costs, shares, groups.dp_size)
    metrics.update({"optim/grad_norm": sum(norms) / len(norms) if norms else float("nan"),
                    "optim/skipped": float(skipped), "optim/updates": float(len(minis) - skipped),
                    "train/num_tokens": float(sum(len(s.response_ids) for s in samples)),
                    "train/num_rollouts": float(len(samples)), **timers})
    if lr is not None:
        metrics["optim/lr"] = lr
    return StepResult(metrics, skipped > 0, teacher_outputs)


def _record_teacher(out: dict, mb: MicroBatch, t_out: torch.Tensor, st: _Step) -> None:
    r = t_out.shape[0]
    lp, ent = st.head.logprob_entropy(t_out, st.t_weight, mb.targets[:r])
    k = 0
    for s in mb.samples:
        n = len(s.routed_positions)
        if n:
            out[s.uid] = {"logprob": lp[k:k + n].tolist(), "entropy": ent[k:k + n].tolist()}
            k += n

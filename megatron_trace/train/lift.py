"""The key-token lift: on the few rollouts that carry `key_positions`, before the updates, the
teacher's top-1 token at each key position and the token it supports most beyond the actor,
v* = argmax_v p_teacher(v) - p_actor(v) (the paper's "teacher-supported token the student
under-allocates"), then the actor's log-probs of both and of the sampled token before and after
the updates. Forward-only passes, logits or fused head alike. `st` is the step's shared state
(`step._Step`: its batching, head, the teacher's tokens and the "before" log-probs).

Memory: the teacher pass bypasses the output layer whatever `loss.fused_head` and keeps the
teacher's final hidden states at the key positions, `[K, H]` (K: the lifted rollouts' key
positions on this rank), and a reference to its output weight; the actor's "before" read forms
the teacher's logits for one micro-batch's rows at a time (in `Head.underallocated`'s chunks),
takes v* vocab-parallel, and the hidden states are dropped when it ends. No `[K, V/tp]` teacher
logits are kept across passes.
"""

from __future__ import annotations

import torch

from ..types import TrainSample
from .micro import MicroBatch, key_batch, seq_len
from .model_pass import head_weight, run_forward

__all__ = ["lift_after", "lift_before"]


def _per_rollout(mb: MicroBatch, values: torch.Tensor, into: dict) -> None:
    k = 0
    for s in mb.samples:
        into[s.uid] = values[k:k + len(s.key_positions)]
        k += len(s.key_positions)


def _lift_read(st, ddp, samples: list[TrainSample], into: dict, teacher: tuple | None = None) -> None:
    """The actor's log-probs at the key positions of `samples`: of the sampled token, of the
    teacher's top-1 token (`st.lift_top1`) and of the under-allocated token (`st.lift_under`), per
    rollout uid into `into`. teacher (the "before" read): (uid -> the teacher's hidden states at
    the key positions, its output weight), from which v* is taken first, against this read's
    output, into `st.lift_under`."""
    mbs = [key_batch([samples[i] for i in idx], st.b, teacher=False) for idx in st.b.plan([seq_len(s) for s in samples])]

    def read(mb: MicroBatch, out: torch.Tensor) -> None:
        w = st.weight(ddp)
        if teacher is not None:
            t_hidden, t_weight = teacher
            ids, gap = st.head.underallocated(out, w, torch.cat([t_hidden[s.uid] for s in mb.samples]), t_weight)
            st.pre.mean("lift/underallocated_gap", gap.double())
            _per_rollout(mb, ids, st.lift_under)
        top = torch.cat([st.lift_top1[s.uid] for s in mb.samples]).to(out.device)
        under = torch.cat([st.lift_under[s.uid] for s in mb.samples]).to(out.device)
        lps = [st.logprobs(out, w, mb, targets=t) for t in (None, top, under)]
        k = 0
        for s in mb.samples:
            n = len(s.key_positions)
            into[s.uid] = tuple(lp[k:k + n] for lp in lps)
            k += n

    run_forward(ddp, st.groups, mbs, st.b, read, st.fused)


def lift_before(st, ddp, teacher, samples: list[TrainSample]) -> None:
    """Key-token lift, before the updates: the teacher's most likely token at each key position
    (its privileged view: the paper's teacher-supported token) and how often it is the sampled
    one; then the actor's log-probs, with the under-allocated token v* taken on the way (the
    teacher's softmax there against the actor's, both before the updates). `teacher` may be the
    actor itself (the live teacher): its weight is read only here, before any update."""
    mbs = [key_batch([samples[i] for i in idx], st.b, teacher=True)
           for idx in st.b.plan([len(s.teacher_ids) for s in samples])]
    t_hidden: dict = {}  # uid -> the teacher's final hidden states at the key positions [k, H]
    t_weight: list = []  # the teacher's output weight (last stage)

    def top1(mb: MicroBatch, out: torch.Tensor) -> None:
        # out: hidden states [K, H] (the output layer is bypassed, fused head or not)
        w = head_weight(teacher)
        t_weight[:] = [w]
        ids = st.head.argmax(out, w)
        # the teacher batch's targets at key positions are the sampled tokens
        st.pre.mean("lift/teacher_agrees_with_sample", (ids == mb.targets.to(ids.device)).double())
        _per_rollout(mb, ids, st.lift_top1)
        _per_rollout(mb, out, t_hidden)

    run_forward(teacher, st.groups, mbs, st.b, top1, fused=True)
    _lift_read(st, ddp, samples, st.lift_before, (t_hidden, t_weight[0] if t_weight else None))


def lift_after(st, ddp, samples: list[TrainSample]) -> None:
    """Key-token lift, after the updates: the mean change of the actor's log-prob at key
    positions, of the teacher's top-1 token (`lift/key_teacher`), of the under-allocated token
    v* (`lift/key_underallocated`) and of the sampled token (`lift/key_sampled`)."""
    after: dict = {}
    _lift_read(st, ddp, samples, after)
    for uid, (sampled, teacher, under) in after.items():
        s0, t0, u0 = st.lift_before[uid]
        st.pre.mean("lift/key_sampled", sampled - s0.to(sampled.device))
        st.pre.mean("lift/key_teacher", teacher - t0.to(teacher.device))
        st.pre.mean("lift/key_underallocated", under - u0.to(under.device))


"""The key-token lift: on the few rollouts that carry `key_positions`, the
teacher's top-1 token at each key position before the updates, and the actor's log-probs of it
and of the sampled token before and after them. Forward-only passes, logits or fused head alike.
`st` is the step's shared state (`step._Step`: its batching, head, teacher top-1 tokens and the
"before" log-probs).
"""

from __future__ import annotations

import torch

from ..types import TrainSample
from .micro import MicroBatch, key_batch, seq_len
from .model_pass import run_forward

__all__ = ["lift_after", "lift_before"]


def _lift_read(st, ddp, samples: list[TrainSample], into: dict) -> None:
    """The actor's log-probs at the key positions of `samples`: of the sampled token and of the
    teacher's top-1 token (`st.lift_top1`), per rollout uid into `into`."""
    mbs = [key_batch([samples[i] for i in idx], st.b, teacher=False) for idx in st.b.plan([seq_len(s) for s in samples])]

    def read(mb: MicroBatch, out: torch.Tensor) -> None:
        top = torch.cat([st.lift_top1[s.uid] for s in mb.samples]).to(out.device)
        w = st.weight(ddp)
        sampled, teacher = st.logprobs(out, w, mb), st.logprobs(out, w, mb, targets=top)
        k = 0
        for s in mb.samples:
            n = len(s.key_positions)
            into[s.uid] = (sampled[k:k + n], teacher[k:k + n])
            k += n

    run_forward(ddp, st.groups, mbs, st.b, read, st.fused)


def lift_before(st, ddp, teacher, samples: list[TrainSample]) -> None:
    """Key-token lift, before the updates: the teacher's most likely token at each key position
    (its privileged view: the paper's teacher-supported token) and how often it is the sampled
    one, then the actor's log-probs."""
    mbs = [key_batch([samples[i] for i in idx], st.b, teacher=True)
           for idx in st.b.plan([len(s.teacher_ids) for s in samples])]

    def top1(mb: MicroBatch, out: torch.Tensor) -> None:
        ids = st.head.argmax(out, st.weight(teacher))
        # the teacher batch's targets at key positions are the sampled tokens
        st.pre.mean("lift/teacher_agrees_with_sample", (ids == mb.targets.to(ids.device)).double())
        k = 0
        for s in mb.samples:
            st.lift_top1[s.uid] = ids[k:k + len(s.key_positions)]
            k += len(s.key_positions)

    run_forward(teacher, st.groups, mbs, st.b, top1, st.fused)
    _lift_read(st, ddp, samples, st.lift_before)


def lift_after(st, ddp, samples: list[TrainSample]) -> None:
    """Key-token lift, after the updates: the mean change of the actor's log-prob at key
    positions, of the teacher's top-1 token (`lift/key_teacher`) and of the sampled token
    (`lift/key_sampled`)."""
    after: dict = {}
    _lift_read(st, ddp, samples, after)
    for uid, (sampled, teacher) in after.items():
        s0, t0 = st.lift_before[uid]
        st.pre.mean("lift/key_sampled", sampled - s0.to(sampled.device))
        st.pre.mean("lift/key_teacher", teacher - t0.to(teacher.device))


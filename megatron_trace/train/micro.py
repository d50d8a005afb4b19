"""How a pass's rollouts become micro-batches, and which positions of them each pass reads.

Layout (`train/batching.py`): each rank cuts its share into micro-batches of `micro_batch_size`
rollouts or, with `max_tokens_per_micro_batch`, under a token budget; with `pack_sequences` the
rollouts of a micro-batch share one row. A `MicroBatch` names the (row, column) of every
position a pass reads and the token each predicts:
  student    every response position (old log-probs, the update, SFT)
  teacher    the routed positions of each rollout in its privileged sequence, then its
             leakage-probe positions
  key        the key positions of a lift rollout (teacher's or student's sequence)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.builder import unwrap_model
from ..parallel import ParallelGroups
from ..types import TrainSample
from .batching import Layout, lay_out, plan_micro_batches

__all__ = ["Batching", "MicroBatch", "batching_of", "key_batch", "make_micro_batches", "probe_positions", "seq_len",
           "student_batch", "teacher_batch"]


@dataclass(frozen=True)
class Batching:
    """How rollouts become micro-batches (see train/batching.py)."""

    micro_batch_size: int = 4  # rollouts per micro-batch when max_tokens == 0
    max_tokens: int = 0  # token budget per micro-batch; 0 = micro_batch_size whole rollouts
    pack: bool = False  # several rollouts per row (block-diagonal attention / THD)
    multiple: int = 1  # rows padded to a multiple of this (TP under sequence parallelism)
    thd: bool = False  # packed rows through TransformerEngine's THD path (set from the model)

    def plan(self, lengths: list[int]) -> list[list[int]]:
        return plan_micro_batches(lengths, count=self.micro_batch_size, budget=self.max_tokens, packed=self.pack)


@dataclass
class MicroBatch:
    """Rollouts laid out for one forward, and the positions whose logits the pass reads."""

    samples: list[TrainSample]
    lay: Layout
    rows: torch.Tensor  # [T] row of each position read
    cols: torch.Tensor  # [T] column of each position read (it predicts the next token)
    targets: torch.Tensor  # [T] the token each position predicts

    @property
    def ids(self) -> torch.Tensor:
        return self.lay.ids


def probe_positions(sample: TrainSample, k: int) -> list[int]:
    """Up to k off-span response positions, evenly spaced (deterministic, layout-independent)."""
    off = [i for i, r in enumerate(sample.routes) if not r]
    if k <= 0 or not off:
        return []
    step = max(len(off) / k, 1.0)
    return sorted({off[int(j * step)] for j in range(min(k, len(off)))})



def _reader_batch(samples: list[TrainSample], seqs: list[list[int]], prompt_lens: list[int],
                  rounds: list[list[list[int]]], b: Batching) -> MicroBatch:
    """`seqs` laid out as one micro-batch that reads, round after round, the response positions
    `rounds[k][j]` of sequence j (a response position i is predicted at prompt_len - 1 + i)."""
    lay = lay_out(seqs, packed=b.pack, multiple=b.multiple)
    rows, cols = [], []
    for picks in rounds:
        for (r, c), p, idx in zip(lay.where, prompt_lens, picks):
            rows += [r] * len(idx)
            cols += [c + p - 1 + i for i in idx]
    rows, cols = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    return MicroBatch(samples, lay, rows, cols, lay.ids[rows, cols + 1])


def _sequences(samples: list[TrainSample], teacher: bool) -> tuple[list[list[int]], list[int]]:
    """The sequences a pass reads (the privileged teacher inputs, or prompt + response) and their
    prompt lengths."""
    if teacher:
        return [s.teacher_ids for s in samples], [s.teacher_prompt_len for s in samples]
    return [s.prompt_ids + s.response_ids for s in samples], [len(s.prompt_ids) for s in samples]


def student_batch(samples: list[TrainSample], b: Batching) -> MicroBatch:
    """Reads every response position: T = the rollouts' response tokens, in sample order."""
    return _reader_batch(samples, *_sequences(samples, False), [[range(len(s.response_ids)) for s in samples]], b)


def teacher_batch(samples: list[TrainSample], b: Batching, probe_tokens: int) -> MicroBatch:
    """Reads the routed positions of every rollout, then its leakage-probe positions."""
    return _reader_batch(samples, *_sequences(samples, True),
                         [[s.routed_positions for s in samples], [probe_positions(s, probe_tokens) for s in samples]], b)


def key_batch(samples: list[TrainSample], b: Batching, teacher: bool) -> MicroBatch:
    """Reads the key positions of every rollout, in the teacher's or the student's sequence."""
    return _reader_batch(samples, *_sequences(samples, teacher), [[s.key_positions for s in samples]], b)


def make_micro_batches(samples: list[TrainSample], micro_batch_size: int, *,
                       batching: Batching | None = None) -> list[MicroBatch]:
    """This rank's rollouts as student micro-batches (all response positions read)."""
    b = batching or Batching(micro_batch_size)
    plan = b.plan([seq_len(s) for s in samples])
    return [student_batch([samples[i] for i in idx], b) for idx in plan]



def seq_len(s: TrainSample) -> int:
    return len(s.prompt_ids) + len(s.response_ids)


def batching_of(ddp, groups: ParallelGroups, micro_batch_size: int, max_tokens: int, pack: bool) -> Batching:
    """The step's `Batching` for this model: rows padded for sequence parallelism, THD packing
    when the model attends through TransformerEngine."""
    inner = unwrap_model(ddp)
    sp = bool(getattr(inner.config, "sequence_parallel", False)) and groups.tp_size > 1
    thd = pack and any(type(m).__name__ == "TEDotProductAttention" for m in inner.modules())
    return Batching(micro_batch_size, max_tokens, pack, groups.tp_size if sp else 1, thd)

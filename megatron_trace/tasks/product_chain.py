"""The decisive-step task: a long chain of easy steps around one multiplication.

A problem is a start value, the two easy operations and the one product, labelled by step:

    25 +1-2 c*7

Steps a, c, e, ... add the first number, steps b, d, f, ... subtract the second, except the one
labelled step (here c), which multiplies. The reference solution works one line per step, each
line opening with the step's label and the operation it reads from the problem, then the answer:

    a+1 25+1=26
    b-2 26-2=24
    c*7 24*7=168
    d-2 168-2=166
    ...
    Answer: 164

Every easy step changes only the ones digit (no carry, no borrow) and its operation follows from
the line's parity, so a small model gets them right. The product (a two-digit value times 2..9)
is the step it finds hard, so a base model's errors concentrate on that line; the reference in
a privileged teacher's prompt holds exactly that line's result. The line is about a ninth of a
response, so a random mask at the same coverage mostly misses it. The measurements that chose
this design (and the designs that failed) are in docs/LOG.md, 2026-12-07.

The split, the answer line and the verifier are the arithmetic task's (`tasks.arith`), so the
two tasks share graders, the eval harness and the oracle annotator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .arith import Step, split_of

__all__ = ["ChainProblem", "generate"]

LABELS = "abcdefghijklmnopqrstuvwxyz"
# The start value's range. Before the product the value keeps its tens digit, so the product is a
# two-digit value (10..39) times 2..9: hard enough that a 500-step base gets it right about half
# the time (values up to 29: 85% greedy; up to 59: 4%; docs/LOG.md 2026-12-07).
START = (10, 39)


@dataclass(frozen=True)
class ChainProblem:
    start: int
    up: int  # the easy steps: +up at steps a, c, e, ..., -down at b, d, f, ...
    down: int
    steps: tuple[Step, ...]

    @property
    def answer(self) -> str:
        return str(self.steps[-1].result)

    @property
    def problem(self) -> str:
        at = next(i for i, s in enumerate(self.steps) if s.op == "*")
        return f"{self.start} +{self.up}-{self.down} {LABELS[at]}*{self.steps[at].b}"

    @property
    def solution(self) -> str:
        lines = [f"{LABELS[i]}{s.op}{s.b} {s.a}{s.op}{s.b}={s.result}" for i, s in enumerate(self.steps)]
        return "\n".join(lines + [f"Answer: {self.answer}"])

    def to_row(self) -> dict:
        return {"problem": self.problem, "answer": self.answer, "solution": self.solution}


def _draw(rng: random.Random, num_ops: int, lo: int, hi: int) -> ChainProblem | None:
    """One problem, or None when the drawn numbers would carry or borrow in an easy step."""
    at, up, down, m, value = rng.randrange(num_ops), rng.randint(1, 4), rng.randint(1, 4), rng.randint(2, 9), rng.randint(lo, hi)
    start, steps = value, []
    for i in range(num_ops):
        if i == at:
            step = Step(value, "*", m, value * m)
        else:
            op, d = ("+", up) if i % 2 == 0 else ("-", down)
            ones = value % 10
            if (op == "+" and ones + d > 9) or (op == "-" and ones - d < 0):
                return None
            step = Step(value, op, d, value + d if op == "+" else value - d)
        steps.append(step)
        value = step.result
    return ChainProblem(start, up, down, tuple(steps))


def generate(n: int, *, split: str = "train", num_ops: int = 8, seed: int = 0,
             heldout_frac: float = 0.1) -> list[ChainProblem]:
    """`n` distinct problems of `split` ("train" or "heldout"), reproducible from `seed`; the
    splits are disjoint by a hash of the problem text, as in `tasks.arith`."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 2 <= num_ops <= len(LABELS):
        raise ValueError(f"data.arith.num_ops must be in 2..{len(LABELS)} for product_chain, got {num_ops}")
    rng = random.Random(f"product_chain-{seed}-{num_ops}")
    out, seen, attempts = [], set(), 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct {split} product_chain problems with num_ops={num_ops}")
        p = _draw(rng, num_ops, *START)
        if p is None or p.problem in seen or split_of(p.problem, heldout_frac) != split:
            continue
        seen.add(p.problem)
        out.append(p)
    return out

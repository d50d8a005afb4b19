"""The synthetic verifiable task: multi-step integer arithmetic with step-by-step solutions.

A problem chains `num_ops` operations on a start value:

    Start with 47. Add 18. Multiply by 3. Subtract 25. What is the result?

and its reference solution has one operation per line, then the answer:

    47 + 18 = 65
    65 * 3 = 195
    195 - 25 = 170
    Answer: 170

Difficulty knobs: `num_ops` and `digits` (of the start value and of +/- operands; multipliers
have one digit fewer, at least one). Problems come from a seeded generator; the train and
held-out splits are disjoint by construction (a hash of the problem text decides the split),
so no held-out problem can ever be drawn for training, whatever the seed.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

__all__ = [
    "ArithProblem",
    "STEP_LINE",
    "Step",
    "extract_answer",
    "grade_arith",
    "generate",
    "parse_steps",
    "split_of",
    "verify",
]

_OPS = {"+": ("Add", lambda a, b: a + b), "-": ("Subtract", lambda a, b: a - b), "*": ("Multiply by", lambda a, b: a * b)}
STEP_LINE = re.compile(r"^\s*(?:[a-z](?:[+\-*]\d+)?\s+)?(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_ANSWER = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class Step:
    a: int
    op: str
    b: int
    result: int

    @property
    def line(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.result}"


@dataclass(frozen=True)
class ArithProblem:
    start: int
    steps: tuple[Step, ...]

    @property
    def answer(self) -> str:
        return str(self.steps[-1].result if self.steps else self.start)

    @property
    def problem(self) -> str:
        words = " ".join(f"{_OPS[s.op][0]} {s.b}." for s in self.steps)
        return f"Start with {self.start}. {words} What is the result?"

    @property
    def solution(self) -> str:
        return "\n".join([s.line for s in self.steps] + [f"Answer: {self.answer}"])

    def to_row(self) -> dict:
        return {"problem": self.problem, "answer": self.answer, "solution": self.solution}


def split_of(problem_text: str, heldout_frac: float = 0.1) -> str:
    """'heldout' or 'train', from a hash of the text: disjoint splits by construction."""
    h = int.from_bytes(hashlib.sha256(problem_text.encode()).digest()[:8], "big") / 2**64
    return "heldout" if h < heldout_frac else "train"


def _draw(rng: random.Random, num_ops: int, digits: int, ops: str = "+-*") -> ArithProblem:
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    mlo, mhi = (2, 9) if digits <= 2 else (10 ** (digits - 2), 10 ** (digits - 1) - 1)
    value = rng.randint(lo, hi)
    start, steps = value, []
    for _ in range(num_ops):
        op = rng.choice(ops)
        b = rng.randint(mlo, mhi) if op == "*" else rng.randint(lo, hi)
        result = _OPS[op][1](value, b)
        steps.append(Step(value, op, b, result))
        value = result
    return ArithProblem(start, tuple(steps))


def generate(n: int, *, split: str = "train", num_ops: int = 3, digits: int = 2, seed: int = 0,
             heldout_frac: float = 0.1, ops: str = "+-*") -> list[ArithProblem]:
    """`n` distinct problems of `split` ("train" or "heldout"), reproducible from `seed`.
    ops: the operators to draw from (a subset of "+-*")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if num_ops < 1 or digits < 1:
        raise ValueError(f"task.num_ops and task.digits must be >= 1, got {num_ops}, {digits}")
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"task ops {ops!r} must be a non-empty subset of '+-*'")
    # The default keeps the original seed string, so existing problem sets do not change.
    rng = random.Random(f"{seed}-{num_ops}-{digits}" + ("" if ops == "+-*" else f"-{ops}"))
    out, seen = [], set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct {split} problems with num_ops={num_ops}, digits={digits}")
        p = _draw(rng, num_ops, digits, ops)
        if p.problem in seen or split_of(p.problem, heldout_frac) != split:
            continue
        seen.add(p.problem)
        out.append(p)
    return out


def extract_answer(response: str) -> int | None:
    """The integer after the last 'Answer:' in the response, or None."""
    found = _ANSWER.findall(response)
    return int(found[-1]) if found else None


def verify(response: str, gold: str | int) -> bool:
    got = extract_answer(response)
    return got is not None and got == int(gold)


def grade_arith(response: str, gold: str | int) -> str:
    """The verifier-pool form of `verify`: "correct", "wrong" or "no_answer"."""
    got = extract_answer(response)
    if got is None:
        return "no_answer"
    return "correct" if got == int(gold) else "wrong"


def parse_steps(response: str) -> list[tuple[int, Step | None]]:
    """(line index, parsed step or None) for each line of the response."""
    out = []
    for i, line in enumerate(response.split("\n")):
        m = STEP_LINE.match(line)
        out.append((i, Step(int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))) if m else None))
    return out

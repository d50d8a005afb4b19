"""The embedded synthetic tasks (data.source=arith; `data.task` picks one).

arith          short multi-step arithmetic (the original demo task)
product_chain  a long chain of easy steps around one decisive multiplication
"""

from __future__ import annotations

__all__ = ["TASKS", "task_rows"]

TASKS = ("arith", "product_chain")


def task_rows(task: str, n: int, *, split: str, seed: int, num_ops: int, digits: int = 2,
              ops: str = "+-*") -> list[dict]:
    """`n` problem rows (problem / answer / solution) of embedded task `task`. digits and ops
    shape `arith` only; `num_ops` is the chain length of both."""
    if task == "arith":
        from .arith import generate

        return [p.to_row() for p in generate(n, split=split, seed=seed, num_ops=num_ops, digits=digits, ops=ops)]
    if task == "product_chain":
        from .product_chain import generate as generate_chain

        return [p.to_row() for p in generate_chain(n, split=split, seed=seed, num_ops=num_ops)]
    raise ValueError(f"data.task: unknown embedded task {task!r}; choose one of {list(TASKS)}")

"""Does an embedded task let TRACE's claim show? Two measurements on a base model.

1. Where the base goes wrong: for each incorrect response, the first line that departs from
   the reference, placed relative to the task's decisive step (the hardest reference line:
   the product in `product_chain`): "decisive", "before", "after", or "answer" (every step line
   right, the answer line wrong or missing).
2. What the privileged teacher adds: on the reference solutions, the mean log-prob of each
   reference token under the plain prompt (the student) and under the teacher's prompt (the
   reference solution and a key-step diagnostic), at the decisive line's operand and result (the
   tokens after its operator), at the same tokens of the other lines, and at every other position.

`tools/probe_task.py` is the command; the figures for the committed tasks are in docs/LOG.md.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from .arith import STEP_LINE, parse_steps
from .oracle import difficulty

__all__ = ["decisive_line", "first_error_place", "probe_errors", "probe_teacher", "result_positions"]


def decisive_line(solution: str) -> int:
    """Index (among the step lines) of the reference's hardest step; the first of equals."""
    steps = [s for _, s in parse_steps(solution) if s is not None]
    return max(range(len(steps)), key=lambda i: (difficulty(steps[i]), -i))


def first_error_place(response: str, solution: str) -> str:
    """Where `response` first departs from `solution`: decisive / before / after / answer."""
    ref = [s for _, s in parse_steps(solution) if s is not None]
    got = [s for _, s in parse_steps(response) if s is not None]
    k_dec = decisive_line(solution)
    for k, r in enumerate(ref):
        if k >= len(got) or got[k] != r:
            return "decisive" if k == k_dec else ("before" if k < k_dec else "after")
    return "answer"


def result_positions(solution: str) -> tuple[set[int], set[int]]:
    """Character offsets of the decisive step line's right operand and result (everything after
    its operator: where a step is read from the problem and computed), and of the same parts of
    the other step lines. The embedded tasks' tokenizer is character-level: offsets are tokens."""
    k_dec = decisive_line(solution)
    decisive, other, start, k = set(), set(), 0, 0
    for line in solution.split("\n"):
        m = STEP_LINE.match(line)
        if m:
            (decisive if k == k_dec else other).update(range(start + m.start(3), start + len(line.rstrip())))
            k += 1
        start += len(line) + 1
    return decisive, other


def probe_errors(responses: list[str], rows: list[dict], verify) -> dict:
    """Shares of first-error places among the incorrect responses (rows[i] answers responses[i])."""
    places: Counter = Counter()
    wrong = 0
    for text, row in zip(responses, rows):
        if verify(text, row["answer"]):
            continue
        wrong += 1
        places[first_error_place(text, row["solution"])] += 1
    return {"samples": len(responses), "incorrect": wrong, "first_error": dict(places),
            "share_at_decisive": places["decisive"] / wrong if wrong else math.nan}


@torch.no_grad()
def _token_logprobs(model, ids: list[int], start: int) -> list[float]:
    logits = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return [float(logits[start + i - 1, ids[start + i]]) for i in range(len(ids) - start)]


def probe_teacher(model, tokenizer, rows: list[dict]) -> dict:
    """Student vs teacher mean log-prob of the reference tokens by position class, and the share of
    decisive positions where the teacher gives the reference token more probability."""
    from ..data.problems import math_prompt
    from ..teacher import build_teacher_input

    acc: dict[str, list[float]] = {f"{who}_{where}": [] for who in ("student", "teacher")
                                   for where in ("decisive", "other_steps", "rest")}
    wins = []
    for row in rows:
        resp = tokenizer(row["solution"], add_special_tokens=False)["input_ids"]
        prompt = tokenizer(math_prompt(row["problem"], tokenizer, thinking=False, kind="arith"),
                           add_special_tokens=False)["input_ids"]
        s_lp = _token_logprobs(model, prompt + resp, len(prompt))
        t = build_teacher_input(tokenizer, row["problem"], row["solution"], "key_computation", True, resp,
                                thinking=False, kind="arith")
        t_lp = _token_logprobs(model, t.input_ids, t.prompt_len)
        decisive, other = result_positions(row["solution"])
        for i in range(len(resp)):
            where = "decisive" if i in decisive else ("other_steps" if i in other else "rest")
            acc[f"student_{where}"].append(s_lp[i])
            acc[f"teacher_{where}"].append(t_lp[i])
            if where == "decisive":
                wins.append(t_lp[i] > s_lp[i])
    out = {k: sum(v) / len(v) if v else math.nan for k, v in acc.items()}
    out["teacher_ahead_at_decisive"] = sum(wins) / len(wins) if wins else math.nan
    out["problems"] = len(rows)
    return out

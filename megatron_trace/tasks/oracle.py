"""Rule-based annotator for the embedded tasks, `arith` and `product_chain` (exact, free,
deterministic).

Incorrect response: the first line that departs from the reference is the error span, typed
  copy_error        the left operand is not the previous (correct) result
  wrong_operand     wrong operator or right operand
  arithmetic_error  operands right, result wrong
  logic_error       an extra step beyond the reference
  incomplete        all steps right but too few, or the answer line disagrees with the last step
Correct response: key spans are the hardest lines (multiplications, then additions with a carry
or subtractions with a borrow), highest first, up to the coverage cap in characters (the task's
tokenizer is character-level, so characters are tokens). With decisive_only (product_chain)
only the hardest lines are key: there, the one product line.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..annotate.base import Annotation, AnnotationRequest
from .arith import Step, parse_steps

__all__ = ["OracleAnnotator", "difficulty"]


def _has_carry(a: int, b: int, op: str) -> bool:
    a, b = abs(a), abs(b)
    while a or b:
        da, db = a % 10, b % 10
        if (op == "+" and da + db >= 10) or (op == "-" and da < db):
            return True
        a, b = a // 10, b // 10
    return False


def difficulty(step: Step) -> int:
    if step.op == "*":
        return 3 + len(str(abs(step.b)))
    return 2 if _has_carry(step.a, step.b, step.op) else 1


class OracleAnnotator:
    name = "oracle"

    def __init__(self, coverage_cap: float = 0.25, *, decisive_only: bool = False):
        self.coverage_cap = coverage_cap
        self.decisive_only = decisive_only

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        out = []
        for req in requests:
            try:
                out.append(self._one(req))
            except Exception:  # noqa: BLE001 - an annotator never raises into training
                out.append(Annotation.failed("error"))
        return out

    @staticmethod
    def _segment_of_line(req: AnnotationRequest, line_idx: int) -> int | None:
        """Id of the first segment overlapping response line `line_idx`."""
        lines = req.response.split("\n")
        start = sum(len(line) + 1 for line in lines[:line_idx])
        end = start + len(lines[line_idx])
        return next((seg.id for seg in req.segments if seg.start < end and seg.end > start), None)

    def _one(self, req: AnnotationRequest) -> Annotation:
        if not req.segments:
            return Annotation.failed("no_segments")
        ref = [s for _, s in parse_steps(req.reference_solution or "") if s is not None]
        lines = parse_steps(req.response)
        steps = [(i, s) for i, s in lines if s is not None]
        if req.correct:
            ranked = sorted(steps, key=lambda x: -difficulty(x[1]))
            if self.decisive_only and ranked:
                top = difficulty(ranked[0][1])
                ranked = [x for x in ranked if difficulty(x[1]) == top]
            budget = self.coverage_cap * len(req.response)
            ids, used = [], 0
            for i, s in ranked:
                seg = self._segment_of_line(req, i)
                if seg is None or used + len(s.line) > budget:
                    continue
                ids.append(seg)
                used += len(s.line)
            return Annotation(tuple(dict.fromkeys(ids)), "key_computation") if ids else Annotation.failed("empty")
        prev = ref[0].a if ref else None
        for k, (i, s) in enumerate(steps):
            if k >= len(ref):
                kind = "logic_error"
            elif s.a != prev:
                kind = "copy_error"
            elif s.op != ref[k].op or s.b != ref[k].b:
                kind = "wrong_operand"
            elif s.result != ref[k].result:
                kind = "arithmetic_error"
            else:
                prev = s.result
                continue
            seg = self._segment_of_line(req, i)
            return Annotation((seg,), kind) if seg is not None else Annotation.failed("no_segments")
        # Every step line is right: the answer line (or the missing rest) is the error.
        answer_lines = [i for i, line in enumerate(req.response.split("\n")) if "Answer" in line]
        target = answer_lines[-1] if answer_lines else (steps[-1][0] if steps else len(lines) - 1)
        seg = self._segment_of_line(req, target)
        if seg is None:
            seg = req.segments[-1].id
        return Annotation((seg,), "incomplete")

"""The annotator protocol, the diagnostic taxonomy, the prompt and strict reply parsing.

An annotator sees, per rollout, the problem, the reference solution, whether the rollout is
correct and its numbered segments. It returns segment ids (key segments of a correct rollout,
the smallest error segments of an incorrect one, highest priority first) and one coarse
diagnostic type. The teacher later sees only that *type*, never the span text.

Failures never raise into training: each becomes an `Annotation` with no spans and a
`failure` kind from `FAILURE_KINDS`, so the rollout gets plain GRPO, and the kind is counted.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .segment import Segment

__all__ = [
    "ERROR_TYPES",
    "FAILURE_KINDS",
    "KEY_TYPES",
    "Annotation",
    "AnnotationRequest",
    "Annotator",
    "FailureCounter",
    "build_messages",
    "parse_reply",
]

# Coarse diagnostic types. Key types describe why a correct segment matters; error types the
# kind of mistake. They are deliberately coarse: the teacher is told the type, not the place.
KEY_TYPES = (
    "key_setup",  # translating the problem into the right equations / quantities
    "key_insight",  # the idea that unlocks the solution
    "key_computation",  # a calculation that is easy to get wrong
    "key_verification",  # a check that confirms or corrects the result
)
ERROR_TYPES = (
    "misread_problem",  # wrong quantity, condition or question answered
    "wrong_method",  # an approach that cannot reach the answer
    "logic_error",  # an invalid inference or case analysis
    "algebra_error",  # symbolic manipulation gone wrong
    "arithmetic_error",  # a numeric calculation gone wrong
    "wrong_operand",  # the right operation applied to the wrong quantity
    "copy_error",  # a value carried over incorrectly from earlier work
    "incomplete",  # stops before an answer, or answers without finishing
)

FAILURE_KINDS = (
    "http_error",  # non-retryable status, or retries exhausted
    "timeout",
    "invalid_json",  # not exactly one JSON object of the expected shape
    "ids_out_of_range",
    "bad_type",  # diagnostic type not in the taxonomy for this correctness
    "empty",  # no segments returned
    "coverage_over_cap",  # the top span alone exceeds the coverage cap
    "no_segments",  # the response had nothing to annotate
    "error",  # anything else (caught, never raised)
)


@dataclass(frozen=True)
class AnnotationRequest:
    problem: str
    reference_solution: str | None
    correct: bool
    response: str
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Annotation:
    segment_ids: tuple[int, ...] = ()
    diagnostic: str | None = None
    failure: str | None = None  # one of FAILURE_KINDS, or None on success

    @property
    def ok(self) -> bool:
        return self.failure is None

    @classmethod
    def failed(cls, kind: str) -> Annotation:
        assert kind in FAILURE_KINDS, kind
        return cls(failure=kind)


@runtime_checkable
class Annotator(Protocol):
    name: str

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        """One Annotation per request, in order. Must not raise for a bad reply."""
        ...


@dataclass
class FailureCounter:
    counts: Counter = field(default_factory=Counter)

    def add(self, annotations: Sequence[Annotation]) -> None:
        for a in annotations:
            self.counts["ok" if a.ok else a.failure] += 1

    def as_metrics(self, prefix: str = "annotate/") -> dict[str, int]:
        return {f"{prefix}{k}": int(self.counts.get(k, 0)) for k in ("ok", *FAILURE_KINDS)}


_SYSTEM = (
    "You grade step-by-step solutions. You receive a problem, a reference solution, whether a "
    "student's response reached the correct final answer, and the response split into numbered "
    "segments. Reply with exactly one JSON object and nothing else."
)


def build_messages(req: AnnotationRequest, coverage_cap: float = 0.25) -> list[dict[str, str]]:
    """Chat messages asking for key segments (correct) or the smallest error segments (incorrect)."""
    numbered = "\n".join(f"[{s.id}] {s.text}" for s in req.segments)
    if req.correct:
        task = ("The response is CORRECT. List the ids of the key segments: the few steps that carry the "
                "solution, most important first.")
        types = KEY_TYPES
    else:
        task = ("The response is INCORRECT. List the ids of the smallest set of segments where the first "
                "decisive error happens, most important first.")
        types = ERROR_TYPES
    ref = req.reference_solution or "(none available)"
    user = (
        f"## Problem\n{req.problem}\n\n## Reference solution\n{ref}\n\n## Response segments\n{numbered}\n\n"
        f"## Task\n{task} Select at most {coverage_cap:.0%} of the response. Also give one type from: "
        f"{', '.join(types)}.\n\nReply as JSON: {{\"segments\": [ids], \"type\": \"<type>\"}}"
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.DOTALL)


def parse_reply(text, req: AnnotationRequest) -> Annotation:
    """Strictly parse a reply: one JSON object {"segments": [int, ...], "type": str}.

    A single ```json fence around the object is tolerated; anything else around it is not.
    """
    if not isinstance(text, str):
        return Annotation.failed("invalid_json")
    body = text.strip()
    m = _FENCE.match(body)
    if m:
        body = m.group(1).strip()
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return Annotation.failed("invalid_json")
    if not isinstance(obj, dict) or set(obj) != {"segments", "type"}:
        return Annotation.failed("invalid_json")
    ids, kind = obj["segments"], obj["type"]
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return Annotation.failed("invalid_json")
    if not isinstance(kind, str):
        return Annotation.failed("invalid_json")
    if kind not in (KEY_TYPES if req.correct else ERROR_TYPES):
        return Annotation.failed("bad_type")
    if not ids:
        return Annotation.failed("empty")
    valid = {s.id for s in req.segments}
    if any(i not in valid for i in ids):
        return Annotation.failed("ids_out_of_range")
    return Annotation(tuple(dict.fromkeys(ids)), kind)

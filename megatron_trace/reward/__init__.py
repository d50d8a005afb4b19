"""Verifiers with hard time limits (math-verify, multiple choice) and the grade job."""

from .choice import extract_choice, grade_choice
from .grade import grade_responses
from .math import extract_boxed, extract_math_answer, grade_math
from .pool import TIMEOUT, VerifyPool

__all__ = [
    "TIMEOUT",
    "VerifyPool",
    "extract_boxed",
    "extract_choice",
    "extract_math_answer",
    "grade_choice",
    "grade_math",
    "grade_responses",
]

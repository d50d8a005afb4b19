"""Multiple-choice answer extraction (letters) and grading."""

from __future__ import annotations

import re

from .math import extract_boxed

__all__ = ["extract_choice", "grade_choice"]

_PATTERNS = [
    re.compile(r"answer\s*(?:is|:)\s*\(?\**([A-J])\**\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"\(([A-J])\)"),
]


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    boxed = extract_boxed(text)
    if boxed:
        m = re.fullmatch(r"\s*(?:\\text\{)?\(?([A-Ja-j])\)?\}?\s*", boxed)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    for pat in _PATTERNS:
        found = [x.upper() for x in pat.findall(text) if x.upper() in letters]
        if found:
            return found[-1]
    return None


def grade_choice(response: str, gold: str, letters: str = "ABCD") -> str:
    got = extract_choice(response, letters)
    if got is None:
        return "no_answer"
    return "correct" if got == gold.strip().upper() else "wrong"

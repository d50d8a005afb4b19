"""Math answer extraction and verification with math-verify.

`grade_math(response, gold)` runs inside a `VerifyPool` worker (hard time limit); it returns
"correct", "wrong" or "no_answer". Extraction order: the last \\boxed{...} (or \\fbox), then the
common fallbacks "final answer is X", "answer is X", "Answer: X" (last occurrence).
"""

from __future__ import annotations

import re

__all__ = ["extract_boxed", "extract_math_answer", "grade_math"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FALLBACKS = [
    re.compile(r"final answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.|\n|$)", re.IGNORECASE),
    re.compile(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.|\n|$)", re.IGNORECASE),
    re.compile(r"^\s*\**answer\**\s*:\s*\$?([^\n$]+?)\$?\s*$", re.IGNORECASE | re.MULTILINE),
]
MAX_ANSWER_CHARS = 2000


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} with balanced braces, or None (also when unbalanced)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                i += 2
                continue
            depth += c == "{"
            depth -= c == "}"
            i += 1
        if depth == 0:
            return text[start:i - 1].strip()
    return None


def extract_math_answer(text: str) -> str | None:
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    for pat in _FALLBACKS:
        found = pat.findall(text)
        if found:
            return found[-1].strip()
    return None


def grade_math(response: str, gold: str) -> str:
    import logging

    from math_verify import parse, verify

    # math-verify's own signal-based timeouts are off (they would turn a hang into "wrong");
    # the pool's hard kill bounds the time. Silence its reminder about that.
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    pred = extract_math_answer(response)
    if not pred:
        return "no_answer"
    if len(pred) > MAX_ANSWER_CHARS:
        return "wrong"  # no real answer is this long; parsing it would only burn the time budget
    gold_p = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    pred_p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not pred_p:
        return "wrong"
    return "correct" if verify(gold_p, pred_p, timeout_seconds=None) else "wrong"

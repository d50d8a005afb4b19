"""Split a response into numbered segments with character offsets.

Segments are lines (mode "line") or blank-line separated paragraphs (mode "paragraph"). Empty
or whitespace-only pieces are dropped. A piece longer than `max_chars` is split at sentence
boundaries ('. ', '? ', '! ', '; ') and, where a sentence is still too long, at the last space
before the limit (hard cut when there is none). Offsets always index the original text, and
`text[seg.start:seg.end] == seg.text`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Segment", "segment_text"]

_SENTENCE_END = re.compile(r"(?<=[.?!;])\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Segment:
    id: int
    start: int  # character offset in the response, inclusive
    end: int  # exclusive
    text: str


def _pieces(text: str, mode: str) -> list[tuple[int, int]]:
    if mode == "line":
        out, pos = [], 0
        for line in text.split("\n"):
            out.append((pos, pos + len(line)))
            pos += len(line) + 1
        return out
    out, pos = [], 0
    for m in _PARAGRAPH.finditer(text):
        out.append((pos, m.start()))
        pos = m.end()
    out.append((pos, len(text)))
    return out


def _strip(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _split_long(text: str, a: int, b: int, max_chars: int) -> list[tuple[int, int]]:
    if b - a <= max_chars:
        return [(a, b)]
    # sentence boundaries first
    cuts = [a] + [a + m.end() for m in _SENTENCE_END.finditer(text[a:b])] + [b]
    out: list[tuple[int, int]] = []
    for s, e in zip(cuts, cuts[1:]):
        s, e = _strip(text, s, e)
        while e - s > max_chars:
            space = text.rfind(" ", s + 1, s + max_chars + 1)
            cut = space if space > s else s + max_chars
            out.append(_strip(text, s, cut))
            s, e = _strip(text, cut, e)
        if e > s:
            out.append((s, e))
    return [(s, e) for s, e in out if e > s]


def segment_text(text: str, mode: str = "line", max_chars: int = 300) -> list[Segment]:
    """Numbered segments (ids 0..n-1 in text order) covering every non-blank part of `text`."""
    if mode not in ("line", "paragraph"):
        raise ValueError(f"annotate.segment_mode must be line or paragraph, got {mode!r}")
    if max_chars < 1:
        raise ValueError(f"annotate.max_segment_chars must be >= 1, got {max_chars}")
    spans: list[tuple[int, int]] = []
    for a, b in _pieces(text, mode):
        a, b = _strip(text, a, b)
        if b > a:
            spans.extend(_split_long(text, a, b, max_chars))
    return [Segment(i, s, e, text[s:e]) for i, (s, e) in enumerate(spans)]

"""Annotated segments -> per-token masks over the response, with the coverage cap."""

from __future__ import annotations

from collections.abc import Sequence

from .segment import Segment

__all__ = ["CoverageExceeded", "annotation_to_mask", "segments_to_token_mask"]


class CoverageExceeded(ValueError):
    """Even the highest-priority span alone covers more than the cap."""


def _tokens_of(seg: Segment, offsets: Sequence[tuple[int, int]]) -> set[int]:
    # A token belongs to the segment when their character ranges overlap. Zero-width tokens
    # (special tokens, some byte-level pieces) belong where their position falls inside.
    out = set()
    for i, (a, b) in enumerate(offsets):
        if (a < seg.end and b > seg.start) or (a == b and seg.start <= a < seg.end):
            out.add(i)
    return out


def segments_to_token_mask(
    segments: Sequence[Segment],
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    coverage_cap: float = 0.25,
) -> tuple[list[bool], list[int]]:
    """Token mask for the segments `ids` (in priority order, highest first), and the ids kept.

    offsets: per response token, its `(start, end)` character range in the response text (the
    tokenizer's offset mapping). Lowest-priority spans are dropped until the masked tokens are
    at most `coverage_cap` of the response; `CoverageExceeded` if the first span alone is over.
    Unknown ids raise `IndexError`.
    """
    n = len(offsets)
    by_id = {s.id: s for s in segments}
    for i in ids:
        if i not in by_id:
            raise IndexError(f"segment id {i} out of range (0..{len(segments) - 1})")
    limit = coverage_cap * n
    masked: set[int] = set()
    kept: list[int] = []
    for i in dict.fromkeys(ids):  # de-duplicate, keep priority order
        toks = _tokens_of(by_id[i], offsets)
        if len(masked | toks) > limit:
            if not kept:
                raise CoverageExceeded(
                    f"segment {i} alone covers {len(toks)}/{n} tokens, over the cap {coverage_cap:.0%}")
            continue  # lower-priority spans are dropped; a later, smaller one may still fit
        masked |= toks
        kept.append(i)
    return [i in masked for i in range(n)], kept


def annotation_to_mask(annotation, request, offsets: Sequence[tuple[int, int]], coverage_cap: float = 0.25):
    """(token mask, annotation) for one rollout; span problems become counted failures.

    A failed annotation, ids out of range, or a top span over the cap give an all-False mask
    and an annotation whose `failure` says why, so the rollout falls back to plain GRPO.
    """
    from .base import Annotation

    n = len(offsets)
    if not annotation.ok:
        return [False] * n, annotation
    try:
        mask, kept = segments_to_token_mask(request.segments, annotation.segment_ids, offsets, coverage_cap)
    except CoverageExceeded:
        return [False] * n, Annotation.failed("coverage_over_cap")
    except IndexError:
        return [False] * n, Annotation.failed("ids_out_of_range")
    return mask, Annotation(tuple(kept), annotation.diagnostic)

"""Segmentation offsets and spans -> token masks, including property tests over random texts."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_trace.annotate import CoverageExceeded, segment_text, segments_to_token_mask


def test_lines_and_long_lines():
    text = "First line.\n\n  Second line here.  \n" + "A sentence. " * 30 + "\nlast"
    segs = segment_text(text, max_chars=40)
    assert [s.id for s in segs] == list(range(len(segs)))
    assert segs[0].text == "First line." and segs[1].text == "Second line here."
    assert all(len(s.text) <= 40 for s in segs) and segs[-1].text == "last"
    for s in segs:
        assert text[s.start:s.end] == s.text and s.text == s.text.strip() and s.text


def test_paragraphs():
    segs = segment_text("a\nb\n\n\nc d", mode="paragraph")
    assert [s.text for s in segs] == ["a\nb", "c d"]
    with pytest.raises(ValueError, match="segment_mode"):
        segment_text("x", mode="words")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=400), st.integers(1, 60),
       st.sampled_from(["line", "paragraph"]))
def test_segments_partition_the_non_blank_text(text, max_chars, mode):
    segs = segment_text(text, mode=mode, max_chars=max_chars)
    prev_end = 0
    for s in segs:
        assert text[s.start:s.end] == s.text and 0 < len(s.text) <= max_chars and s.start >= prev_end
        prev_end = s.end
    covered = "".join(s.text for s in segs)
    assert "".join(covered.split()) == "".join(text.split())  # no non-blank character lost or added


def _char_offsets(text):
    return [(i, i + 1) for i in range(len(text))]


def test_mask_and_cap_with_char_offsets():
    text = "aaaa\nbb\ncccccccc\nd"
    segs = segment_text(text)  # [aaaa, bb, cccccccc, d]
    mask, kept = segments_to_token_mask(segs, [1, 2, 3], _char_offsets(text), coverage_cap=0.25)
    # 18 chars, cap 4.5 tokens: "bb" (2) fits, "cccccccc" (8) is dropped, "d" (1) still fits.
    assert kept == [1, 3] and sum(mask) == 3 and all(mask[i] for i in (5, 6, 17))
    with pytest.raises(CoverageExceeded):
        segments_to_token_mask(segs, [2], _char_offsets(text), coverage_cap=0.25)
    with pytest.raises(IndexError):
        segments_to_token_mask(segs, [9], _char_offsets(text))


@pytest.fixture(scope="module")
def tokenizers_under_test():
    from megatron_trace.tasks.tokenizer import build_char_tokenizer

    toks = [build_char_tokenizer()]
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # A small byte-level BPE trained here (no download): multi-character tokens, byte offsets.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["12 + 7 = 19", "The answer is 42.", "Let x = 3. Then 2x + 1 = 7.", "Answer: 170"] * 50
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    toks.append(PreTrainedTokenizerFast(tokenizer_object=bpe))
    return toks


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_masks_follow_segments_for_real_tokenizers(tokenizers_under_test, data):
    text = data.draw(st.text(alphabet="abc xyz0123456789+-=.\n", min_size=1, max_size=200))
    segs = segment_text(text, max_chars=data.draw(st.integers(3, 30)))
    if not segs:
        return
    for tok in tokenizers_under_test:
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        offsets = enc["offset_mapping"]
        ids = data.draw(st.lists(st.sampled_from([s.id for s in segs]), min_size=1, max_size=4))
        try:
            mask, kept = segments_to_token_mask(segs, ids, offsets, coverage_cap=1.0)
        except CoverageExceeded:
            raise AssertionError("cap 1.0 can never be exceeded") from None
        chosen = [s for s in segs if s.id in set(kept)]
        for i, (a, b) in enumerate(offsets):
            overlaps = any(a < s.end and b > s.start for s in chosen)
            assert mask[i] == overlaps or a == b
        # Every character of a chosen segment is inside some masked token.
        for s in chosen:
            for c in range(s.start, s.end):
                assert any(mask[i] for i, (a, b) in enumerate(offsets) if a <= c < b)
        capped, kept_c = segments_to_token_mask(segs, ids, offsets, coverage_cap=0.5) if _fits(segs, ids, offsets) else ([], [])
        assert sum(capped) <= 0.5 * len(offsets)


def _fits(segs, ids, offsets):
    try:
        segments_to_token_mask(segs, ids[:1], offsets, coverage_cap=0.5)
        return True
    except CoverageExceeded:
        return False


def test_annotation_to_mask_turns_span_problems_into_counted_failures():
    from megatron_trace.annotate import Annotation, AnnotationRequest, FailureCounter, annotation_to_mask

    text = "aaaa\nbb\ncccccccc\nd"
    req = AnnotationRequest("p", None, True, text, tuple(segment_text(text)))
    offs = _char_offsets(text)
    mask, ann = annotation_to_mask(Annotation((1, 2), "key_insight"), req, offs)
    assert ann.ok and ann.segment_ids == (1,) and sum(mask) == 2
    counter = FailureCounter()
    results = [annotation_to_mask(a, req, offs)[1] for a in
               (Annotation((2,), "key_insight"), Annotation((9,), "key_insight"), Annotation.failed("timeout"))]
    counter.add(results)
    m = counter.as_metrics()
    assert m["annotate/coverage_over_cap"] == 1 and m["annotate/ids_out_of_range"] == 1 and m["annotate/timeout"] == 1

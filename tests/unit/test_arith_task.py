"""The synthetic arithmetic task: generator, splits, verifier, tokenizer and the oracle annotator."""

import pytest

from megatron_trace.annotate import AnnotationRequest, segment_text
from megatron_trace.tasks.arith import extract_answer, generate, parse_steps, split_of, verify
from megatron_trace.tasks.oracle import OracleAnnotator


def test_generator_is_seeded_and_splits_are_disjoint():
    a = generate(50, seed=1, num_ops=3, digits=2)
    assert [p.problem for p in a] == [p.problem for p in generate(50, seed=1, num_ops=3, digits=2)]
    held = generate(50, split="heldout", seed=1, num_ops=3, digits=2)
    assert not {p.problem for p in a} & {p.problem for p in held}
    assert all(split_of(p.problem) == "train" for p in a) and all(split_of(p.problem) == "heldout" for p in held)
    assert len({p.problem for p in a}) == 50


@pytest.mark.parametrize("num_ops, digits", [(1, 1), (3, 2), (5, 3)])
def test_solutions_are_correct_and_verified(num_ops, digits):
    for p in generate(20, num_ops=num_ops, digits=digits, seed=3):
        steps = [s for _, s in parse_steps(p.solution) if s]
        assert len(steps) == num_ops
        assert all(eval(f"{s.a} {s.op} {s.b}") == s.result for s in steps)  # noqa: S307 - test oracle
        assert verify(p.solution, p.answer) and not verify(p.solution, int(p.answer) + 1)
        assert p.to_row()["answer"] == p.answer


def test_answer_extraction():
    assert extract_answer("x\nAnswer: 5\nAnswer: -12") == -12 and extract_answer("no answer") is None
    with pytest.raises(ValueError, match="split"):
        generate(1, split="test")


def test_char_tokenizer_round_trips_and_saves(tmp_path):
    from transformers import AutoTokenizer

    from megatron_trace.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    p = generate(1, seed=0)[0]
    enc = tok(p.solution, return_offsets_mapping=True, add_special_tokens=False)
    assert len(enc["input_ids"]) == len(p.solution) and enc["offset_mapping"][3] == (3, 4)
    assert tok.decode(enc["input_ids"]) == p.solution
    chat = tok.apply_chat_template([{"role": "user", "content": p.problem}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    assert chat.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(p.solution)["input_ids"] == enc["input_ids"] and again.eos_token == "<|im_end|>"


def _request(problem, response, correct):
    return AnnotationRequest(problem.problem, problem.solution, correct, response, tuple(segment_text(response)))


def test_oracle_error_types_and_positions():
    p = generate(1, num_ops=3, digits=2, seed=5)[0]
    s = [x for _, x in parse_steps(p.solution) if x]
    lines = p.solution.split("\n")

    def with_line(k, line):
        out = list(lines)
        out[k] = line
        return "\n".join(out)

    cases = {
        "arithmetic_error": with_line(1, f"{s[1].a} {s[1].op} {s[1].b} = {s[1].result + 1}"),
        "wrong_operand": with_line(1, f"{s[1].a} {s[1].op} {s[1].b + 1} = {s[1].result}"),
        "copy_error": with_line(2, f"{s[2].a + 10} {s[2].op} {s[2].b} = {s[2].result}"),
        "incomplete": "\n".join(lines[:2] + [f"Answer: {s[1].result}"]),
        "logic_error": "\n".join(lines[:3] + ["1 + 1 = 2", lines[3]]),
    }
    oracle = OracleAnnotator()
    anns = oracle.annotate([_request(p, r, False) for r in cases.values()])
    assert [a.diagnostic for a in anns] == list(cases)
    assert [a.segment_ids for a in anns] == [(1,), (1,), (2,), (2,), (3,)]


def test_oracle_key_spans_prefer_multiplications_within_cap():
    p = generate(1, num_ops=4, digits=2, seed=11)[0]
    (ann,) = OracleAnnotator(coverage_cap=0.25).annotate([_request(p, p.solution, True)])
    assert ann.ok and ann.diagnostic == "key_computation" and ann.segment_ids
    steps = [x for _, x in parse_steps(p.solution) if x]
    chosen = sum(len(steps[i].line) for i in ann.segment_ids)
    assert chosen <= 0.25 * len(p.solution)
    if any(x.op == "*" for x in steps):
        assert steps[ann.segment_ids[0]].op == "*"
    (empty,) = OracleAnnotator().annotate([_request(p, "", True)])
    assert empty.failure == "no_segments"

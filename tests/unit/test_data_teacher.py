"""Problem loading, GPQA from a synthetic CSV, prompts, the teacher context and self-annotation."""

import csv
import json
import logging
from types import SimpleNamespace

import pytest

from megatron_trace.annotate import AnnotationRequest, segment_text
from megatron_trace.annotate.self_annotator import SelfAnnotator
from megatron_trace.data import BENCHMARKS, load_benchmark, load_gpqa_csv, load_problems, math_prompt
from megatron_trace.tasks.tokenizer import build_char_tokenizer
from megatron_trace.teacher import build_teacher_input, privileged_prompt


def test_bundled_benchmarks_load():
    sizes = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40}
    for name, n in sizes.items():
        b, rows = load_benchmark(name)
        assert len(rows) == n and all(r["answer"] and r["problem"] for r in rows) and b.kind == "math"
    _, arith = load_benchmark("arith", arith_n=20)
    assert len(arith) == 20 and set(BENCHMARKS) >= {"gpqa_diamond", "arith"}


def test_rows_without_answers_are_skipped_and_reported(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    rows = [{"problem": "1+1", "answer": "2"}, {"problem": "x", "answer": ""}, {"problem": "y", "answer": None},
            {"problem": "2+2", "answer": 4, "solution": "2+2=4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        got, report = load_problems(str(path))
    assert [r["answer"] for r in got] == ["2", "4"] and report.num_skipped == 2 and report.num_rows == 2
    assert f"{path} row 1" in caplog.text and f"{path} row 2" in caplog.text
    with pytest.raises(FileNotFoundError):
        load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="'problem'"):
        load_problems(str(tmp_path / "bad.jsonl"))


def _gpqa_csv(path, n=6):
    cols = ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
            "Incorrect Answer 3", "Explanation"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for i in range(n):
            w.writerow({"Record ID": f"r{i}", "Question": f"Synthetic question {i}?", "Correct Answer": f"right {i}",
                        "Incorrect Answer 1": f"wrong a{i}", "Incorrect Answer 2": f"wrong b{i}",
                        "Incorrect Answer 3": f"wrong c{i}", "Explanation": "none"})


def test_gpqa_csv_is_shuffled_with_a_seed(tmp_path):
    path = tmp_path / "gpqa_diamond.csv"
    _gpqa_csv(path)
    rows = load_gpqa_csv(str(path), seed=0)
    assert rows == load_gpqa_csv(str(path), seed=0) and rows != load_gpqa_csv(str(path), seed=1)
    for i, r in enumerate(rows):
        assert r["choices"][ord(r["answer"]) - 65] == f"right {i}" and f"({r['answer']}) right {i}" in r["problem"]
    assert len({r["answer"] for r in rows}) > 1  # the correct choice moves around
    b, via_registry = load_benchmark("gpqa_diamond", gpqa_csv=str(path))
    assert b.kind == "choice" and via_registry == rows
    with pytest.raises(FileNotFoundError, match="not redistributed"):
        load_gpqa_csv(str(tmp_path / "nope.csv"))


def test_prompts_use_the_chat_template_and_thinking_switch():
    tok = build_char_tokenizer()
    on = math_prompt("What is 2+2?", tok, thinking=True)
    off = math_prompt("What is 2+2?", tok, thinking=False)
    assert "\\boxed{}" in on and on.startswith("<|im_start|>user\n") and off.endswith("</think>\n\n")
    assert "letter" in math_prompt("Q?", None, kind="choice")


def test_teacher_context_alignment_and_no_span_text():
    tok = build_char_tokenizer()
    response = "12 + 7 = 19\nAnswer: 19"
    resp_ids = tok(response, add_special_tokens=False)["input_ids"]
    t = build_teacher_input(tok, "Start with 12. Add 7.", "12 + 7 = 19\nAnswer: 19", "arithmetic_error", False,
                            resp_ids, thinking=False)
    assert t.input_ids[t.prompt_len:] == resp_ids and t.num_response_tokens == len(resp_ids)
    assert [t.input_ids[p + 1] for p in t.logit_positions] == resp_ids
    prompt = tok.decode(t.input_ids[: t.prompt_len])
    assert "arithmetic_error" in prompt and "reference solution" in prompt and prompt.endswith("</think>\n\n")
    assert "Answer: 19" not in privileged_prompt("p", None, "copy_error", False)
    with pytest.raises(ValueError, match="teacher prompt template"):
        privileged_prompt("p", None, None, True, template="{nope}")


def test_answer_only_teacher_sees_the_gold_answer():
    """data.answer_only_teacher: without a solution the teacher gets the gold answer instead."""
    from megatron_trace.annotate import Annotation
    from megatron_trace.rollout import RolloutGroup
    from megatron_trace.rollout.base import Sample
    from megatron_trace.train.stages import ScoredGroup, build_train_samples

    with_answer = privileged_prompt("What is 6*7?", None, "key_step", True, answer="42")
    assert "verified final answer is: 42" in with_answer and "reference solution, for" not in with_answer
    assert "key_step" in with_answer
    both = privileged_prompt("What is 6*7?", "6*7 = 42", None, True, answer="42")
    assert "6*7 = 42" in both and "final answer is" not in both  # a solution wins over the answer
    assert "42" not in privileged_prompt("What is 6*7?", None, None, True)
    assert "Answer: 42" in privileged_prompt("6*7", None, None, True, kind="arith", answer="42")

    tok = build_char_tokenizer()
    t = build_teacher_input(tok, "What is 6*7?", None, None, True, [5, 6], thinking=False, answer="42")
    assert "verified final answer is: 42" in tok.decode(t.input_ids[: t.prompt_len])

    class KeyFirstLine:
        def annotate(self, requests):
            return [Annotation((0,), "key_step") for _ in requests]

    ids = tok("6*7 = 42\nAnswer: 42", add_special_tokens=False)["input_ids"]
    group = RolloutGroup(0, tok("What is 6*7?", add_special_tokens=False)["input_ids"],
                         [Sample(ids, [-1.0] * len(ids), "stop", 0)] * 2,
                         {"problem": "What is 6*7?", "answer": "42", "solution": None})

    def teacher_prompt(**kw):
        (s, _), _ = build_train_samples([ScoredGroup(group, ["6*7 = 42\nAnswer: 42"] * 2, [1.0, 1.0], [0.0, 0.0])],
                                        tok, variant="trace_fkl", annotator=KeyFirstLine(), lam=0.5,
                                        coverage_cap=1.0, segment_mode="line", max_segment_chars=300, seed=0, step=0,
                                        **kw)
        return tok.decode(s.teacher_ids[: s.teacher_prompt_len])

    assert "verified final answer is: 42" in teacher_prompt(answer_only_teacher=True)
    assert "final answer is" not in teacher_prompt()


class _Engine:
    """Follows the rollout-engine protocol: generate(list of prompt ids, params) -> samples."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.calls = tok, replies, []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        return [SimpleNamespace(token_ids=self.tok(r, add_special_tokens=False)["input_ids"]) for r in self.replies]


def test_self_annotator_parses_engine_replies_strictly():
    tok = build_char_tokenizer()
    response = "1 + 1 = 2\nAnswer: 2"
    req = AnnotationRequest("Start with 1. Add 1.", None, True, response, tuple(segment_text(response)))
    engine = _Engine(tok, ['{"segments": [0], "type": "key_computation"}', "not json"])
    out = SelfAnnotator(engine, tok, {"temperature": 0.0}).annotate([req, req])
    assert out[0].segment_ids == (0,) and out[0].diagnostic == "key_computation" and out[1].failure == "invalid_json"
    prompts, params = engine.calls[0]
    assert len(prompts) == 2 and all(isinstance(x, int) for x in prompts[0]) and params == {"temperature": 0.0}


def test_parquet_source(tmp_path):
    import datasets

    path = str(tmp_path / "train.parquet")
    datasets.Dataset.from_list([{"problem": "1+1", "answer": "2", "solution": "1+1=2"},
                                {"problem": "z", "answer": " "}]).to_parquet(path)
    rows, report = load_problems(path)
    assert [r["answer"] for r in rows] == ["2"] and rows[0]["solution"] == "1+1=2" and report.num_skipped == 1


def test_self_annotator_runs_on_the_real_hf_engine():
    import dataclasses

    from megatron_trace.models.hf_io import make_random_hf_model
    from megatron_trace.models.qwen3 import QWEN3_SIZES
    from megatron_trace.rollout import HFEngine, SamplingParams

    tok = build_char_tokenizer()
    engine = HFEngine(make_random_hf_model(dataclasses.replace(QWEN3_SIZES["tiny"], vocab_size=len(tok)), seed=1), tok)
    response = "1 + 1 = 2\nAnswer: 2"
    req = AnnotationRequest("Start with 1. Add 1.", None, True, response, tuple(segment_text(response)))
    (ann,) = SelfAnnotator(engine, tok, SamplingParams(temperature=0.0, max_new_tokens=8)).annotate([req])
    assert ann.failure == "invalid_json"  # a random policy does not write JSON: counted, not raised


def test_gpqa_is_never_dropped_silently(tmp_path, monkeypatch):
    """The paper's evaluation includes GPQA-Diamond: without its CSV, `megatron-trace eval` stops
    before any model is loaded and says how to get the file and how to run without it."""
    from megatron_trace.config import load_config
    from megatron_trace.data.problems import gpqa_csv_problem
    from megatron_trace.eval.job import run_eval

    monkeypatch.delenv("MT_GPQA_CSV", raising=False)
    cfg = load_config(None, ["eval.benchmarks=[math500,aime24,aime25,amc23,gpqa_diamond]"])
    with pytest.raises(FileNotFoundError) as err:
        run_eval(cfg, hf_dir=str(tmp_path / "no_model"))  # the GPQA check comes before the model's
    msg = str(err.value)
    for needle in ("gpqa_diamond", "MT_GPQA_CSV", "eval.gpqa_csv", "github.com/idavidrein/gpqa",
                   "benchmarks=[math500,aime24,aime25,amc23]"):
        assert needle in msg, (needle, msg)
    assert "does not exist" in gpqa_csv_problem(["gpqa_diamond"], str(tmp_path / "nope.csv"))
    csv_path = tmp_path / "gpqa_diamond.csv"
    csv_path.write_text("Question\n")
    monkeypatch.setenv("MT_GPQA_CSV", str(csv_path))
    assert gpqa_csv_problem(["math500", "gpqa_diamond"], None) is None
    assert gpqa_csv_problem(["math500"], None) is None

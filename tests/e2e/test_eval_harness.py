"""The evaluation harness end to end on the real bundled benchmark files, with scripted engines
(the real data, prompts, answer extraction, math-verify grading in the worker pool and reports):
a gold engine scores 1.0, shuffled or random answers score about chance; interrupted runs
resume; several reports merge into one table."""

import csv
import json
import random
import subprocess
import sys

import pytest
from scripted import ScriptedEngine, byte_tokenizer

from megatron_trace.data.problems import load_benchmark
from megatron_trace.eval import EvalSettings, evaluate

MATH = ["math500", "aime24", "aime25", "amc23"]


def _problem_of(prompt: str) -> str:
    return prompt.rsplit("\n\n", 1)[0].strip()  # "<problem>\n\n<instruction>", or "<problem>\n" for arith


def _answers(names, **kw):
    table = {}
    for n in names:
        _, rows = load_benchmark(n, **kw)
        for r in rows:
            table[r["problem"].strip()] = r["answer"]
    return table


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _settings(names, k=2, limit=None, **kw):
    return EvalSettings(benchmarks=names, k=k, limit=limit, bootstrap_samples=200, **kw)


def test_gold_answers_score_one_and_shuffled_answers_score_near_zero(tok, tmp_path):
    gold = _answers(MATH)
    golden = ScriptedEngine(tok, lambda p, j: f"We compute it. The final answer is \\boxed{{{gold[_problem_of(p)]}}}.")
    rep = evaluate(golden, tok, _settings(MATH, limit=100), out_dir=str(tmp_path / "gold"), model="gold",
                   progress=False)
    for name in MATH:
        b = rep["benchmarks"][name]
        assert b["avg@k"] == 1.0 and b["pass@2"] == 1.0 and b["no_answer_rate"] == 0.0, (name, b)
    assert rep["average"] == 1.0
    assert rep["benchmarks"]["math500"]["num_problems"] == 100 and rep["benchmarks"]["aime24"]["num_problems"] == 30

    # Each problem answered with another problem's gold answer (a derangement within the set).
    keys = sorted(gold)
    other = {k: gold[keys[(i + 7) % len(keys)]] for i, k in enumerate(keys)}
    shuffled = ScriptedEngine(tok, lambda p, j: f"\\boxed{{{other[_problem_of(p)]}}}")
    rep = evaluate(shuffled, tok, _settings(MATH, limit=100), out_dir=str(tmp_path / "shuffled"), model="shuffled",
                   progress=False)
    assert rep["average"] <= 0.05 and all(b["no_answer_rate"] == 0.0 for b in rep["benchmarks"].values())

    # the reports: eval.json, eval.md, samples.jsonl with every graded sample
    lines = (tmp_path / "gold" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 * (100 + 30 + 30 + 40) and json.loads(lines[0])["grade"] == "correct"
    md = (tmp_path / "gold" / "eval.md").read_text()
    assert "| model | math500 | aime24 | aime25 | amc23 | average |" in md and "| gold | 100.00 |" in md

    merged = subprocess.run([sys.executable, "tools/merge_evals.py", str(tmp_path / "gold"),
                             str(tmp_path / "shuffled" / "eval.json"), "--out", str(tmp_path / "cmp.md")],
                            capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr
    assert "| gold |" in merged.stdout and "| shuffled |" in merged.stdout
    assert len(json.loads((tmp_path / "cmp.json").read_text())) == 2
    bad = subprocess.run([sys.executable, "tools/merge_evals.py", str(tmp_path / "nope.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nope.json" in bad.stderr


def test_multiple_choice_gold_and_random_letters(tok, tmp_path):
    path = tmp_path / "gpqa.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"])
        for i in range(200):
            w.writerow([f"Question number {i}: which value is right?", f"right {i}", f"wrong a{i}", f"wrong b{i}",
                        f"wrong c{i}"])
    gold = _answers(["gpqa_diamond"], gpqa_csv=str(path))
    golden = ScriptedEngine(tok, lambda p, j: f"So the answer is \\boxed{{{gold[_problem_of(p)]}}}")
    rep = evaluate(golden, tok, _settings(["gpqa_diamond"], gpqa_csv=str(path)), progress=False)
    assert rep["benchmarks"]["gpqa_diamond"]["avg@k"] == 1.0
    rng = random.Random(0)
    guesser = ScriptedEngine(tok, lambda p, j: f"\\boxed{{{rng.choice('ABCD')}}}")
    rep = evaluate(guesser, tok, _settings(["gpqa_diamond"], gpqa_csv=str(path)), progress=False)
    b = rep["benchmarks"]["gpqa_diamond"]
    assert 0.17 <= b["avg@k"] <= 0.33 and b["ci95"][0] < 0.25 < b["ci95"][1]  # chance is 1/4


def test_interrupted_eval_resumes_from_finished_samples(tok, tmp_path):
    arith = {"n": 40, "seed": 3, "num_ops": 2, "digits": 1}
    gold = _answers(["arith"], arith_n=40, arith_seed=3, arith_ops=2, arith_digits=1)

    def answer(p, j):
        return f"Answer: {gold[_problem_of(p)]}" if j == 0 else "Answer: 0"

    s = _settings(["arith"], k=2, arith=arith, batch_prompts=8)
    full = evaluate(ScriptedEngine(tok, answer), tok, s, out_dir=str(tmp_path / "full"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        evaluate(ScriptedEngine(tok, answer, fail_after_calls=1), tok, s, out_dir=str(tmp_path / "cut"), progress=False)
    assert len((tmp_path / "cut" / "samples.jsonl").read_text().splitlines()) == 2 * 8  # the first 8-prompt batch
    resumed_engine = ScriptedEngine(tok, answer)
    resumed = evaluate(resumed_engine, tok, s, out_dir=str(tmp_path / "cut"), progress=False)
    assert resumed_engine.calls == (40 - 8) // 8  # one engine call per remaining batch
    assert resumed["benchmarks"] == full["benchmarks"]
    with pytest.raises(ValueError, match="other settings.*k"):
        evaluate(ScriptedEngine(tok, answer), tok, _settings(["arith"], k=3, arith=arith), out_dir=str(tmp_path / "cut"),
                 progress=False)

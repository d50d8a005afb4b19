"""Verifiers: MATH-500 reference solutions through the CLI, adversarial inputs, choices, the pool."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from megatron_trace.data.problems import _bundled
from megatron_trace.reward import (
    TIMEOUT,
    VerifyPool,
    extract_boxed,
    extract_choice,
    extract_math_answer,
    grade_choice,
)

MATH500 = _bundled("math500")  # the bundled copy, byte-identical to ../shared/data/math500.jsonl


def _cli(*args):
    exe = shutil.which("megatron-trace", path=os.path.dirname(sys.executable))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600)


def test_math500_reference_solutions_grade_correct(tmp_path):
    rows = [json.loads(line) for line in open(MATH500)]
    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps({"index": i, "response": r["solution"]}) + "\n" for i, r in enumerate(rows)))
    proc = _cli("grade", "--benchmark", "math500", "--responses", str(resp), "--out", str(tmp_path / "rep.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["num_responses"] == 500 and report["accuracy"] >= 0.99, report
    assert report["correct"] + report["wrong"] + report["no_answer"] + report["timeout"] == 500
    misses = [i for i in json.load(open(tmp_path / "rep.json"))["items"] if i["result"] != "correct"]
    assert len(misses) <= 5, misses


ADVERSARIAL = [
    r"\boxed{9^{9^{9^{9^{9^{9^{9}}}}}}}",
    r"\boxed{2^{2^{2^{2^{2^{2^{2^{2^{2}}}}}}}}}",
    r"\boxed{(10^{10^{10}})!}",
    r"\boxed{10^{10^{100}} - 10^{10^{100}} + 1}",
    r"\boxed{" + r"\frac{1}{" * 400 + "2" + "}" * 400 + "}",
    r"\boxed{" + r"\sqrt{" * 500 + "2" + "}" * 500 + "}",
    r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    r"\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
    "x" * 1_000_000,
    r"\boxed{" + "1" * 1_000_000 + "}",
    r"\boxed{" + "1+" * 200_000 + "1}",
    r"\boxed{\frac{1}{2}" + "}" * 10_000,
    r"\boxed{" * 10_000,
    r"\boxed{\left( \right. \begin{matrix} 1 & 2 \\ 3 & 4 \end{matrix}",
    r"\boxed{\begin{pmatrix}" + " & ".join(["x"] * 300) + r" \\ " * 300 + r"\end{pmatrix}}",
    r"The answer is $\int_0^\infty e^{-x^{x^{x^{x}}}} dx$",
    r"\boxed{\sum_{n=1}^{10^{100}} n^{n^{n}}}",
    r"\boxed{\lim_{x\to\infty} x^{x^{x^{x}}}}",
    r"\boxed{" + "a" * 50_000 + r"}\boxed{" + "b^" * 20_000 + "c}",
    "Answer: " + "9" * 500_000,
    r"\boxed{\text{" + "}" * 50 + "{" * 50 + "}",
    "\\boxed{\x00\x01\x02\udcff}",
    r"\boxed{1e999999999}",
    r"\boxed{0.\overline{" + "9" * 10_000 + "}}",
]


def test_adversarial_answers_finish_within_the_time_limit():
    timeout = 2.0
    items = [(a, "0") for a in ADVERSARIAL]
    t0 = time.monotonic()
    with VerifyPool("megatron_trace.reward.math.grade_math", num_workers=2, timeout_s=timeout) as pool:
        results = pool.map(items)
    elapsed = time.monotonic() - t0
    assert len(results) == len(ADVERSARIAL) >= 20
    assert all(r in ("correct", "wrong", "no_answer", TIMEOUT) or (isinstance(r, tuple) and r[0] == "error")
               for r in results), results
    assert "correct" not in results  # the gold answer is 0; none of these equals it
    # Each item is bounded by the limit; two workers share the items.
    assert elapsed <= len(items) * timeout / 2 + 15, elapsed


def test_pool_kills_a_hung_worker_and_keeps_going():
    with VerifyPool("time.sleep", num_workers=1, timeout_s=0.5) as pool:
        t0 = time.monotonic()
        out = pool.map([(30,), (0,), (0.01,)])
        assert out == [TIMEOUT, None, None] and time.monotonic() - t0 < 10
        assert pool.num_timeouts == 1 and pool.num_restarts == 1


def test_extraction():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} and finally \boxed{x^{2}}") == "x^{2}"
    assert extract_boxed(r"\boxed{unbalanced") is None
    assert extract_math_answer("Thus the final answer is 42.") == "42"
    assert extract_math_answer("Answer: 7") == "7" and extract_math_answer("no idea") is None


@pytest.mark.parametrize("text, letter", [
    (r"... so \boxed{C}", "C"), ("The answer is (B).", "B"), ("Answer: D", "D"), (r"\boxed{\text{(A)}}", "A"),
    ("I think (A) is wrong and (C) is right", "C"), ("none of them", None), (r"\boxed{E}", None),
])
def test_choice_extraction(text, letter):
    assert extract_choice(text) == letter
    if letter:
        assert grade_choice(text, letter) == "correct" and grade_choice(text, "A" if letter != "A" else "B") == "wrong"


def test_grade_rejects_bad_response_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 999, "response": "x"}\n')
    proc = _cli("grade", "--benchmark", "amc23", "--responses", str(bad))
    assert proc.returncode == 2 and "index 999" in proc.stderr and "bad.jsonl line 1" in proc.stderr
    proc = _cli("grade", "--benchmark", "nope", "--responses", str(bad))
    assert proc.returncode == 2 and "--benchmark" in proc.stderr

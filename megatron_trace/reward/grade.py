"""Grade a JSONL of responses against a benchmark: the `megatron-trace grade` job."""

from __future__ import annotations

import json
import os
from collections import Counter

from ..data.problems import load_benchmark
from .pool import TIMEOUT, VerifyPool

__all__ = ["grade_responses", "verifier_for"]


def verifier_for(kind: str) -> str:
    return "megatron_trace.reward.math.grade_math" if kind == "math" else "megatron_trace.reward.choice.grade_choice"


def _read_responses(path: str, num_rows: int) -> list[tuple[int, str]]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--responses {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                idx, text = rec["index"], rec["response"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path} line {line_no}: expected {{\"index\": int, \"response\": str}}") from None
            if not isinstance(idx, int) or not 0 <= idx < num_rows:
                raise ValueError(f"{path} line {line_no}: index {idx!r} is not a row of the benchmark (0..{num_rows - 1})")
            if not isinstance(text, str):
                raise ValueError(f"{path} line {line_no}: response must be a string")
            out.append((idx, text))
    return out


def grade_responses(benchmark: str, responses: str, out: str | None = None, *, timeout_s: float = 5.0,
                    num_workers: int = 2, gpqa_csv: str | None = None) -> dict:
    b, rows = load_benchmark(benchmark, gpqa_csv=gpqa_csv)
    items = _read_responses(responses, len(rows))
    with VerifyPool(verifier_for(b.kind), num_workers=num_workers, timeout_s=timeout_s) as pool:
        results = pool.map([(text, rows[idx]["answer"]) for idx, text in items])
    counts = Counter("error" if isinstance(r, tuple) else r for r in results)
    n = len(items)
    report = {
        "benchmark": benchmark,
        "num_responses": n,
        "accuracy": counts["correct"] / n if n else 0.0,
        "correct": counts["correct"],
        "wrong": counts["wrong"] + counts["error"],
        "no_answer": counts["no_answer"],
        "timeout": counts[TIMEOUT],
    }
    if out:
        per_item = [{"index": idx, "result": r if isinstance(r, str) else "error"} for (idx, _), r in zip(items, results)]
        with open(out, "w") as f:
            json.dump({**report, "items": per_item}, f, indent=1)
    return report

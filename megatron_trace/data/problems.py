"""Problem sets: loading, the benchmark registry, GPQA-Diamond, and prompt templates.

A problem row is `{"problem": str, "answer": str, "solution": str | None}` plus whatever else
the source carries. Training and eval sets load through `datasets` from local JSONL/parquet
files, or from a hub name when the machine is online. Rows with a missing or empty answer are
skipped, counted and reported with the file and row number.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from dataclasses import dataclass
from importlib import resources

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "LoadReport",
    "format_choices",
    "load_benchmark",
    "load_gpqa_csv",
    "load_problems",
    "math_prompt",
    "peek_has_solution",
]

log = logging.getLogger(__name__)

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("Please reason step by step, and put the letter of the correct choice "
                      "(A, B, C or D) within \\boxed{}.")


@dataclass
class LoadReport:
    source: str
    num_rows: int = 0
    num_skipped: int = 0


def _bundled(name: str) -> str:
    return str(resources.files("megatron_trace.data").joinpath("benchmarks", f"{name}.jsonl"))


def load_problems(source: str, *, split: str = "train", limit: int | None = None,
                  problem_key: str = "problem", answer_key: str = "answer") -> tuple[list[dict], LoadReport]:
    """Rows with non-empty answers from a local .jsonl/.json/.parquet file or a hub dataset name."""
    import datasets

    datasets.disable_progress_bars()
    if os.path.exists(source):
        ext = os.path.splitext(source)[1].lower()
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(ext)
        if kind is None:
            raise ValueError(f"data source {source}: unsupported file type {ext!r} (use .jsonl, .json or .parquet)")
        ds = datasets.load_dataset(kind, data_files=source, split="train")
    elif source.startswith((".", "/")) or source.endswith((".jsonl", ".json", ".parquet")):
        raise FileNotFoundError(f"data source {source} does not exist")
    else:
        ds = datasets.load_dataset(source, split=split)  # hub name; needs network
    for key in (problem_key, answer_key):
        if key not in ds.column_names:
            raise ValueError(f"data source {source}: no column {key!r} (columns: {ds.column_names})")
    report = LoadReport(source)
    rows = []
    for i, row in enumerate(ds):
        ans = row.get(answer_key)
        if ans is None or not str(ans).strip():
            report.num_skipped += 1
            log.warning("%s row %d: missing or empty %r, skipped", source, i, answer_key)
            continue
        out = dict(row)
        out["problem"], out["answer"] = str(row[problem_key]), str(ans).strip()
        out.setdefault("solution", None)
        rows.append(out)
        if limit is not None and len(rows) >= limit:
            break
    report.num_rows = len(rows)
    if report.num_skipped:
        log.warning("%s: skipped %d rows without an answer", source, report.num_skipped)
    return rows, report


def _peek_rows(path: str, num_rows: int) -> list:
    """The first `num_rows` rows of a local .jsonl/.json/.parquet file (unreadable lines skipped)."""
    import json

    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if "solution" not in pf.schema_arrow.names:
            return []
        batch = next(pf.iter_batches(batch_size=num_rows, columns=["solution"]), None)
        return batch.to_pylist() if batch is not None else []
    rows: list = []
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16).lstrip()
        f.seek(0)
        if head.startswith("["):  # a .json array (load_problems reads those too)
            data = json.load(f)
            return data[:num_rows] if isinstance(data, list) else []
        for line in f:
            if len(rows) >= num_rows:
                break
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def peek_has_solution(source: str, num_rows: int = 64) -> bool | None:
    """Whether any of the first `num_rows` rows of `source` has a reference solution (a non-empty
    string `solution`). None when that cannot be known without loading the data: a hub name
    (no network at config time, and the first rows of a hub dataset cannot be read offline) or
    a local path that does not exist (training then fails with "does not exist" when it opens
    it). The synthetic task always has solutions."""
    if source == "arith":
        return True
    if not os.path.isfile(source) or not source.lower().endswith((".jsonl", ".json", ".parquet")):
        return None
    rows = _peek_rows(source, num_rows)
    return any(isinstance(r, dict) and isinstance(r.get("solution"), str) and r["solution"].strip() for r in rows)


# ------------------------------------------------------------------------------ GPQA-Diamond

GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


def format_choices(question: str, choices: list[str]) -> str:
    lines = [question.strip(), ""] + [f"({chr(65 + i)}) {c.strip()}" for i, c in enumerate(choices)]
    return "\n".join(lines)


def load_gpqa_csv(path: str, seed: int = 0) -> list[dict]:
    """GPQA (official CSV) as multiple-choice rows; choices shuffled per row from `seed`."""
    if not path or not os.path.exists(path):
        raise FileNotFoundError(
            f"GPQA-Diamond CSV not found at {path!r}: it is not redistributed; download the official "
            "gpqa_diamond.csv and pass its path (eval.gpqa_csv, the env var MT_GPQA_CSV, or grade --gpqa-csv)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in GPQA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a GPQA CSV, missing columns {missing}")
        rows = []
        for i, r in enumerate(reader):
            choices = [r["Correct Answer"], r["Incorrect Answer 1"], r["Incorrect Answer 2"], r["Incorrect Answer 3"]]
            order = list(range(4))
            random.Random(f"{seed}-{i}").shuffle(order)
            shuffled = [choices[j] for j in order]
            letter = chr(65 + order.index(0))
            rows.append({"problem": format_choices(r["Question"], shuffled), "answer": letter, "solution": None,
                         "choices": shuffled, "row": i})
    return rows


# ------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str  # math | choice
    source: str  # "bundled", "gpqa_csv" or "arith"
    description: str


BENCHMARKS: dict[str, Benchmark] = {
    "math500": Benchmark("math500", "math", "bundled", "MATH-500 (500 problems)"),
    "aime24": Benchmark("aime24", "math", "bundled", "AIME 2024 I+II (30)"),
    "aime25": Benchmark("aime25", "math", "bundled", "AIME 2025 I+II (30)"),
    "amc23": Benchmark("amc23", "math", "bundled", "AMC 2023 (40)"),
    "gpqa_diamond": Benchmark("gpqa_diamond", "choice", "gpqa_csv", "GPQA-Diamond (198), from a user-supplied CSV"),
    "arith": Benchmark("arith", "math", "arith", "synthetic arithmetic, held-out split"),
}


def load_benchmark(name: str, *, gpqa_csv: str | None = None, arith_n: int = 200, arith_seed: int = 0,
                   arith_ops: int = 3, arith_digits: int = 2, arith_operators: str = "+-*") -> tuple[Benchmark, list[dict]]:
    if name not in BENCHMARKS:
        raise ValueError(f"--benchmark: unknown {name!r}; choose one of {sorted(BENCHMARKS)}")
    b = BENCHMARKS[name]
    if b.source == "bundled":
        rows, _ = load_problems(_bundled(name))
    elif b.source == "gpqa_csv":
        rows = load_gpqa_csv(gpqa_csv or os.environ.get("MT_GPQA_CSV", ""))
    else:
        from ..tasks.arith import generate

        rows = [p.to_row() for p in generate(arith_n, split="heldout", seed=arith_seed, num_ops=arith_ops,
                                             digits=arith_digits, ops=arith_operators)]
    return b, rows


# ------------------------------------------------------------------------------ prompts


def math_prompt(problem: str, tokenizer=None, *, thinking: bool = True, kind: str = "math") -> str:
    """The user turn for `problem`, rendered with the tokenizer's chat template when it has one.

    thinking: Qwen3's switch (`enable_thinking`); templates without it ignore the flag.
    kind: "math", "choice", or "arith" (the synthetic task: the bare problem and a newline, no chat
    template and no instruction, so that the tiny CPU models see short sequences).
    """
    if kind == "arith":
        return f"{problem.strip()}\n"
    instruction = CHOICE_INSTRUCTION if kind == "choice" else MATH_INSTRUCTION
    content = f"{problem.strip()}\n\n{instruction}"
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=thinking)
    return content

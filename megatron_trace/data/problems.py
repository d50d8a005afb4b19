"""Problem sets: loading, the benchmark registry, GPQA-Diamond, and prompt templates.

A problem row is `{"problem": str, "answer": str, "solution": str | None}` plus whatever else
the source carries. Training and eval sets load from local JSONL/JSON files (plain `json`, as
`datasets` would read them: one table whose columns are every key seen), or through `datasets`
(the `data` extra) from parquet files and hub names when the machine is online. Rows with a
missing or empty answer are skipped, counted and reported with the file and row number.
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


def _datasets(what: str):
    from ..extras import require

    datasets = require("datasets", "data", what)
    datasets.disable_progress_bars()
    return datasets


def _json_objects(path: str) -> list[dict]:
    """The rows of a JSON Lines file (several objects on one line are several rows), or of a file
    holding one JSON array of objects: what `datasets`' json loader accepts, with errors that name
    the line."""
    import json

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise ValueError(f"key {dup!r} appears twice")
        return dict(pairs)

    decoder = json.JSONDecoder(object_pairs_hook=no_duplicates)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            data = decoder.decode(text)
        except ValueError as exc:
            raise ValueError(f"data source {path}: not valid JSON ({exc})") from None
        where = [f"{path} item {i}" for i in range(len(data))] if isinstance(data, list) else []
        objs = data if isinstance(data, list) else [data]
    else:
        objs, where = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            pos, line = 0, line.strip()
            while pos < len(line):
                try:
                    obj, end = decoder.raw_decode(line, pos)
                except ValueError as exc:
                    raise ValueError(f"data source {path} line {n}: not valid JSON ({exc})") from None
                objs.append(obj)
                where.append(f"{path} line {n}")
                pos = end
                while pos < len(line) and line[pos].isspace():
                    pos += 1
    for obj, w in zip(objs, where):
        if not isinstance(obj, dict):
            raise ValueError(f"data source {w}: a row must be a JSON object, not {type(obj).__name__}")
    return objs


def _json_table(path: str) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a .jsonl/.json file as one table: the columns are every key in the order
    first seen, a row without a key holds None there, and a column whose values are all numbers
    with at least one float holds floats (Arrow's typing, as `datasets` loaded these files)."""
    objs = _json_objects(path)
    columns: dict[str, None] = {}
    for obj in objs:
        columns.update(dict.fromkeys(obj))
    rows = [{c: obj.get(c) for c in columns} for obj in objs]
    for c in columns:
        values = [r[c] for r in rows if r[c] is not None]
        if values and all(type(v) in (int, float) for v in values) and any(type(v) is float for v in values):
            for r in rows:
                if type(r[c]) is int:
                    r[c] = float(r[c])
    return list(columns), rows


def load_problems(source: str, *, split: str = "train", limit: int | None = None,
                  problem_key: str = "problem", answer_key: str = "answer") -> tuple[list[dict], LoadReport]:
    """Rows with non-empty answers from a local .jsonl/.json/.parquet file or a hub dataset name
    (parquet and hub names need the `data` extra)."""
    if os.path.exists(source):
        ext = os.path.splitext(source)[1].lower()
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(ext)
        if kind is None:
            raise ValueError(f"data source {source}: unsupported file type {ext!r} (use .jsonl, .json or .parquet)")
        if kind == "json":
            column_names, ds = _json_table(source)
        else:
            ds = _datasets(f"data source {source} (parquet)").load_dataset("parquet", data_files=source,
                                                                            split="train")
            column_names = ds.column_names
    elif source.startswith((".", "/")) or source.endswith((".jsonl", ".json", ".parquet")):
        raise FileNotFoundError(f"data source {source} does not exist")
    else:
        ds = _datasets(f"data source {source} (a hub dataset)").load_dataset(source, split=split)  # needs network
        column_names = ds.column_names
    for key in (problem_key, answer_key):
        if key not in column_names:
            raise ValueError(f"data source {source}: no column {key!r} (columns: {column_names})")
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
        from ..extras import require

        pq = require("pyarrow.parquet", "data", f"data source {path} (parquet)")

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


GPQA_HOW_TO = (
    "GPQA-Diamond is not redistributed (its authors ask that the questions stay out of plain text): get "
    "gpqa_diamond.csv from the authors' release (https://github.com/idavidrein/gpqa, dataset.zip; the password "
    "is in that README) and pass its path with the env var MT_GPQA_CSV=/path/gpqa_diamond.csv or the key "
    "eval.gpqa_csv=/path/gpqa_diamond.csv")


def gpqa_csv_problem(benchmarks, gpqa_csv: str | None, *, where: str = "eval.benchmarks") -> str | None:
    """Why GPQA-Diamond cannot be evaluated, or None: checked before any model is loaded, so an
    evaluation never runs for hours and then stops, and never drops the benchmark silently."""
    if "gpqa_diamond" not in benchmarks:
        return None
    path = gpqa_csv or os.environ.get("MT_GPQA_CSV", "")
    if path and os.path.isfile(path):
        return None
    others = [b for b in benchmarks if b != "gpqa_diamond"]
    found = f"{path!r} does not exist" if path else "neither eval.gpqa_csv nor MT_GPQA_CSV is set"
    return (f"{where} includes gpqa_diamond, but {found}. {GPQA_HOW_TO}. Or evaluate without it: "
            f"benchmarks=[{','.join(others)}] (the paper's headline averages the math benchmarks and GPQA-Diamond, "
            "so say so when you report a number without it)")


def load_gpqa_csv(path: str, seed: int = 0) -> list[dict]:
    """GPQA (official CSV) as multiple-choice rows; choices shuffled per row from `seed`."""
    if not path or not os.path.exists(path):
        raise FileNotFoundError(
            f"GPQA-Diamond CSV not found at {path!r}. {GPQA_HOW_TO} (or grade --gpqa-csv)")
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
                   arith_ops: int = 3, arith_digits: int = 2, arith_operators: str = "+-*",
                   arith_task: str = "arith") -> tuple[Benchmark, list[dict]]:
    if name not in BENCHMARKS:
        raise ValueError(f"--benchmark: unknown {name!r}; choose one of {sorted(BENCHMARKS)}")
    b = BENCHMARKS[name]
    if b.source == "bundled":
        rows, _ = load_problems(_bundled(name))
    elif b.source == "gpqa_csv":
        rows = load_gpqa_csv(gpqa_csv or os.environ.get("MT_GPQA_CSV", ""))
    else:
        from ..tasks import task_rows

        rows = task_rows(arith_task, arith_n, split="heldout", seed=arith_seed, num_ops=arith_ops,
                         digits=arith_digits, ops=arith_operators)
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

"""The paper's training set: math problems with reference solutions from OpenThoughts-114k.

TRACE trains on up to 30K problem-solution pairs from the math subset of OpenThoughts-114k and
selects checkpoints on a validation split of it (paper digest, "Training data"). The metadata
configuration of `open-thoughts/OpenThoughts-114k` has one row per problem with the columns
`problem`, `deepseek_reasoning`, `deepseek_solution`, `ground_truth_solution`, `domain`,
`source`, `test_cases`, `starter_code`. `prepare_openthoughts` turns it into two JSONL files with
`problem`, `solution` (the ground-truth solution), `answer` (its final boxed answer) and
`source`, which `data.source` and `eval.in_loop_source` read.

A row goes through these checks, in this order, and the first one it fails is its reason:

  corrupt          unreadable JSON line, not an object, or `problem` / `domain` /
                   `ground_truth_solution` / `source` missing or not a string (null solution and
                   null source are allowed: the first counts as no_solution, the second becomes "")
  not_math         domain is not "math"
  no_solution      empty or null ground_truth_solution
  no_boxed_answer  no \\boxed{...} / \\fbox{...} with balanced braces and a non-empty content
  duplicate        the same problem (whitespace-normalised) as an earlier kept row
  unverified       math-verify cannot grade the answer: it does not verify against its own
                   solution (graded like a policy response, in the hard-timeout pool), or it
                   parses only as a bare string (then a response could match it only by
                   spelling, not as mathematics), or the check timed out

Rows that pass everything are shuffled with `seed`; the first `num_val` become the validation
split, the next up to `max_train` the training split; the rest are counted as `unused`.
Row numbers in warnings: `FILE line N` (1-based) for JSONL, `FILE row I` (0-based) for parquet
and hub rows.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = [
    "DROP_REASONS",
    "HUB_CONFIG",
    "PrepareReport",
    "iter_source_rows",
    "prepare_openthoughts",
    "self_verify",
]

HUB_CONFIG = "metadata"
DROP_REASONS = ("corrupt", "not_math", "no_solution", "no_boxed_answer", "duplicate", "unverified")
_STRING_FIELDS = ("problem", "domain")
_NULLABLE_FIELDS = ("ground_truth_solution", "source")
MAX_WARNINGS = 20  # corrupt rows named one by one; past this, only counted


@dataclass
class PrepareReport:
    source: str
    out: str
    num_rows: int = 0
    num_train: int = 0
    num_val: int = 0
    num_unused: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def to_dict(self) -> dict:
        return {"source": self.source, "out": self.out, "rows": self.num_rows, "train": self.num_train,
                "val": self.num_val, "unused": self.num_unused, "dropped": dict(self.dropped)}


# ------------------------------------------------------------------------------ reading


def _jsonl_rows(path: str) -> Iterator[tuple[str, object]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                yield where, json.loads(line)
            except ValueError as exc:
                yield where, ValueError(f"unreadable JSON ({exc})")


def _parquet_rows(path: str) -> Iterator[tuple[str, object]]:
    pq = _pyarrow_parquet(path)

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is this file's fault
        raise ValueError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path} row {i}", row
            i += 1


def _pyarrow_parquet(path: str):
    from ..extras import require

    return require("pyarrow.parquet", "data", f"--source {path} (parquet)")


def _local_files(source: str) -> list[str]:
    if os.path.isfile(source):
        files = [source]
    else:
        files = sorted(os.path.join(source, f) for f in os.listdir(source)
                       if f.endswith((".jsonl", ".parquet")) and os.path.isfile(os.path.join(source, f)))
        if not files:
            raise ValueError(f"--source {source}: no .jsonl or .parquet files in this folder (for a downloaded "
                             f"copy of the hub dataset, pass its {HUB_CONFIG}/ folder)")
    for f in files:
        if not f.endswith((".jsonl", ".parquet")):
            raise ValueError(f"--source {f}: unsupported file type (use .jsonl or .parquet, or a folder of them)")
    return files


def iter_source_rows(source: str) -> tuple[Iterator[tuple[str, object]], int | None]:
    """(rows as (where, row-or-error), number of rows if known) from a local file/folder or the hub.

    A local path may be a .jsonl or .parquet file or a folder of them (read in sorted order, not
    recursively). Anything else that does not look like a path is a hub dataset name, loaded
    through `datasets` with the metadata configuration (needs network).
    """
    if os.path.exists(source):
        files = _local_files(source)
        total = None
        if all(f.endswith(".parquet") for f in files):
            pq = _pyarrow_parquet(files[0])

            try:
                total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
            except Exception:  # noqa: BLE001 - reported when the file is read
                total = None

        def gen():
            for f in files:
                yield from (_jsonl_rows(f) if f.endswith(".jsonl") else _parquet_rows(f))

        return gen(), total
    if source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".parquet", ".json")):
        raise FileNotFoundError(f"--source {source} does not exist")
    from ..extras import require

    datasets = require("datasets", "data", f"--source {source} (a hub dataset)")
    try:
        ds = datasets.load_dataset(source, HUB_CONFIG, split="train")
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, no such configuration, ...
        raise ValueError(f"--source {source}: not a local path, and the hub dataset's {HUB_CONFIG!r} configuration "
                         f"could not be loaded ({type(exc).__name__}: {exc})") from None
    return ((f"{source} row {i}", row) for i, row in enumerate(ds)), len(ds)


# ------------------------------------------------------------------------------ checks


def _corrupt(row: object) -> str | None:
    """Why a row is corrupt, or None."""
    if isinstance(row, Exception):
        return str(row)
    if not isinstance(row, dict):
        return f"not a JSON object but {type(row).__name__}"
    for key in _STRING_FIELDS + _NULLABLE_FIELDS:
        if key not in row:
            return f"no field {key!r}"
    for key in _STRING_FIELDS:
        if not isinstance(row[key], str):
            return f"field {key!r} is {type(row[key]).__name__}, not a string"
    for key in _NULLABLE_FIELDS:
        if row[key] is not None and not isinstance(row[key], str):
            return f"field {key!r} is {type(row[key]).__name__}, not a string"
    return None


def self_verify(solution: str, answer: str) -> str:
    """"ok", or why math-verify cannot grade `answer` (runs in a VerifyPool worker).

    The solution is graded exactly as a policy response is (`grade_math`: the last boxed answer,
    math-verify against the gold), so an answer that passes here is one the reward can give
    credit for. An answer that math-verify parses only into a string is refused too.
    """
    import logging

    from math_verify import parse

    from ..reward.math import grade_math

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    grade = grade_math(solution, answer)
    if grade != "correct":
        return f"self-grade {grade}"
    if all(isinstance(p, str) for p in parse("\\boxed{" + answer + "}", parsing_timeout=None)):
        return "parses only as a string"
    return "ok"


def _warn(msg: str, count: list[int]) -> None:
    from tqdm.auto import tqdm

    count[0] += 1
    if count[0] <= MAX_WARNINGS:
        tqdm.write(f"warning: {msg}", file=sys.stderr)  # above the progress bar, not through it


def _write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def prepare_openthoughts(source: str, out_dir: str, *, max_train: int = 30000, num_val: int = 500, seed: int = 0,
                         workers: int = 2, timeout_s: float = 5.0, progress: bool = True) -> PrepareReport:
    """Build `out_dir/train.jsonl` and `out_dir/val.jsonl` from OpenThoughts-114k metadata rows
    (see the module docstring for the checks); returns the counts."""
    from tqdm.auto import tqdm

    from ..reward.math import extract_boxed
    from ..reward.pool import TIMEOUT, VerifyPool

    if max_train < 1 or num_val < 0:
        raise ValueError(f"--max-train {max_train} must be >= 1 and --val {num_val} >= 0")
    rows, total = iter_source_rows(source)
    report = PrepareReport(source=source, out=out_dir)
    warned = [0]
    seen: set[str] = set()
    candidates: list[dict] = []
    for where, row in tqdm(rows, total=total, desc="read", unit="row", disable=not progress, file=sys.stderr):
        report.num_rows += 1
        why = _corrupt(row)
        if why is not None:
            report.dropped["corrupt"] += 1
            _warn(f"{where}: corrupt row skipped ({why})", warned)
            continue
        if row["domain"].strip().lower() != "math":
            report.dropped["not_math"] += 1
            continue
        solution = (row["ground_truth_solution"] or "").strip()
        if not solution:
            report.dropped["no_solution"] += 1
            continue
        answer = extract_boxed(solution)
        if not answer:
            report.dropped["no_boxed_answer"] += 1
            continue
        problem = row["problem"].strip()
        key = " ".join(problem.split())
        if key in seen:
            report.dropped["duplicate"] += 1
            continue
        seen.add(key)
        candidates.append({"problem": problem, "solution": solution, "answer": answer,
                           "source": row["source"] or "", "_where": where})
    if warned[0] > MAX_WARNINGS:
        print(f"warning: {warned[0] - MAX_WARNINGS} more corrupt rows skipped (not named)", file=sys.stderr)

    kept: list[dict] = []
    chunk = 256
    with VerifyPool(f"{__name__}.self_verify", num_workers=workers, timeout_s=timeout_s) as pool, \
            tqdm(total=len(candidates), desc="verify", unit="row", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(candidates), chunk):
            part = candidates[start:start + chunk]
            for r, verdict in zip(part, pool.map([(r["solution"], r["answer"]) for r in part])):
                if verdict == "ok":
                    kept.append(r)
                else:
                    report.dropped["unverified"] += 1
                    if verdict == TIMEOUT:
                        tqdm.write(f"warning: {r['_where']}: answer check timed out after {timeout_s}s, dropped",
                                   file=sys.stderr)
            bar.update(len(part))

    if len(kept) <= num_val:
        raise ValueError(f"--source {source}: only {len(kept)} usable rows, not enough for --val {num_val} plus "
                         "at least one training row")
    random.Random(seed).shuffle(kept)
    val, train = kept[:num_val], kept[num_val:num_val + max_train]
    report.num_val, report.num_train = len(val), len(train)
    report.num_unused = len(kept) - len(val) - len(train)
    os.makedirs(out_dir, exist_ok=True)
    for name, part in (("train", train), ("val", val)):
        _write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), [{k: r[k] for k in ("problem", "solution", "answer",
                                                                                 "source")} for r in part])
    return report

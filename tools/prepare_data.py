#!/usr/bin/env python
"""Build the paper's training data: math problems with reference solutions from OpenThoughts-114k.

    python tools/prepare_data.py --source open-thoughts/OpenThoughts-114k --out data/openthoughts_math
    python tools/prepare_data.py --source LOCAL.jsonl|LOCAL.parquet|FOLDER --out DIR [--max-train 30000]
        [--val 500] [--seed 0] [--workers 2] [--timeout 5]

Reads the dataset's metadata configuration (a hub name, or a local copy with its columns:
problem, ground_truth_solution, domain, source, ...), keeps math rows whose ground-truth
solution has a final \\boxed{} answer that math-verify grades against the solution itself,
drops duplicate problems, shuffles with --seed and writes DIR/val.jsonl (--val rows) and
DIR/train.jsonl (up to --max-train rows), each line {"problem", "solution", "answer", "source"}.
Prints one JSON line: the rows read, train / val / unused counts, and the dropped rows by reason
(corrupt, not_math, no_solution, no_boxed_answer, duplicate, unverified; see
megatron_trace/data/prepare.py). A corrupt row is named (file and line or row) on stderr and
skipped. Progress bars go to stderr.
"""

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True,
                   help="hub dataset name (open-thoughts/OpenThoughts-114k) or a local .jsonl/.parquet file or folder")
    p.add_argument("--out", required=True, help="output directory for train.jsonl and val.jsonl")
    p.add_argument("--max-train", type=int, default=30000, help="at most this many training rows (default 30000)")
    p.add_argument("--val", type=int, default=500, help="validation rows (default 500)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--workers", type=int, default=None,
                   help="math-verify worker processes (default: CPUs, at most 8)")
    p.add_argument("--timeout", type=float, default=5.0, help="hard time limit per answer check, seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1)

    from megatron_trace.data.prepare import prepare_openthoughts
    from megatron_trace.extras import MissingExtra

    try:
        report = prepare_openthoughts(args.source, args.out, max_train=args.max_train, num_val=args.val,
                                      seed=args.seed, workers=args.workers, timeout_s=args.timeout,
                                      progress=not args.no_progress)
    except (FileNotFoundError, ValueError, MissingExtra) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

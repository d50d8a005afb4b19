#!/usr/bin/env python
"""Merge several eval.json files into one comparison table (the paper's layout).

    python tools/merge_evals.py RUN_A/eval/X/eval.json RUN_B/eval/Y/eval.json [--out compare.md]

One row per evaluation (its model name), one column per benchmark, then the unweighted average;
the CIs and rates follow the table. Prints the Markdown; --out also writes it, plus a JSON with
every report next to it.
"""

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="eval.json files (or directories holding one)")
    p.add_argument("--out", default=None, help="write the Markdown here (and <out>.json)")
    args = p.parse_args(argv)

    from megatron_trace.eval.report import comparison_table

    reports = []
    for path in args.reports:
        f = os.path.join(path, "eval.json") if os.path.isdir(path) else path
        if not os.path.exists(f):
            print(f"error: {f} does not exist", file=sys.stderr)
            return 2
        try:
            r = json.load(open(f))
            r["benchmarks"], r["model"]  # noqa: B018
        except (ValueError, KeyError):
            print(f"error: {f} is not an eval.json (needs 'model' and 'benchmarks')", file=sys.stderr)
            return 2
        reports.append(r)
    table = comparison_table(reports)
    print(table, end="")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
            json.dump(reports, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

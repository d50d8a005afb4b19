#!/usr/bin/env python
"""Plot one or several runs' metrics.jsonl as PNGs (runs overlaid for comparison).

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] [--out DIR] [--labels a,b] [--smooth 0.6]

Writes reward.png, entropy.png, length.png, lambda.png, routes.png, exposure.png and
mismatch.png (and plots.json listing each file's panels) into --out (default: <first run>/plots).
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", default=None)
    p.add_argument("--labels", default=None, help="comma-separated labels, one per run")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA factor in [0, 1); 0 = raw")
    args = p.parse_args(argv)

    from megatron_trace.extras import MissingExtra
    from megatron_trace.observability.plots import plot_runs

    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        print(f"error: --labels has {len(labels)} names for {len(args.runs)} runs", file=sys.stderr)
        return 2
    if not 0 <= args.smooth < 1:
        print(f"error: --smooth {args.smooth} must be in [0, 1)", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.runs[0], "plots")
    try:
        manifest = plot_runs(args.runs, out, labels=labels, smooth=args.smooth)
    except (FileNotFoundError, ValueError, MissingExtra) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for f in manifest:
        print(os.path.join(out, f))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Time GRPO, TRACE (lambda > 0 at 25% coverage, and lambda = 0) and all-token FKL steps on the
same batch, in one run, and print one JSON line with the ratios to GRPO.

    python tools/bench_step.py --config configs/tiny_cpu.yaml --json [--repeats 5] [key=value ...]

Keys: ratio_trace_vs_grpo, ratio_trace_lambda0_vs_grpo, ratio_alltoken_fkl_vs_grpo (full step:
rollout through weight sync) and train_ratio_* (the training part alone), the median seconds per
stage and variant under "seconds", and "targets" (<= 1.25x, within 5%, all-token slower).
A benchmark, not a test: the numbers depend on the machine; docs/performance.md has the measured values.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny_cpu.yaml")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per variant (after one warm-up)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)

    from megatron_trace.train.bench import bench_step_job

    try:
        res = bench_step_job(args.config, args.overrides, args.repeats)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not res:
        return 0
    if not args.json:
        for v, t in res["seconds"].items():
            print(f"{v:>14}: " + "  ".join(f"{k} {x:.3f}s" for k, x in t.items()), file=sys.stderr)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

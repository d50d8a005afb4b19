#!/usr/bin/env python
"""Time one TRACE train step on long-tailed rollouts, padded vs token-budget packing, and print
one JSON line.

    python tools/bench_packing.py --json [--size tiny] [--rollouts 64] [--mean 200] [--max-len 1500]
                                         [--micro-batch-size 4] [--budget 512] [--padded-budget 2048] [--repeats 3]

Keys: padding_fraction_padded, padding_fraction_packed, time_ratio_padded_vs_packed (target
>= 1.5), the same for a token budget on length-sorted padded rows (time_ratio_padded_vs_budget_padded),
the median seconds of each layout, and the layouts' losses and grad norms (equal: the layout
never changes the numbers). A benchmark, not a test.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", help="a QWEN3_SIZES key (random weights)")
    p.add_argument("--rollouts", type=int, default=64)
    p.add_argument("--mean", type=float, default=200.0, help="mean response length (log-normal, before clipping)")
    p.add_argument("--max-len", type=int, default=1500)
    p.add_argument("--micro-batch-size", type=int, default=4, help="rollouts per padded micro-batch")
    p.add_argument("--budget", type=int, default=512, help="tokens per packed micro-batch (CPU: keep it near the "
                   "typical length, a packed row's attention is quadratic in its length here)")
    p.add_argument("--padded-budget", type=int, default=2048, help="tokens per micro-batch of the budgeted padded layout")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    if min(args.rollouts, args.max_len, args.micro_batch_size, args.budget, args.padded_budget, args.repeats) < 1 or args.mean <= 0:
        print("error: --rollouts, --max-len, --micro-batch-size, --budget, --repeats and --mean must be positive",
              file=sys.stderr)
        return 2

    from megatron_trace.models.qwen3 import QWEN3_SIZES
    from megatron_trace.train.bench_packing import bench_packing_job

    if args.size not in QWEN3_SIZES:
        print(f"error: --size {args.size!r} is not one of {sorted(QWEN3_SIZES)}", file=sys.stderr)
        return 2
    res = bench_packing_job(args.size, args.rollouts, args.mean, args.max_len, args.micro_batch_size, args.budget,
                            args.padded_budget, args.repeats, args.seed)
    if not args.json:
        print(f"padded {res['seconds_padded']:.2f}s ({res['padding_fraction_padded']:.0%} padding), "
              f"packed {res['seconds_packed']:.2f}s ({res['padding_fraction_packed']:.0%} padding): "
              f"{res['time_ratio_padded_vs_packed']:.2f}x; budgeted padded rows {res['seconds_budget_padded']:.2f}s: "
              f"{res['time_ratio_padded_vs_budget_padded']:.2f}x", file=sys.stderr)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

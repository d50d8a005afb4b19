#!/usr/bin/env python
"""Generate the same prompts with 1 and with 2 colocated `hf` engines (2 gloo ranks, one engine each,
through the rollout dispatcher) and print one JSON line with the throughputs and their ratio.

    python tools/bench_rollout.py --json [--prompts 32] [--n 4] [--max-new-tokens 64] [--repeats 3] [--size demo]

1 engine = rank 0 alone on every core (rank 1 parked in a barrier); 2 engines = cpu_count // 2
threads each. Keys: tokens_per_s_1, tokens_per_s_2, ratio_throughput_2_vs_1 (target >= 1.5 on
2 cores: target_met), seconds_1/seconds_2 (median wall seconds of one dispatch, the all-gather
included), tokens (response tokens per dispatch; EOS is off, so prompts * n * max_new_tokens),
identical_samples (every mode's samples equal token for token), the model size and settings, and
the 1-minute load average before and after. Unless --no-same-threads, a third mode times one
engine on cpu_count // 2 threads (what each of the two engines gets): tokens_per_s_1_same_threads
and ratio_throughput_2_vs_1_same_threads (the pure scale-out factor, 2.0 is perfect).
Modes run round-robin after one warm-up round; medians are reported.
A benchmark, not a test: the numbers depend on the machine and on what else runs on it.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32, help="prompts per dispatch")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response tokens per sample (EOS is off)")
    p.add_argument("--repeats", type=int, default=3, help="timed dispatches per mode (after one warm-up round)")
    p.add_argument("--size", default="demo", help="Qwen3 size of the random model (megatron_trace.models.qwen3)")
    p.add_argument("--seed", type=int, default=0, help="model, prompt and sampling seed")
    p.add_argument("--no-same-threads", action="store_true",
                   help="skip the 1-engine run on cpu_count // 2 threads")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)

    from megatron_trace.rollout.bench import bench_rollout_job

    try:
        res = bench_rollout_job(args.size, args.prompts, args.n, args.max_new_tokens, args.repeats, args.seed,
                                same_threads_baseline=not args.no_same_threads)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.json:
        lines = [f"1 engine : {res['seconds_1']:.3f}s  {res['tokens_per_s_1']:.0f} tok/s",
                 f"2 engines: {res['seconds_2']:.3f}s  {res['tokens_per_s_2']:.0f} tok/s",
                 f"ratio {res['ratio_throughput_2_vs_1']:.2f} (target >= 1.5: {res['target_met']}), "
                 f"identical samples: {res['identical_samples']}"]
        if "seconds_1_same_threads" in res:
            lines.insert(2, f"1 engine on {res['threads_per_rank_1_same_threads']} thread(s): "
                            f"{res['seconds_1_same_threads']:.3f}s  {res['tokens_per_s_1_same_threads']:.0f} tok/s "
                            f"(ratio 2 vs this: {res['ratio_throughput_2_vs_1_same_threads']:.2f})")
        print("\n".join(lines), file=sys.stderr)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train a tiny Megatron actor one step at TP/PP, sync it into a rollout engine, compare.

    python tools/check_weight_sync.py --tp N --pp M --engine hf|sglang [--device auto|cpu|cuda]

Prints one JSON line with max_abs_logit_diff (engine vs actor logits on a probe batch; null for
sglang, which exposes no logits), max_abs_logprob_diff (engine log-probs of a greedy sample vs
the actor's recomputation), sync_seconds and device. Exits 1 if a difference exceeds --tol.
On CPU it launches its own gloo ranks; on GPUs run it under torchrun with tp*pp ranks.
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--engine", default="hf", choices=["hf", "sglang"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args(argv)

    from megatron_trace.models.jobs import run_tool
    from megatron_trace.sync.check import run_check

    def job():
        res = run_check(args.tp, args.pp, args.engine, args.device, args.seed)
        if res:
            diffs = [d for d in (res["max_abs_logit_diff"], res["max_abs_logprob_diff"]) if d is not None]
            res["tol"], res["ok"] = args.tol, all(d <= args.tol for d in diffs)
        return res

    return run_tool(job)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Rerun one saved training step under another TP/PP and print its metrics.

    python tools/replay.py --config RUN/config.yaml --record RUN/records/step_000003.pt \
        [--ckpt RUN/checkpoints/step_000003] --tp 2 --pp 1 [--compare RUN/metrics.jsonl] [key=value ...]

Records come from `train.save_records=true` or `train.mode=rollout_only`. The checkpoint named
step_N holds the weights that step N started from; a record of step 0 needs none. Prints one JSON
line; with --compare it adds the max relative difference to that step's logged metrics, and exits
1 when it exceeds --tol. On CPU it launches its own gloo ranks.
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the run's resolved config.yaml")
    p.add_argument("--record", required=True, help="a records/step_N.pt file")
    p.add_argument("--ckpt", default=None, help="checkpoint the step started from (run checkpoint or model dir)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--compare", default=None, help="metrics.jsonl to compare against")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)

    from megatron_trace.models.jobs import run_tool
    from megatron_trace.train.replay import replay_job

    def job():
        res = replay_job(args.config, args.record, args.ckpt, args.tp, args.pp, args.overrides, args.compare)
        if "comparison" in res:
            res["ok"] = res["comparison"]["max_rel_diff"] <= args.tol
        return res

    return run_tool(job)


if __name__ == "__main__":
    sys.exit(main())

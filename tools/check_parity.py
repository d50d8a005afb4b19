#!/usr/bin/env python
"""Compare Megatron logits (TP/PP, gathered) with transformers' Qwen3ForCausalLM logits.

    python tools/check_parity.py --hf-dir DIR [--ckpt CKPT_DIR] --tp N --pp M [--tol 1e-4]

Prints one JSON line {"max_abs_logit_diff": x, "tp": N, "pp": M, ...}; exits 1 when the
difference exceeds --tol. Without --ckpt the Megatron model is imported from --hf-dir.
On CPU it launches its own gloo ranks. Both sides run in float32.
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--ckpt", default=None, help="megatron-trace checkpoint to test instead of importing --hf-dir")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)

    from megatron_trace.models.jobs import check_parity, run_tool

    return run_tool(check_parity, args.hf_dir, args.ckpt, args.tp, args.pp, args.batch, args.seq, args.seed,
                    args.device, tol=args.tol)

if __name__ == "__main__":
    sys.exit(main())

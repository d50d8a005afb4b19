#!/usr/bin/env python
"""Convert a megatron-trace torch_dist checkpoint into an HF directory.

    python tools/convert_megatron_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--tp N --pp M] [--dtype bfloat16]

Writes config.json, model.safetensors (sharded with an index past 5 GiB) and the tokenizer files
the checkpoint carries; `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` loads it.
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory written by megatron-trace")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load with")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load with")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (as saved)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)

    from megatron_trace.models.jobs import convert_megatron_to_hf, run_tool

    return run_tool(convert_megatron_to_hf, args.ckpt, args.out, args.tp, args.pp, args.dtype, args.device)

if __name__ == "__main__":
    sys.exit(main())

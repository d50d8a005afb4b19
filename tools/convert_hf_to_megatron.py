#!/usr/bin/env python
"""Convert an HF Qwen3 safetensors directory into a Megatron torch_dist checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir DIR --out CKPT_DIR [--tp N --pp M] [--dtype bfloat16] [--dry-run]

On CPU it spawns its own tp*pp gloo ranks; on GPUs run it under `torchrun --nproc-per-node tp*pp`.
The checkpoint reloads under any TP/PP (tools/convert_megatron_to_hf.py, the trainer).
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write with")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write with")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (the config's torch_dtype)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    args = p.parse_args(argv)

    from megatron_trace.models.jobs import convert_hf_to_megatron, run_tool

    return run_tool(convert_hf_to_megatron, args.hf_dir, args.out, args.tp, args.pp, args.dtype, args.device,
                    dry_run=args.dry_run)

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Measure whether an embedded task can show TRACE's claim, on a base model (an SFT'd HF dir).

    python tools/probe_task.py --hf-dir runs/demo/sft/hf --task product_chain --num-ops 8 [--json]

Prints one JSON object:
  greedy / sampled   held-out accuracy, and where the incorrect responses first go wrong
                     relative to the decisive step (share_at_decisive: the share at that step)
  teacher            mean log-prob of the reference tokens under the plain prompt (student) and
                     the privileged prompt (teacher), at the decisive step's result digits, at the
                     other steps' result digits and elsewhere; teacher_ahead_at_decisive is the
                     share of decisive positions where the teacher gives the reference token more
Runs on CPU in a minute or two (200 problems). See megatron_trace/tasks/probe.py.
"""

import argparse
import json
import sys


def _generate(engine, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, k: int,
              seed: int, batch: int = 32) -> list[str]:
    """k responses per prompt (prompt-major), with the trainer's own HF engine and sampler."""
    from megatron_trace.rollout import SamplingParams

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = []
    for i in range(0, len(ids), batch):
        outs = engine.generate(ids[i:i + batch], SamplingParams(n=k, temperature=temperature,
                                                                max_new_tokens=max_new_tokens, seed=seed))
        out += [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="the base model (an HF directory with its tokenizer)")
    p.add_argument("--task", default="product_chain", help="arith | product_chain")
    p.add_argument("--num-ops", type=int, default=8, help="data.arith.num_ops of the base's task")
    p.add_argument("--digits", type=int, default=1)
    p.add_argument("--ops", default="+-", help="data.arith.ops (arith only)")
    p.add_argument("--seed", type=int, default=1234,
                   help="the run's seed: it picks the held-out problems (the tiny configs' seed is 1234)")
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--samples", type=int, default=4, help="sampled responses per problem")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the demo's rollouts: 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="the demo configs' rollout.max_new_tokens; product_chain solutions reach 122 characters")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)

    import os

    if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        print(f"error: --hf-dir {args.hf_dir!r} has no config.json (train a base with `megatron-trace sft`)",
              file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_trace.data.problems import math_prompt
    from megatron_trace.rollout import HFEngine
    from megatron_trace.tasks import task_rows
    from megatron_trace.tasks.arith import verify
    from megatron_trace.tasks.probe import probe_errors, probe_teacher

    try:
        rows = task_rows(args.task, args.problems, split="heldout", seed=args.seed, num_ops=args.num_ops,
                         digits=args.digits, ops=args.ops)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    engine = HFEngine(model, tokenizer, eos_token_ids=[tokenizer.eos_token_id])
    prompts = [math_prompt(r["problem"], kind="arith") for r in rows]
    res = {"task": args.task, "hf_dir": args.hf_dir, "problems": len(rows)}
    greedy = _generate(engine, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=0.0, k=1,
                       seed=args.seed)
    res["greedy"] = {"accuracy": sum(verify(t, r["answer"]) for t, r in zip(greedy, rows)) / len(rows),
                     **probe_errors(greedy, rows, verify)}
    if args.samples:
        sampled = _generate(engine, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, k=args.samples, seed=args.seed)
        srows = [r for r in rows for _ in range(args.samples)]
        res["sampled"] = {"temperature": args.temperature, "k": args.samples,
                          "accuracy": sum(verify(t, r["answer"]) for t, r in zip(sampled, srows)) / len(srows),
                          **probe_errors(sampled, srows, verify)}
    res["teacher"] = probe_teacher(model, tokenizer, rows[:100])
    if not args.json:
        print(json.dumps(res, indent=1), file=sys.stderr)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

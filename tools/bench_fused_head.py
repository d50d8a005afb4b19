#!/usr/bin/env python
"""Time and peak memory of the LM head + loss, forward and backward from the final hidden states:
Megatron's, today's routed path, and the fused head (megatron_trace/loss/fused_head.py).

    python tools/bench_fused_head.py --json [--vocab 151936 --hidden 512 --tokens 2048 --routed-frac 0.25
                                            --tp 1 --dtype bf16 --repeats 3] [--entry-clip 0.05]
                                           [--device cpu|cuda]

On the same inputs (hidden states [T, H], this rank's weight shard [V/tp, H], targets; the routed
rows' teacher hidden states [T_kl, H]; the teacher is live, i.e. the actor's own weight):
  (a) megatron_ce: Megatron's `ColumnParallelLinear` output layer, then
      `vocab_parallel_cross_entropy` on the fp32 logits;
  (b) unfused: the same output layer, then today's routed path: log-prob + entropy of every token
      and FKL of the routed rows against the teacher's logits (student and teacher logits exist);
  (c) fused: `fused_head` given the per-token loss, the same quantities with no [T, V/tp] tensor;
      it forms the gradient in its forward, so each chunk's logits are computed once (what the
      step's update uses);
  (d) fused_recompute: `fused_head` returning per-token values; its backward recomputes each
      chunk's logits (what a caller gets without a per-token loss).
Each runs forward + backward (gradients of the hidden states and the weight). Peak memory is the
rise of peak RSS above the resident size once the inputs exist (first run, own processes, glibc's
mmap threshold pinned so that freed tensors leave RSS); time is the median of --repeats runs after
a warm-up in other processes with the default allocator. max_abs_grad_diff compares (b) with (c) and (d)
(hidden and weight gradients, same process). --tp N runs N gloo ranks; rank 0 reports.
--device cuda (one GPU per rank, NCCL; tools/gpu_smoke.sh runs it at --hidden 4096 --tokens 8192):
the tensors live on the GPU, memory is the rise of the peak CUDA allocation, timed runs are
bracketed by synchronisation.
Keys: time_ratio_fused_vs_megatron_ce, memory_ratio_fused_vs_megatron_ce (targets <= 1.3 and
<= 0.25), time_ratio_fused_vs_unfused, memory_ratio_fused_vs_unfused (target <= 0.15),
max_abs_grad_diff, and per variant seconds and peak MiB. A benchmark, not a test.
"""

import argparse
import json
import sys

VARIANTS = ("megatron_ce", "unfused", "fused", "fused_recompute")


def _rank(variant, a):

    import torch
    import torch.distributed as dist

    from megatron_trace.loss import token_divergence, token_logprob_and_entropy
    from megatron_trace.loss.fused_head import fused_head
    from megatron_trace.models.builder import padded_vocab
    from megatron_trace.parallel import initialize

    groups = initialize(tp=a["tp"], device=a["device"])
    cuda = a["device"] == "cuda"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a["dtype"]]
    tp, vocab, T, H = a["tp"], a["vocab"], a["tokens"], a["hidden"]
    torch.manual_seed(1234)
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, params_dtype=dtype, use_cpu_initialization=True,
                              perform_initialization=True)
    layer = ColumnParallelLinear(H, padded_vocab(vocab, tp), config=cfg, init_method=torch.nn.init.xavier_normal_,
                                 bias=False, gather_output=False, skip_bias_add=True)
    layer.to(dev)
    weight = layer.weight
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(T, H, generator=gen).to(dev, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (T,), generator=gen).to(dev)
    k = int(round(a["routed_frac"] * T))
    routed = torch.randperm(T, generator=gen)[:k].sort().values.to(dev)
    t_hidden = (hidden.detach()[routed] + 0.1 * torch.randn(k, H, generator=gen).to(dev, dtype))
    clip = a["entry_clip"]

    def run(v):
        hidden.grad = weight.grad = None
        if v == "megatron_ce":
            logits, _ = layer(hidden[:, None, :])  # Megatron's [s, b, h] layout
            loss = vocab_parallel_cross_entropy(logits.float(), targets[:, None]).sum()
        elif v == "unfused":
            logits = layer(hidden[:, None, :])[0][:, 0]
            with torch.no_grad():
                t_logits = layer(t_hidden[:, None, :])[0][:, 0]
            lp, _ = token_logprob_and_entropy(logits, targets, groups.tp, vocab_size=vocab)
            fkl = token_divergence(logits[routed], t_logits, "forward", groups.tp, entry_clip=clip, vocab_size=vocab)
            loss = fkl.sum() - lp.sum()
        else:
            def token_loss(bound, lp, ent, kl):
                return kl["forward"].sum() - lp.sum()

            out = fused_head(hidden, weight, targets, groups.tp, vocab_size=vocab, kl_index=routed,
                             teacher_hidden=t_hidden, teacher_weight=weight, kinds=("forward",), entry_clip=clip,
                             chunk_tokens=a["chunk_tokens"], token_loss=token_loss if v == "fused" else None)
            loss = out.loss if v == "fused" else out.fkl.sum() - out.logprob.sum()
        loss.backward()

    if variant == "check":
        run("unfused")
        ref = (hidden.grad.float().clone(), weight.grad.float().clone())
        diff = 0.0
        for v in ("fused", "fused_recompute"):
            run(v)
            diff = max(diff, (hidden.grad.float() - ref[0]).abs().max().item(),
                       (weight.grad.float() - ref[1]).abs().max().item())
        return {"max_abs_grad_diff": diff, "max_abs_grad": max(ref[0].abs().max().item(), ref[1].abs().max().item())}
    from megatron_trace.observability.membench import measure_run

    barrier = (lambda: dist.barrier(group=groups.tp)) if tp > 1 else None
    return measure_run(lambda: run(variant), a["measure"], a["repeats"], cuda=cuda, barrier=barrier)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from megatron_trace.observability.membench import add_common_args, check_common_args

    add_common_args(p, VARIANTS)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--entry-clip", type=float, default=None, help="per-entry KL clip (default none, as the recipes)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="fused chunk (default: automatic)")
    args = p.parse_args(argv)
    variants, err = check_common_args(args, VARIANTS)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name in ("vocab", "hidden", "tokens", "tp", "repeats"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2

    from megatron_trace.observability.membench import measure_variants
    from megatron_trace.parallel import run_on_ranks

    a = {k: getattr(args, k) for k in ("vocab", "hidden", "tokens", "routed_frac", "tp", "dtype", "repeats",
                                       "entry_clip", "chunk_tokens", "device")}
    res = dict(a)
    res.update(measure_variants(_rank, args.tp, variants, lambda measure: ({**a, "measure": measure},),
                                quiet=args.json))
    if "unfused" in res and "fused" in res and "fused_recompute" in res:
        res.update(run_on_ranks(_rank, args.tp, "check", {**a, "measure": "check"})[0])
    for fused in ("fused", "fused_recompute"):
        for base in ("megatron_ce", "unfused"):
            if base in res and fused in res:
                res[f"time_ratio_{fused}_vs_{base}"] = round(res[fused]["time_s"] / res[base]["time_s"], 3)
                res[f"memory_ratio_{fused}_vs_{base}"] = round(res[fused]["peak_mem_mib"] / res[base]["peak_mem_mib"],
                                                               3)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

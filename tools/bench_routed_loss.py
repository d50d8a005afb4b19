#!/usr/bin/env python
"""Time and peak memory of the routed loss path vs Megatron's CE and a naive full-vocab reference.

    python tools/bench_routed_loss.py --vocab 151936 --tokens 2048 --routed-frac 0.25 --tp 1 [--dtype bf16] --json
                                      [--device cpu|cuda]

Measured in the same run, each in a fresh set of processes (forward + backward):
  (a) megatron_ce: Megatron's `vocab_parallel_cross_entropy` on the logits;
  (b) routed: our log-prob + entropy on all tokens and FKL (entry clip 0.05) on the routed rows;
  (c) naive: gather the full vocabulary, then torch.nn.functional log-softmax/entropy/KL.
Peak memory is the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs)
above the resident size after the inputs exist, measured on the first run in its own processes
with glibc's mmap threshold pinned so that freed tensors leave RSS. Time is the median of
--repeats runs after one warm-up, in separate processes with the default allocator. With --tp N every
variant runs on N gloo ranks; rank 0's numbers are reported.

--device cuda (one GPU per rank, NCCL; tools/gpu_smoke.sh runs it): the tensors live on the GPU,
peak memory is the rise of torch.cuda.max_memory_allocated above the allocation once the inputs
exist, and each timed run is bracketed by torch.cuda.synchronize().
"""

import argparse
import json
import sys

VARIANTS = ("megatron_ce", "routed", "naive")


def _bench_rank(variant, vocab, tokens, routed_frac, tp, dtype_name, repeats, chunk_size, measure, device="cpu"):
    import torch
    import torch.distributed as dist

    from megatron_trace.loss import token_divergence, token_logprob_and_entropy
    from megatron_trace.models.builder import padded_vocab
    from megatron_trace.parallel import initialize

    groups = initialize(tp=tp, device=device)
    cuda = device == "cuda"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    v_pad = padded_vocab(vocab, tp)
    width = v_pad // tp
    rank = groups.tp_rank
    gen = torch.Generator().manual_seed(1234 + rank)
    logits = (torch.randn(tokens, width, generator=gen) * 2).to(dev, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(7)).to(dev)
    n_routed = int(round(routed_frac * tokens))
    routed = torch.randperm(tokens, generator=torch.Generator().manual_seed(8))[:n_routed].sort().values.to(dev)
    teacher = (torch.randn(n_routed, width, generator=gen) * 2).to(dev, dtype)

    def run():
        logits.grad = None
        if variant == "megatron_ce":
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

            loss = vocab_parallel_cross_entropy(logits, targets).sum()
        elif variant == "routed":
            lp, _ = token_logprob_and_entropy(logits, targets, groups.tp, vocab_size=vocab, chunk_size=chunk_size)
            fkl = token_divergence(logits[routed], teacher, "forward", groups.tp, entry_clip=0.05,
                                   vocab_size=vocab, chunk_size=chunk_size)
            loss = fkl.sum() - lp.sum()
        else:
            full = logits
            full_t = teacher
            if tp > 1:
                import torch.distributed.nn.functional as dnn

                full = torch.cat(dnn.all_gather(logits, group=groups.tp), dim=-1)
                parts = [torch.empty_like(teacher) for _ in range(tp)]
                dist.all_gather(parts, teacher, group=groups.tp)
                full_t = torch.cat(parts, dim=-1)
            z = full.float()[:, :vocab]
            logq = torch.log_softmax(z, -1)
            lp = logq.gather(1, targets[:, None])[:, 0]
            _ = -(logq.exp() * logq).sum(-1)  # entropy metric, as (b) computes it
            logp = torch.log_softmax(full_t.float()[:, :vocab], -1)
            terms = torch.clamp(logp.exp() * (logp - logq[routed]), max=0.05)
            loss = terms.sum() - lp.sum()
        loss.backward()
        return loss

    from megatron_trace.observability.membench import measure_run

    barrier = (lambda: dist.barrier(group=groups.tp)) if tp > 1 else None
    return measure_run(run, measure, repeats, cuda=cuda, barrier=barrier)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from megatron_trace.observability.membench import add_common_args, check_common_args

    add_common_args(p, VARIANTS)
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: automatic)")
    args = p.parse_args(argv)
    variants, err = check_common_args(args, VARIANTS)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from megatron_trace.observability.membench import measure_variants

    res = {"vocab": args.vocab, "tokens": args.tokens, "routed_frac": args.routed_frac, "tp": args.tp,
           "dtype": args.dtype, "repeats": args.repeats, "device": args.device}
    res.update(measure_variants(_bench_rank, args.tp, variants, lambda measure: (
        args.vocab, args.tokens, args.routed_frac, args.tp, args.dtype, args.repeats, args.chunk_size, measure,
        args.device), quiet=args.json))
    if "megatron_ce" in res and "routed" in res:
        res["time_ratio_routed_vs_megatron_ce"] = round(res["routed"]["time_s"] / res["megatron_ce"]["time_s"], 3)
        res["mem_ratio_routed_vs_megatron_ce"] = round(
            res["routed"]["peak_mem_mib"] / res["megatron_ce"]["peak_mem_mib"], 3)
    if "naive" in res and "routed" in res:
        res["mem_ratio_naive_vs_routed"] = round(res["naive"]["peak_mem_mib"] / res["routed"]["peak_mem_mib"], 3)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

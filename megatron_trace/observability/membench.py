"""Peak-memory and time measurement shared by the loss benchmarks (tools/bench_routed_loss.py,
tools/bench_fused_head.py): every variant runs in fresh processes, memory first, then time.

Memory (CPU) is the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs)
above the resident size once the inputs exist, measured with glibc's mmap threshold pinned so
that freed tensors leave RSS (otherwise peak-RSS deltas undercount). Timing runs use the default
allocator, as training does. On CUDA (`--device cuda`) memory is the rise of
torch.cuda.max_memory_allocated above the allocation once the inputs exist, and each timed run is
bracketed by torch.cuda.synchronize() (`measure_run`).
"""

from __future__ import annotations

import os
import re
import sys

__all__ = ["add_common_args", "check_common_args", "measure_run", "measure_variants", "median_seconds",
           "peak_cuda_rise", "peak_rss_rise", "rss_kib"]


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def peak_rss_rise(fn) -> float:
    """MiB by which the peak RSS rises above the current RSS while `fn()` runs."""
    import gc

    gc.collect()
    base = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn()
    return (rss_kib("VmHWM") - base) / 1024


def peak_cuda_rise(fn) -> float:
    """MiB by which the peak CUDA allocation rises above the current allocation while `fn()` runs."""
    import gc

    import torch

    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_run(run, measure: str, repeats: int, *, cuda: bool = False, barrier=None) -> dict:
    """One variant's figure in this process: {"peak_mem_mib"} (measure == "memory") or {"time_s"},
    the median of `repeats` timed calls after a warm-up. barrier: called before each timed call
    (e.g. a TP barrier, so ranks start together)."""
    if measure == "memory":
        return {"peak_mem_mib": peak_cuda_rise(run) if cuda else peak_rss_rise(run)}
    import torch

    def before():
        if barrier is not None:
            barrier()
        if cuda:
            torch.cuda.synchronize()

    return {"time_s": median_seconds(run, repeats, before=before, after=torch.cuda.synchronize if cuda else None)}


def measure_variants(job, tp: int, variants, make_args, *, quiet: bool = False) -> dict:
    """{variant: {peak_mem_mib, time_s}}: `job(variant, *make_args(measure))` on `tp` ranks for
    measure "memory" then "time" (rank 0's dict is kept), each in its own processes."""
    from ..parallel import run_on_ranks

    res = {}
    for v in variants:
        if not quiet:
            print(f"[bench] {v} ...", file=sys.stderr)
        out = {}
        for measure in ("memory", "time"):
            if measure == "memory":
                os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
            else:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
            # fresh interpreters: the allocator reads MALLOC_MMAP_THRESHOLD_ when a process starts
            out.update(run_on_ranks(job, tp, v, *make_args(measure), start_method="spawn")[0])
        res[v] = {k: round(x, 4) for k, x in out.items()}
    os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    return res


def median_seconds(fn, repeats: int, *, before=None, after=None) -> float:
    """Median wall time of `repeats` calls of `fn` after one warm-up call. `before` runs before
    each call, untimed (e.g. a barrier); `after` runs inside the timed span (e.g. a device sync)."""
    import gc
    import statistics
    import time

    times = []
    for i in range(repeats + 1):
        gc.collect()
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        if after is not None:
            after()
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add_common_args(p, variants) -> None:
    """The loss benchmarks' shared flags: sizes, layout, dtype, repeats, variants, --json."""
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--routed-frac", type=float, default=0.25)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(variants), help="comma list of " + ",".join(variants))
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: gloo ranks, peak RSS (default); cuda: one GPU per rank, peak CUDA allocation")


def check_common_args(args, variants) -> tuple[list[str], str | None]:
    """(the chosen variants, an error message naming the flag or None)."""
    chosen = args.variants.split(",")
    if not 0 <= args.routed_frac <= 1:
        return chosen, f"--routed-frac must be in [0, 1], got {args.routed_frac}"
    if bad := [v for v in chosen if v not in variants]:
        return chosen, f"unknown --variants {bad}; choose from {tuple(variants)}"
    return chosen, None

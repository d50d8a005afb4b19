"""Peak-memory and time measurement shared by the loss benchmarks (tools/bench_routed_loss.py,
tools/bench_fused_head.py): every variant runs in fresh processes, memory first, then time.

Memory (CPU) is the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs)
above the resident size once the inputs exist, measured with glibc's mmap threshold pinned so
that freed tensors leave RSS (otherwise peak-RSS deltas undercount). Timing runs use the default
allocator, as training does.
"""

from __future__ import annotations

import os
import re
import sys

__all__ = ["measure_variants", "peak_rss_rise", "rss_kib"]


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
            out.update(run_on_ranks(job, tp, v, *make_args(measure))[0])
        res[v] = {k: round(x, 4) for k, x in out.items()}
    os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    return res

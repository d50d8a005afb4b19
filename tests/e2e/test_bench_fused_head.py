"""Smoke run of the fused-head benchmark (tiny sizes, 2 gloo ranks): all four variants run, the
fused gradients (eager and recomputing) equal the unfused ones, and the JSON has the documented
keys."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


def _bench(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench_fused_head.py"), "--json", *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.dist
def test_bench_fused_head_prints_ratios_at_tp2():
    proc = _bench("--vocab", "1001", "--hidden", "32", "--tokens", "48", "--tp", "2", "--dtype", "fp32",
                  "--repeats", "1", "--chunk-tokens", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]
    res = json.loads(lines[0])
    assert (res["vocab"], res["tp"], res["tokens"], res["chunk_tokens"]) == (1001, 2, 48, 16)
    for v in ("megatron_ce", "unfused", "fused", "fused_recompute"):
        assert res[v]["time_s"] > 0 and res[v]["peak_mem_mib"] >= 0, v
    for fused in ("fused", "fused_recompute"):
        for base in ("megatron_ce", "unfused"):
            assert res[f"time_ratio_{fused}_vs_{base}"] == round(res[fused]["time_s"] / res[base]["time_s"], 3)
            assert res[f"memory_ratio_{fused}_vs_{base}"] >= 0
    # fp32: the fused gradients (hidden and weight, rank 0's shard) equal the unfused path's
    assert res["max_abs_grad"] > 0 and res["max_abs_grad_diff"] <= 1e-5 * res["max_abs_grad"]


def test_bench_fused_head_rejects_bad_settings():
    proc = _bench("--routed-frac", "2")
    assert proc.returncode == 2 and "--routed-frac" in proc.stderr and proc.stdout == ""
    proc = _bench("--variants", "fused,magic")
    assert proc.returncode == 2 and "magic" in proc.stderr

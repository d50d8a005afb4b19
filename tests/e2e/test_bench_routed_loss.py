"""Smoke run of the loss benchmark (tiny sizes): it runs all three variants and prints its JSON."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.dist
def test_bench_prints_ratios():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "bench_routed_loss.py"), "--vocab", "1000", "--tokens", "64",
         "--routed-frac", "0.25", "--tp", "1", "--dtype", "bf16", "--repeats", "1", "--json"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for v in ("megatron_ce", "routed", "naive"):
        assert res[v]["time_s"] > 0 and res[v]["peak_mem_mib"] >= 0
    for k in ("time_ratio_routed_vs_megatron_ce", "mem_ratio_routed_vs_megatron_ce", "mem_ratio_naive_vs_routed"):
        assert k in res

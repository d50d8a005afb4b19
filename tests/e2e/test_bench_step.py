"""tools/bench_step.py runs all four variants on one batch and reports the documented keys.
(A smoke test of the benchmark's mechanics; timings are not asserted.)"""

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("dp", [1, 2], ids=["dp1", "dp2"])
def test_bench_step_reports_ratios_and_coverage(dp):
    out = subprocess.run([sys.executable, "tools/bench_step.py", "--config", "configs/tiny_cpu.yaml", "--json",
                          "--repeats", "1", "rollout.max_new_tokens=12", "rollout.prompts_per_step=2",
                          f"parallel.dp={dp}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["dp"] == dp and res["world"] == dp
    for key in ("ratio_trace_vs_grpo", "ratio_trace_lambda0_vs_grpo", "ratio_alltoken_fkl_vs_grpo",
                "train_ratio_trace_vs_grpo", "train_ratio_trace_lambda0_vs_grpo", "train_ratio_alltoken_fkl_vs_grpo"):
        assert res[key] > 0, key
    sec = res["seconds"]
    assert set(sec) == {"grpo", "trace", "trace_lambda0", "alltoken_fkl"}
    # The teacher runs exactly for the variants with lambda > 0; coverage is what the variant says.
    assert sec["grpo"]["teacher"] == sec["trace_lambda0"]["teacher"] == 0.0
    assert sec["trace"]["teacher"] > 0 and sec["alltoken_fkl"]["teacher"] > 0
    assert 0.15 <= res["coverage"]["trace"] <= 0.35 and res["coverage"]["alltoken_fkl"] == 1.0
    assert set(res["targets"]) == {"trace_le_1.25x_grpo", "trace_lambda0_within_5pct", "alltoken_fkl_slower_than_trace"}

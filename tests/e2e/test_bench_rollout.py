"""tools/bench_rollout.py generates the same prompts with 1 and 2 colocated engines and reports the
documented keys. (A smoke test of the benchmark's mechanics; the speed target is not asserted.)"""

import json
import math
import subprocess
import sys


def test_bench_rollout_reports_throughputs_and_identical_samples():
    out = subprocess.run([sys.executable, "tools/bench_rollout.py", "--json", "--size", "tiny", "--prompts", "4",
                          "--n", "2", "--max-new-tokens", "6", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout[-2000:]  # --json: nothing but the JSON line on stdout
    res = json.loads(lines[0])
    for key in ("size", "prompts", "n", "max_new_tokens", "repeats", "seconds_1", "seconds_2", "tokens",
                "tokens_per_s_1", "tokens_per_s_2", "ratio_throughput_2_vs_1", "target_met", "identical_samples"):
        assert key in res, key
    assert (res["size"], res["prompts"], res["n"], res["max_new_tokens"], res["repeats"]) == ("tiny", 4, 2, 6, 1)
    # EOS is off: every sample runs to max_new_tokens, in every mode.
    assert res["tokens"] == res["tokens_2"] == 4 * 2 * 6 and res["tokens_equal"] is True
    assert res["identical_samples"] is True
    assert res["max_abs_logprob_diff"] < 1e-4
    # Both engines of the 2-engine mode did work; the two engines split the cores.
    assert all(v > 0 for v in res["tokens_per_engine_2"].values()) and len(res["tokens_per_engine_2"]) == 2
    assert res["threads_per_rank_2"] == res["threads_per_rank_1_same_threads"] <= res["threads_per_rank_1"]
    assert res["ratio_throughput_2_vs_1_same_threads"] > 0
    for key in ("seconds_1", "seconds_2", "tokens_per_s_1", "tokens_per_s_2", "ratio_throughput_2_vs_1"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert isinstance(res["target_met"], bool)


def test_bench_rollout_rejects_bad_settings():
    out = subprocess.run([sys.executable, "tools/bench_rollout.py", "--json", "--prompts", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "prompts >= 2" in out.stderr and out.stdout == ""

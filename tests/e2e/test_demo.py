"""`megatron-trace demo` end to end with a tiny budget: SFT base -> TRACE RL -> held-out eval of
both on the same problems, the report with a paired CI, plots; a rerun reuses every stage.
(The full-budget demo and its measured gain are in README/LOG; this checks the mechanics.)"""

import json
import subprocess
import sys

import pytest

TINY = ["sft.steps=4", "sft.batch_size=8", "sft.heldout=0", "train.steps=2", "checkpoint.every=2",
        "rollout.prompts_per_step=2", "rollout.max_new_tokens=12", "eval.every=0", "eval.arith_n=6", "eval.k=2",
        "eval.max_new_tokens=12", "log.progress=false"]


@pytest.mark.dist
def test_demo_pipeline_and_report(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "megatron_trace.cli", "demo", "--out", str(out), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "demo_report.json").read_text())
    for key in ("base_accuracy", "final_accuracy", "accuracy_gain_ci95", "num_heldout", "wall_seconds"):
        assert key in report, key
    lo, hi = report["accuracy_gain_ci95"]
    assert report["num_heldout"] == 6 and lo <= report["final_accuracy"] - report["base_accuracy"] <= hi
    assert report["variant"] == "trace_fkl"  # the demo config's variant
    assert "| base (SFT) |" in proc.stdout and "| trace_fkl |" in proc.stdout
    assert (out / "plots" / "reward.png").stat().st_size > 1000
    base = [json.loads(x) for x in (out / "eval_base" / "samples.jsonl").read_text().splitlines()]
    final = [json.loads(x) for x in (out / "eval_trace_fkl" / "samples.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in base] == [(r["index"], r["sample"]) for r in final]  # same problems
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # everything cached now
    assert again.returncode == 0 and json.loads((out / "demo_report.json").read_text())["final_accuracy"] == \
        report["final_accuracy"]

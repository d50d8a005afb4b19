"""Sweep cells end to end on CPU without Slurm: `launch/sweep.py --executor local` runs
`megatron-trace cell` for each (an SFT base shared by the variants of one size and seed, training
with the best checkpoint kept, the evaluation of checkpoints/best on every held-out problem), a
rerun skips the finished cells, `megatron-trace report` reads them; a failing stage leaves FAILED."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

SMALL = ["sft.steps=20", "sft.batch_size=8", "sft.heldout=0", "data.arith.num_ops=1", "data.arith.num_train=50",
         "train.steps=2", "checkpoint.every=1", "eval.every=1", "eval.limit=2", "eval.arith_n=5", "eval.k=2",
         "rollout.prompts_per_step=2", "rollout.n=4", "rollout.max_new_tokens=24", "eval.max_new_tokens=24",
         "train.key_token_lift=0", "log.progress=false"]


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_local_sweep_trains_evaluates_best_shares_the_base_and_skips_on_a_rerun(tmp_path):
    sweep = ["launch/sweep.py", "--config", "configs/tiny_scaling.yaml", "--sft-config", "configs/tiny_cpu_sft.yaml",
             "--sizes", "demo-s", "--variants", "grpo,trace_fkl", "--executor", "local", *SMALL,
             f"run.dir={tmp_path / 'cell'}"]
    first = _run(*sweep)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    out = first.stdout + first.stderr
    assert "[sweep] scaling_demo-s_grpo: new" in out and "[sweep] scaling_demo-s_trace_fkl: done" in out
    assert "SFT base trained" in out and "SFT base reused" in out  # one base for the size and seed
    for variant in ("grpo", "trace_fkl"):
        run = tmp_path / f"cell_demo-s_{variant}"
        report = json.loads((run / "eval" / "best" / "eval.json").read_text())
        assert report["benchmarks"]["arith"]["num_problems"] == 5  # eval.limit lifted: every held-out problem
        best = os.path.realpath(run / "checkpoints" / "best")
        assert report["checkpoint"] == best and os.path.basename(best).startswith("step_")
        assert f"variant: {variant}" in (run / "config.yaml").read_text()
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert [(c["size"], c["variant"], c["run_dir"]) for c in manifest["cells"]] == [
        ("demo-s", "grpo", "cell_demo-s_grpo"), ("demo-s", "trace_fkl", "cell_demo-s_trace_fkl")]
    again = _run(*sweep, timeout=300)
    assert again.returncode == 0 and "every cell is finished (2); nothing to submit" in again.stdout, again.stderr
    assert again.stderr.count("finished: eval/best/eval.json exists") == 2
    rep = _run("-m", "megatron_trace.cli", "report", str(tmp_path), "--out", str(tmp_path / "report"), timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "2 runs, 0 without an evaluation" in rep.stdout and "| demo-s | 204K |" in rep.stdout


def test_a_failing_stage_leaves_failed_for_the_report(tmp_path):
    run = tmp_path / "never_trained"
    proc = _run("-m", "megatron_trace.cli", "cell", "--config", "configs/tiny_scaling.yaml", "--stage", "eval",
                *SMALL, f"run.dir={run}", timeout=300)
    assert proc.returncode == 2 and "checkpoints/best does not exist" in proc.stderr
    first = (run / "FAILED").read_text().splitlines()[0]
    assert first.startswith("eval best failed: FileNotFoundError")

    from megatron_trace.report.runs import failure_reason

    assert failure_reason(str(run), {}, [], "best") == first

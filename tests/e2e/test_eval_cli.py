"""In-loop evaluation and `megatron-trace eval` agree: evaluating the saved checkpoint of a step
with the same config and seed reproduces the in-loop samples and numbers exactly."""

import json
import subprocess
import sys

import pytest

from megatron_trace.parallel import run_on_ranks

OVERRIDES = ["rollout.max_new_tokens=12", "rollout.prompts_per_step=2", "optim.lr=0.05", "optim.optimizer=sgd",
             "log.tensorboard=false", "log.progress=false", "checkpoint.every=2", "eval.every=2", "eval.limit=6",
             "eval.k=2", "eval.max_new_tokens=16", "eval.temperature=1.0"]


def _train(rundir):
    from megatron_trace.config import load_config
    from megatron_trace.train.loop import train
    from megatron_trace.train.setup_run import setup_run

    run = setup_run(load_config("configs/tiny_cpu.yaml", [f"run.dir={rundir}", *OVERRIDES]))
    history = train(run, steps=2)
    run.close()
    return history


@pytest.mark.dist
def test_cli_eval_of_a_checkpoint_reproduces_the_in_loop_eval(tmp_path):
    run = tmp_path / "run"
    history = run_on_ranks(_train, 1, str(run))[0]
    assert "eval/arith/avg@k" not in history[0]
    m = history[1]
    assert 0.0 <= m["eval/arith/avg@k"] <= 1.0 and m["eval/arith/mean_length"] > 0 and m["time/eval"] > 0
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])
    assert logged["eval/average"] == m["eval/average"]

    out = subprocess.run([sys.executable, "-m", "megatron_trace.cli", "eval", "--config", str(run / "config.yaml"),
                          "--ckpt", str(run / "checkpoints" / "step_000002"), "--out", str(tmp_path / "ev"),
                          "--name", "step2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| step2 |" in out.stdout
    in_loop = [json.loads(x) for x in (run / "eval" / "step_000002" / "samples.jsonl").read_text().splitlines()]
    cli = [json.loads(x) for x in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert len(cli) == 6 * 2 and [r["response"] for r in cli] == [r["response"] for r in in_loop]
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert rep["benchmarks"]["arith"]["avg@k"] == m["eval/arith/avg@k"]
    assert rep["benchmarks"]["arith"]["mean_length"] == m["eval/arith/mean_length"]

    # two engines (parallel.dp=2): the problems are split between them, the samples are the same
    out = subprocess.run([sys.executable, "-m", "megatron_trace.cli", "eval", "--config", str(run / "config.yaml"),
                          "--ckpt", str(run / "checkpoints" / "step_000002"), "--out", str(tmp_path / "ev2"),
                          "--name", "step2", "parallel.dp=2", "eval.batch_prompts=6"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    dp2 = [json.loads(x) for x in (tmp_path / "ev2" / "samples.jsonl").read_text().splitlines()]
    assert [r["response"] for r in dp2] == [r["response"] for r in cli]

    bad = subprocess.run([sys.executable, "-m", "megatron_trace.cli", "eval", "--config", str(run / "config.yaml"),
                          "--ckpt", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing" in bad.stderr

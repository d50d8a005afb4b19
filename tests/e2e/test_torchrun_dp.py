"""`torchrun --nproc-per-node 2 ... megatron-trace train ... parallel.tp=1` runs with dp=2: the
CLI derives dp from WORLD_SIZE, both replicas generate with their own engine, and a parallel.dp
that disagrees with WORLD_SIZE is refused with the key named."""

import json
import os
import subprocess
import sys

import pytest

OVERRIDES = ["train.steps=2", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8",
             "log.tensorboard=false", "log.progress=false", "eval.every=0", "parallel.tp=1"]


def _torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatron_trace.cli", "train", "--config", "configs/tiny_cpu.yaml", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.dist
def test_torchrun_two_ranks_trains_with_dp2(tmp_path):
    out = _torchrun([f"run.dir={tmp_path / 'run'}", *OVERRIDES])
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["dispatch/engines_used"] == 2 for r in rows)  # one engine per replica, both used
    assert all(r["train/num_rollouts"] == 4 for r in rows)  # the global batch, whatever dp is

    bad = _torchrun([f"run.dir={tmp_path / 'bad'}", *OVERRIDES, "parallel.dp=4"])
    assert bad.returncode != 0 and "parallel.dp" in bad.stderr and "WORLD_SIZE=2" in bad.stderr

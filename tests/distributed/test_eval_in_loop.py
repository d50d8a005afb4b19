"""In-loop evaluation at dp=2 is a collective over every replica's engine: on a step that is also
a checkpoint step, rank 0 drives the harness while both replicas' engines generate (the other rank
serves rank 0's requests over gloo instead of waiting in the checkpoint's barrier), and the
samples equal those of the dp=1 run (per-problem seeds)."""

import json
import os

import pytest

from megatron_trace.parallel import run_on_ranks

pytestmark = pytest.mark.dist

OVERRIDES = ["train.steps=1", "checkpoint.every=1", "eval.every=1", "eval.limit=6", "eval.k=2",
             "eval.max_new_tokens=12", "eval.batch_prompts=6", "rollout.max_new_tokens=12",
             "rollout.prompts_per_step=4", "rollout.n=2", "optim.lr=0.05", "optim.optimizer=sgd",
             "optim.micro_batch_size=4", "log.tensorboard=false", "log.progress=false"]


def _rank(dp, rundir):
    import torch.distributed as dist

    from megatron_trace.config import load_config
    from megatron_trace.train.loop import train
    from megatron_trace.train.setup_run import setup_run

    cfg = load_config("configs/tiny_cpu.yaml", [f"parallel.dp={dp}", f"run.dir={rundir}", *OVERRIDES])
    run = setup_run(cfg)
    history = train(run)
    run.close()
    return dist.get_rank(), history


def _samples(rundir):
    path = os.path.join(rundir, "eval", "step_000001", "samples.jsonl")
    rows = [json.loads(line) for line in open(path)]
    return sorted((r["benchmark"], r["index"], r["sample"], r["response"], r["grade"]) for r in rows)


def test_dp2_in_loop_eval_uses_both_engines_and_equals_dp1(tmp_path):
    one, two = str(tmp_path / "dp1"), str(tmp_path / "dp2")
    (_, h1), = run_on_ranks(_rank, 1, 1, one, timeout_s=300)
    res = run_on_ranks(_rank, 2, 2, two, timeout_s=300)
    h2 = dict(res)[0]
    assert not any(k.startswith("eval/") for k in dict(res)[1][0])  # the other rank served rank 0's evaluation
    m1, m2 = h1[0], h2[0]
    assert m1["eval/dispatch/engines_used"] == 1 and m2["eval/dispatch/engines_used"] == 2
    assert m2["eval/dispatch/failed_prompts"] == 0 and m2["eval/dispatch/requests"] >= 2
    assert m2["eval/arith/avg@k"] == m1["eval/arith/avg@k"]
    s1, s2 = _samples(one), _samples(two)
    assert len(s1) == 6 * 2 and s2 == s1
    for d in (one, two):  # the evaluated step is a checkpoint step, and its checkpoint was written
        assert os.path.isdir(os.path.join(d, "checkpoints", "step_000001"))

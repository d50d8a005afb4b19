"""checkpoint.keep_best in a real run: the best in-loop eval's step is checkpointed (off the
checkpoint.every cadence too, once on it), `checkpoints/best` names it although keep_last=1
prunes its neighbours, a resumed run keeps it against worse evals and replaces it with a better
one, and `megatron-trace eval --ckpt RUN/checkpoints/best` evaluates the step it names.

The tiny random policy scores a flat 0 on the held-out set, so the real evaluation runs and its
`eval/average` is then replaced by a scripted curve (per weights step)."""

import json
import os
import subprocess
import sys

import pytest

from megatron_trace.parallel import run_on_ranks

pytestmark = pytest.mark.dist

OVERRIDES = ["rollout.max_new_tokens=8", "rollout.prompts_per_step=2", "rollout.n=2", "optim.lr=0.05",
             "optim.optimizer=sgd", "log.tensorboard=false", "log.progress=false", "eval.every=1", "eval.limit=2",
             "eval.k=1", "eval.max_new_tokens=8", "checkpoint.every=2", "checkpoint.keep_last=1",
             "checkpoint.keep_best=true"]
# weights step -> eval/average: 1 is a best off the cadence, 2 a better one on it, 3 ties it, 4 is NaN;
# after the resume at 6, 7 is worse than 2 (kept) and 8 beats it.
CURVE = {1: 0.2, 2: 0.5, 3: 0.5, 4: float("nan"), 5: 0.1, 6: 0.3, 7: 0.4, 8: 0.9}


def _train(rundir, steps):
    from megatron_trace.config import load_config
    from megatron_trace.train import loop
    from megatron_trace.train.setup_run import setup_run

    real_eval, real_save = loop.evaluate_in_loop, loop.save_run_checkpoint
    saved = []

    def scripted_eval(run, weights_step):
        return {**real_eval(run, weights_step), "eval/average": CURVE[weights_step]}

    def counted_save(run, next_step, *args, **kwargs):
        saved.append(next_step)
        return real_save(run, next_step, *args, **kwargs)

    loop.evaluate_in_loop, loop.save_run_checkpoint = scripted_eval, counted_save
    run = setup_run(load_config("configs/tiny_cpu.yaml", [f"run.dir={rundir}", *OVERRIDES]))
    history = loop.train(run, steps=steps)
    run.close()
    return run.start_step, history, saved  # the step it started (resumed) at


def _ckpts(rundir):
    return sorted(os.listdir(os.path.join(rundir, "checkpoints")))


def test_keep_best_survives_pruning_and_resume_and_evaluates(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    start, history, saved = run_on_ranks(_train, 1, str(run), 6)[0]
    assert start == 0 and len(history) == 6
    assert saved == [1, 2, 4, 6]  # the bests at 1 and 2 (2 once), then the cadence
    assert _ckpts(run) == ["best", "best.json", "latest", "step_000002", "step_000006"]
    best = json.loads((root / "best.json").read_text())
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    values = {r["step"] + 1: r["eval/average"] for r in logged}
    top = max(v for v in values.values() if v == v)  # NaN never counts; the first of ties does
    assert (best["metric"], best["value"]) == ("eval/average", top)
    assert best["step"] == min(s for s, v in values.items() if v == top)
    assert best["step"] == 2 and best["history"] == [{"step": 1, "value": 0.2}, {"step": 2, "value": 0.5}]
    assert os.readlink(root / "best") == "step_000002" and (root / "latest").read_text() == "step_000006"
    state = json.loads((root / "best" / "trainer_state.json").read_text())
    assert state["next_step"] == 2 and os.path.isdir(root / "best" / "optimizer")

    # `megatron-trace eval --ckpt RUN/checkpoints/best`: the step the link names, recorded in the report
    out = subprocess.run([sys.executable, "-m", "megatron_trace.cli", "eval", "--config", str(run / "config.yaml"),
                          "--ckpt", str(root / "best"), "limit=1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| best (step_000002) |" in out.stdout and "is " + str(root / "step_000002") in out.stdout
    rep = json.loads((run / "eval" / "best" / "eval.json").read_text())
    assert rep["checkpoint"] == str(root / "step_000002") and rep["benchmarks"]["arith"]["num_problems"] == 1

    # resume from latest (step 6): the restored best (0.5) outlasts 0.4 at 7; 0.9 at 8 replaces it
    start, history, saved = run_on_ranks(_train, 1, str(run), 8)[0]
    assert start == 6 and len(history) == 2 and saved == [8]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(8))
    assert _ckpts(run) == ["best", "best.json", "latest", "step_000008"]  # the former best is pruned
    best = json.loads((root / "best.json").read_text())
    assert (best["step"], best["value"]) == (8, 0.9) and [h["step"] for h in best["history"]] == [1, 2, 8]
    assert os.readlink(root / "best") == "step_000008"

    # the old evaluation of `best` is not mixed with the new best's
    from megatron_trace.config import load_config
    from megatron_trace.eval.job import run_eval

    with pytest.raises(ValueError, match="holds an evaluation of .*step_000002"):
        run_eval(load_config(str(run / "config.yaml"), ["eval.limit=1"]), ckpt=str(root / "best"))

"""Two recipe settings in real loop steps (HF-engine rollouts, the tiny Megatron model on CPU via
gloo). PPO mini-batches make clip-higher act: with optim.mini_batches > 1 the mini-batches after
the first see importance ratios away from 1 and some tokens clip; with one mini-batch the old
log-probs are the update's own forward, the ratio is exactly 1 and nothing clips. And
schedule.kind=constant keeps lambda, the teacher pass and the snapshot refresh going for the
whole run."""

import zlib

import pytest

from megatron_trace.parallel import run_on_ranks

OVERRIDES = ["loss.variant=grpo", "schedule.lambda0=0.0", "rollout.prompts_per_step=4", "rollout.n=4",
             "rollout.max_new_tokens=16", "optim.micro_batch_size=4", "optim.optimizer=adam", "optim.lr=0.01",
             "eval.every=0", "log.tensorboard=false", "log.progress=false"]


def _pseudo_verify(items):
    # The random tiny policy never solves the task; a text hash gives mixed rewards, hence advantages.
    return ["correct" if zlib.crc32(text.encode()) % 3 == 0 else "wrong" for text, _ in items]


def _rank(rundir, mini_batches):
    from megatron_trace.config import load_config
    from megatron_trace.train.loop import train
    from megatron_trace.train.setup_run import setup_run

    run = setup_run(load_config("configs/tiny_cpu.yaml", [f"run.dir={rundir}", f"optim.mini_batches={mini_batches}",
                                                          *OVERRIDES]))
    run.verify = _pseudo_verify
    (metrics,) = train(run, steps=1)
    run.close()
    return metrics


@pytest.mark.dist
@pytest.mark.parametrize("mini_batches", [1, 4])
def test_clip_fraction_is_nonzero_only_with_several_mini_batches(tmp_path, mini_batches):
    m = run_on_ranks(_rank, 1, str(tmp_path / "run"), mini_batches)[0]
    assert m["optim/updates"] == mini_batches and m["reward/accuracy"] not in (0.0, 1.0)
    clipped = m["ppo/clip_frac_low"] + m["ppo/clip_frac_high"]
    ppo = {k: v for k, v in m.items() if k.startswith("ppo/")}
    if mini_batches == 1:
        assert m["ppo/clip_frac_low"] == 0.0 and m["ppo/clip_frac_high"] == 0.0, ppo
        assert m["ppo/ratio_min"] == 1.0 == m["ppo/ratio_max"], ppo
    else:  # measured: low 0.11, high 0.02 (ratios 0.44..1.76) at 4 mini-batches
        assert clipped > 0 and m["ppo/ratio_max"] > 1.28 and m["ppo/ratio_min"] < 0.8, ppo


def _constant_rank(rundir):
    from megatron_trace.config import load_config
    from megatron_trace.train.loop import train
    from megatron_trace.train.setup_run import setup_run

    over = ["loss.variant=all_token_fkl", "schedule.kind=constant", "schedule.warmup_steps=1", "schedule.decay_steps=1",
            "teacher.mode=snapshot", "teacher.sync_every=2", "rollout.prompts_per_step=2", "rollout.n=4",
            "rollout.max_new_tokens=12", "optim.micro_batch_size=4", "eval.every=0", "log.tensorboard=false",
            "log.progress=false"]
    run = setup_run(load_config("configs/tiny_cpu.yaml", [f"run.dir={rundir}", *over]))
    run.verify = _pseudo_verify
    hist = train(run, steps=3)
    run.close()
    return hist


@pytest.mark.dist
def test_constant_schedule_keeps_the_teacher_past_the_anneal(tmp_path):
    """schedule.kind=constant (the all-token recipes): lambda stays lambda0 after where the anneal
    would end (step 2 here), the teacher pass still runs, and the snapshot is still refreshed."""
    hist = run_on_ranks(_constant_rank, 1, str(tmp_path / "run"))[0]
    assert [m["kl/lambda"] for m in hist] == [0.5] * 3
    assert [m["teacher/snapshot_version"] for m in hist] == [0.0, 0.0, 2.0]
    assert all(m["route/fkl_frac"] > 0 and m["kl/fkl_mean"] > 0 for m in hist)

"""The TRACE loop, read top to bottom as the algorithm (DESIGN section 2).

Per step k: prompts -> rollouts (n per prompt) -> rewards -> group advantages ->
[lambda_k > 0: annotate -> token routes -> privileged teacher inputs] -> train step (old
log-probs, span-sparse teacher pass, routed loss, optimizer) -> weight sync -> metrics.
Rank 0 owns the rollout engine and builds the step's records; every rank then trains on its
DP share. Setup (models, engine, data, annotator) lives in `train/setup_run.py`.
"""

from __future__ import annotations

import json
import os
import signal
import time

import torch.distributed as dist

from ..loss import ExposureTracker, LossConfig
from ..rollout import SamplingParams, sample_groups
from ..sync import sync_weights
from .checkpoint import find_latest, load_run_checkpoint, save_run_checkpoint
from .setup_run import Run
from .stages import build_train_samples, score_groups
from .step import train_step

__all__ = ["run_training", "train"]


def _broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _fault(env: str, next_step: int) -> None:
    """Fault injection for the resume tests: SIGKILL this process at a chosen point."""
    if os.environ.get(env) == str(next_step):
        os.kill(os.getpid(), signal.SIGKILL)


def _resume(run: Run, exposure: ExposureTracker) -> None:
    latest = find_latest(run.cfg.run.dir)
    if latest is None:
        return
    state = load_run_checkpoint(run, latest)
    run.start_step, run.cursor = state["next_step"], state["cursor"]
    exposure.load_state_dict(state["exposure"])
    sync_weights(run.ddp, run.groups, run.engine, version=state["next_step"])  # engine <- restored actor
    if dist.get_rank() == 0 and run.metrics_path and os.path.exists(run.metrics_path):
        # Drop rows of steps after the checkpoint (a crashed run may have logged them).
        rows = [line for line in open(run.metrics_path) if json.loads(line)["step"] < run.start_step]
        with open(run.metrics_path, "w") as f:
            f.writelines(rows)


def train(run: Run, steps: int | None = None) -> list[dict]:
    cfg, g = run.cfg, run.groups
    loss_cfg = LossConfig(**run.loss_kwargs)
    exposure = ExposureTracker()
    _resume(run, exposure)
    total = steps if steps is not None else cfg.train.steps
    history = []
    for step in range(run.start_step, total):
        t0 = time.perf_counter()
        lam = run.schedule.lam(step)
        metrics: dict = {}
        if dist.get_rank() == 0:
            prompts, metas = run.next_prompts(cfg.rollout.prompts_per_step)
            params = SamplingParams(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                    top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens,
                                    seed=cfg.seed * 100_003 + step)
            groups, metrics = sample_groups(run.engine, prompts, params, metas)
            t1 = time.perf_counter()
            scored = score_groups(groups, run.tokenizer, run.verify, cfg.reward.advantage_std)
            t2 = time.perf_counter()
            samples, m = build_train_samples(
                scored, run.tokenizer, variant=cfg.loss.variant, annotator=run.annotator, lam=lam,
                coverage_cap=cfg.annotate.coverage_cap, segment_mode=cfg.annotate.segment_mode,
                max_segment_chars=cfg.annotate.max_segment_chars, seed=cfg.seed, step=step,
                uid_offset=step * len(prompts) * cfg.rollout.n, thinking=cfg.data.thinking)
            metrics.update(m)
            metrics.update({"time/rollout": t1 - t0, "time/reward": t2 - t1,
                            "time/annotate_and_route": time.perf_counter() - t2})
        else:
            samples = None
        samples = _broadcast(samples)
        mine = samples[g.dp_rank::g.dp_size]
        t3 = time.perf_counter()
        result = train_step(run.ddp, run.optimizer, g, mine, loss_cfg, lam,
                            micro_batch_size=cfg.optim.micro_batch_size, vocab_size=run.arch.vocab_size)
        t4 = time.perf_counter()
        sync = sync_weights(run.ddp, g, run.engine, version=step + 1)
        # The loss metrics live on the last PP stage; collect them on rank 0.
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, result.metrics)
        if dist.get_rank() == 0:
            for p in parts:
                metrics.update(p)
            metrics.update({"kl/lambda": lam, "time/train": t4 - t3, **sync.as_metrics(),
                            "time/step": time.perf_counter() - t0})
            metrics.update(exposure.update(lam, metrics.get("route/span_coverage", 0.0)))
            run.log(step, metrics)
        history.append(metrics)
        if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == total:
            save_run_checkpoint(run, step + 1, {"cursor": run.cursor, "exposure": exposure.state_dict(),
                                                "weight_version": step + 1,
                                                "annotator_cache": cfg.annotate.cache_dir},
                                crash_hook=lambda n=step + 1: _fault("MT_FAULT_KILL_DURING_SAVE", n))
            _fault("MT_FAULT_KILL_AFTER_SAVE", step + 1)
    return history


def run_training(cfg) -> None:
    """Entry point for `megatron-trace train` on every rank (spawned on CPU, torchrun on GPUs)."""
    from tqdm.auto import tqdm

    from .setup_run import setup_run

    run = setup_run(cfg)
    bar = tqdm(total=cfg.train.steps, desc="train", disable=dist.get_rank() != 0 or not cfg.log.progress)
    log = run.log

    def log_and_tick(step, metrics):
        log(step, metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.2f}", lam=f"{metrics['kl/lambda']:.2f}")

    run.log = log_and_tick
    train(run)
    bar.close()

"""The TRACE loop, read top to bottom as the algorithm (DESIGN section 2).

Per step k: prompts -> rollouts (n per prompt) -> rewards -> group advantages ->
[lambda_k > 0: annotate -> token routes -> privileged teacher inputs] -> [engines sleep] -> train
step (old log-probs, span-sparse teacher pass, routed loss, `optim.mini_batches` optimizer
updates) -> wake(weights) -> weight sync -> wake(kv cache) -> [verify the engines] -> metrics,
with checkpoint and eval cadences.
The rollouts come from every data-parallel replica's engine (or remote servers, see
`train/generation.py`); each replica's first rank scores a share; rank 0 annotates and builds
the step's records (`make_batch`); every rank then trains on its DP share of them. Records,
metrics and waits on rank 0 travel over gloo (`run.gen.broadcast`), never NCCL. In-loop
evaluation is driven by rank 0 on every replica's engine (`Generation.drive`). Setup (models,
engines, data, annotator) lives in `train/setup_run.py`.

Asynchronous rollouts (`rollout.async.max_age` > 0, remote servers): the batch of step k was made
ahead by a producer thread on rank 0 while earlier steps trained (`train/async_rollout.py`), from
weights at most max_age steps old; the fleet gets the weights every `rollout.async.update_every`
steps, pausing (not aborting) what it is generating.

Debug modes (`train.mode`): `rollout_only` stops after the records (saved under
`<run.dir>/records/`), `train_only` reads them back instead of sampling (`train.records_dir`);
`tools/replay.py` reruns one saved step under another TP/PP.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import torch
import torch.distributed as dist

from ..loss import ExposureTracker, LossConfig
from ..rollout import SamplingParams, prompt_seed
from ..types import TrainSample
from .async_rollout import AsyncRollouts
from .checkpoint import (
    best_metric,
    find_latest,
    load_run_checkpoint,
    new_best,
    restore_best,
    save_run_checkpoint,
)
from .setup_run import Run
from .stages import build_train_samples, score_groups
from .step import train_step

__all__ = ["evaluate_in_loop", "load_record", "make_batch", "run_training", "save_record", "train", "train_one_step"]


def _fault(env: str, next_step: int) -> None:
    """Fault injection for the resume tests: SIGKILL this process at a chosen point."""
    if os.environ.get(env) == str(next_step):
        os.kill(os.getpid(), signal.SIGKILL)


def make_batch(run: Run, step: int, lam: float, local: bool = False) -> tuple[list[TrainSample], dict]:
    """Every rank: prompts -> rollouts (every engine) -> rewards/advantages (every replica a share)
    -> [rank 0: annotate -> routes -> teacher inputs]. Returns the same records on every rank.
    local: rank 0 alone, without collectives (the asynchronous producer, `train/async_rollout.py`)."""
    cfg = run.cfg
    t0 = time.perf_counter()
    kept, metrics, rounds, sampled, t_reward, failed = [], {}, 0, 0, 0.0, 0
    while len(kept) < cfg.rollout.prompts_per_step and rounds < cfg.train.dynamic_max_rounds:
        prompts, metas, uids = run.next_prompts(cfg.rollout.prompts_per_step - len(kept))
        params = SamplingParams(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens,
                                # the tokenizer's EOS, so a remote server stops where a local engine does
                                stop_token_ids=tuple(t for t in [run.tokenizer.eos_token_id] if t is not None))
        seeds = [prompt_seed(cfg.seed, step, u) for u in uids]  # independent of the engine count
        groups, m = run.gen.sample(prompts, params, seeds, metas, local=local)
        failed += int(m["rollout/failed_prompts"])
        metrics = metrics or m  # the first round's rollout statistics
        t_r = time.perf_counter()
        scored = run.gen.score(groups, lambda gs: score_groups(gs, run.tokenizer, run.verify,
                                                               cfg.reward.advantage_std), local=local)
        t_reward += time.perf_counter() - t_r
        sampled += len(scored)
        rounds += 1
        if not cfg.train.dynamic_sampling:
            kept = scored
            break
        # Dynamic sampling: zero-variance groups have zero advantage; drop them and refill.
        kept += [sg for sg in scored if len(set(sg.rewards)) > 1]
    if not kept:  # every group had zero variance in every round: train on the last round (no GRPO signal)
        kept = scored
    metrics["rollout/failed_prompts"] = float(failed)
    if cfg.train.dynamic_sampling:
        metrics.update({"sampling/rounds": float(rounds), "sampling/groups_sampled": float(sampled),
                        "sampling/groups_kept": float(len(kept))})
    t1 = time.perf_counter()
    samples = None
    if local or dist.get_rank() == 0:
        samples, m = build_train_samples(
            kept, run.tokenizer, variant=cfg.loss.variant, annotator=run.annotator, lam=lam,
            coverage_cap=cfg.annotate.coverage_cap, segment_mode=cfg.annotate.segment_mode,
            max_segment_chars=cfg.annotate.max_segment_chars, seed=cfg.seed, step=step,
            uid_offset=step * cfg.rollout.prompts_per_step * cfg.rollout.n * cfg.train.dynamic_max_rounds,
            thinking=cfg.data.thinking, prompt_kind=run.prompt_kind, action=cfg.loss.action,
            lift_rollouts=cfg.train.key_token_lift if lift_step(cfg, step, lam) else 0,
            lift_annotate=cfg.train.lift_annotate, answer_only_teacher=cfg.data.answer_only_teacher,
            teacher_context=cfg.teacher.context, teacher_thinking=cfg.teacher.thinking,
            mask_coverage=cfg.loss.coverage_fraction)
        metrics.update(m)
    if not local:
        samples, metrics = run.gen.broadcast((samples, metrics))
    metrics.update({"time/rollout": t1 - t0 - t_reward, "time/reward": t_reward,
                    "time/annotate_and_route": time.perf_counter() - t1})
    return samples, metrics


def lift_step(cfg, step: int, lam: float) -> bool:
    """Whether step `step` measures the key-token lift: every step while lambda > 0, then every
    `train.key_token_lift_every` steps."""
    every = cfg.train.key_token_lift_every
    return cfg.train.key_token_lift > 0 and (lam > 0 or (every > 0 and step % every == 0))


def train_one_step(run: Run, step: int, lam: float, samples: list[TrainSample], loss_cfg: LossConfig,
                   sync: bool = True, teacher_outputs: dict | None = None) -> dict:
    """Every rank: [engines sleep] -> [snapshot refresh] -> train step -> wake(weights) -> weight
    sync -> wake(KV cache). Returns the metrics (last stage's).

    teacher_outputs: a dict to fill with the teacher's per-routed-token outputs (stage records).
    """
    cfg = run.cfg
    metrics: dict = {}
    if sync and run.gen is not None:
        metrics.update(run.gen.sleep())  # the engine's weights and KV cache make room for training
    if run.offload is not None:
        run.offload.reload()
    t0 = time.perf_counter()
    teacher = run.teacher
    if teacher is not None and teacher.due(step) and run.schedule.needs_teacher(step):
        teacher.refresh(run.ddp, step)
    with teacher.on_device() if teacher is not None else contextlib.nullcontext() as t_module:
        result = train_step(run.ddp, run.optimizer, run.groups, samples, loss_cfg, lam,
                            micro_batch_size=cfg.optim.micro_batch_size, vocab_size=run.arch.vocab_size,
                            teacher=t_module, mini_batches=cfg.optim.mini_batches, tis_cap=cfg.loss.tis_cap,
                            tis_mode=cfg.loss.tis_mode, lr=run.lr(step), probe_tokens=cfg.teacher.probe_tokens,
                            key_token_lift=cfg.train.key_token_lift, record_teacher=teacher_outputs is not None,
                            max_tokens_per_micro_batch=cfg.optim.max_tokens_per_micro_batch,
                            pack_sequences=cfg.optim.pack_sequences,
                            teacher_tokens=cfg.teacher.max_resident_tokens)
    if teacher_outputs is not None:
        teacher_outputs.update(result.teacher_outputs)
    metrics.update(result.metrics)
    metrics["time/train"] = time.perf_counter() - t0
    if teacher is not None:
        metrics["teacher/snapshot_version"] = float(teacher.version)
    if run.offload is not None:
        metrics.update(run.offload.offload())  # optimizer state and grads leave the GPU during rollout
    if sync:
        metrics.update(run.gen.wake(["weights"]))
        metrics.update(run.gen.sync(run.ddp, version=step + 1))
        metrics.update(run.gen.wake(["kv_cache", "cuda_graph"]))
        if cfg.rollout.verify_sync:  # the probe generates: only once the KV cache is back
            metrics.update(run.gen.verify(run.ddp, tol=cfg.rollout.verify_sync_tol))
    return metrics


def evaluate_in_loop(run: Run, weights_step: int) -> dict:
    """Every rank: avg@k of the engines' current weights on `eval.benchmarks`, or on the validation
    split `eval.in_loop_source` when set (first `eval.limit` problems each). Rank 0 runs the
    harness (samples and reports under `<run.dir>/eval/step_N/`) on every replica's engine; the
    other ranks serve it and return {}."""
    from ..eval import eval_metrics, evaluate, settings_from_config

    def on_rank0(engine) -> dict:
        t0 = time.perf_counter()
        out = os.path.join(run.cfg.run.dir, "eval", f"step_{weights_step:06d}") if run.metrics_path else None
        report = evaluate(engine, run.tokenizer, settings_from_config(run.cfg, in_loop=True), out_dir=out,
                          model=f"{run.cfg.run.name}@step{weights_step}", progress=False)
        spread = engine.dispatch_metrics() if hasattr(engine, "dispatch_metrics") else {}
        return {**eval_metrics(report), **{k.replace("rollout/", "eval/dispatch/"): v for k, v in spread.items()},
                "time/eval": time.perf_counter() - t0}

    return run.gen.drive(on_rank0) or {}


def _gather_to_rank0(run: Run, metrics: dict) -> dict:
    parts = run.gen.all_gather(metrics)
    out = {}
    for p in parts:  # the loss metrics live on the last PP stage
        out.update(p)
    return out


def save_record(run_dir: str, step: int, lam: float, samples: list[TrainSample], metrics: dict,
                teacher_outputs: dict | None = None) -> str:
    """A step's stage records: the rollouts, rewards/advantages, routes, teacher inputs and (after
    training) the teacher's outputs at the routed tokens."""
    os.makedirs(os.path.join(run_dir, "records"), exist_ok=True)
    path = os.path.join(run_dir, "records", f"step_{step:06d}.pt")
    torch.save({"step": step, "lambda": lam, "samples": [vars(s) for s in samples], "metrics": metrics,
                "teacher_outputs": teacher_outputs or {}}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_record(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"stage record {path} does not exist (train.records_dir / --record)")
    rec = torch.load(path, weights_only=False)
    rec["samples"] = [TrainSample(**s) for s in rec["samples"]]
    return rec


def _resume(run: Run, exposure: ExposureTracker) -> dict:
    latest = find_latest(run.cfg.run.dir)
    if latest is None:
        return {}
    state = load_run_checkpoint(run, latest)
    run.start_step, run.cursor = state["next_step"], state["cursor"]
    exposure.load_state_dict(state["exposure"])
    if run.cfg.train.mode != "train_only":
        run.gen.sync(run.ddp, version=state["next_step"])  # engines <- the restored actor
    if dist.get_rank() == 0 and run.metrics_path and os.path.exists(run.metrics_path):
        # Drop rows of steps after the checkpoint (a crashed run may have logged them).
        rows = [line for line in open(run.metrics_path) if json.loads(line)["step"] < run.start_step]
        with open(run.metrics_path, "w") as f:
            f.writelines(rows)
    return state


def train(run: Run, steps: int | None = None) -> list[dict]:
    cfg = run.cfg
    loss_cfg = LossConfig(**run.loss_kwargs)
    exposure = ExposureTracker()
    resumed = _resume(run, exposure)
    total = steps if steps is not None else cfg.train.steps
    rollouts = None  # rollout.async.max_age > 0: the fleet generates ahead (train/async_rollout.py)
    if cfg.rollout.async_.max_age > 0:
        rollouts = AsyncRollouts(run, run.start_step, total,
                                 lambda j: make_batch(run, j, run.schedule.lam(j), local=True))
        rollouts.resumed(resumed)
    try:
        history = _steps(run, loss_cfg, exposure, total, rollouts)
    finally:
        if rollouts is not None:
            rollouts.close()
    return history


def _steps(run: Run, loss_cfg: LossConfig, exposure: ExposureTracker, total: int, rollouts) -> list[dict]:
    cfg, mode = run.cfg, run.cfg.train.mode
    history = []
    # checkpoint.keep_best: rank 0 keeps the best eval so far (best.json's, across resumes)
    best = restore_best(cfg.run.dir) if cfg.checkpoint.keep_best and dist.get_rank() == 0 else None
    for step in range(run.start_step, total):
        t0 = time.perf_counter()
        lam = run.schedule.lam(step)
        samples, metrics = None, {}
        if mode == "train_only":
            if dist.get_rank() == 0:
                rec = load_record(os.path.join(cfg.train.records_dir, f"step_{step:06d}.pt"))
                samples, metrics, lam = rec["samples"], dict(rec["metrics"]), rec["lambda"]
            samples, lam = run.gen.broadcast((samples, lam))
        else:
            if rollouts is not None:  # made ahead by the fleet, at most max_age steps old
                try:
                    samples, metrics = rollouts.batch(step)
                except RuntimeError:
                    _checkpoint(run, step, exposure, rollouts)  # the steps trained so far, resumable
                    raise
            else:
                samples, metrics = make_batch(run, step, lam)
            if dist.get_rank() == 0 and (cfg.train.save_records or mode == "rollout_only"):
                save_record(cfg.run.dir, step, lam, samples, metrics)
        if dist.get_rank() != 0:
            metrics = {}
        if mode != "rollout_only":
            record = cfg.train.save_records and mode == "full"
            outputs = {} if record else None
            rollout_metrics = dict(metrics)
            sync = mode == "full" and (rollouts is None or rollouts.sync_due(step))
            metrics.update(_gather_to_rank0(run, train_one_step(run, step, lam, samples, loss_cfg,
                                                                sync=sync, teacher_outputs=outputs)))
            if record:
                merged = _gather_to_rank0(run, outputs)
                if dist.get_rank() == 0:
                    save_record(cfg.run.dir, step, lam, samples, rollout_metrics, merged)
        evaluated = cfg.eval.every and (step + 1) % cfg.eval.every == 0 and mode == "full"
        if evaluated:
            metrics.update(evaluate_in_loop(run, step + 1))  # every rank: each replica's engine generates
        if dist.get_rank() == 0:
            metrics.update({"kl/lambda": lam, "time/step": time.perf_counter() - t0})
            metrics.update(exposure.update(lam, metrics.get("route/span_coverage", 0.0)))
            run.log(step, metrics)
        history.append(metrics)
        improved = None  # a new best eval: its step is checkpointed (once) and named `best`
        if evaluated and cfg.checkpoint.keep_best:
            name = best_metric(cfg)
            improved = run.gen.broadcast(new_best(best, name, metrics.get(name), step + 1)
                                         if dist.get_rank() == 0 else None)
        if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == total or improved is not None:
            _checkpoint(run, step + 1, exposure, rollouts, reoffload=step + 1 < total, best=improved)
        best = improved or best
    return history


def _checkpoint(run: Run, next_step: int, exposure: ExposureTracker, rollouts, reoffload: bool = False,
                best: dict | None = None) -> None:
    """Every rank: save the run at `next_step` (asynchronous: with the data cursor of the oldest
    batch not yet trained, so that a resume regenerates what was in flight); best: mark it the
    best checkpoint (`checkpoint.new_best`'s record)."""
    if run.offload is not None:
        run.offload.reload()  # the checkpoint holds the optimizer state
    state = {"cursor": run.cursor, "exposure": exposure.state_dict(), "weight_version": next_step,
             "annotator_cache": run.cfg.annotate.cache_dir}
    if rollouts is not None:
        state.update(rollouts.checkpoint_state())
    save_run_checkpoint(run, next_step, state, crash_hook=lambda n=next_step: _fault("MT_FAULT_KILL_DURING_SAVE", n),
                        best=best)
    _fault("MT_FAULT_KILL_AFTER_SAVE", next_step)
    if run.offload is not None and reoffload:
        run.offload.offload()


def run_training(cfg) -> None:
    """Entry point for `megatron-trace train` on every rank (spawned on CPU, torchrun on GPUs)."""
    from tqdm.auto import tqdm

    from .setup_run import setup_run

    run = setup_run(cfg)
    bar = tqdm(total=cfg.train.steps, initial=0, desc=f"train [{cfg.train.mode}]",
               disable=dist.get_rank() != 0 or not cfg.log.progress)
    log = run.log

    def log_and_tick(step, metrics):
        log(step, metrics)
        bar.n = step + 1
        bar.refresh()
        bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.2f}", lam=f"{metrics['kl/lambda']:.2f}")

    run.log = log_and_tick
    try:
        train(run)
    finally:
        bar.close()
        run.close()

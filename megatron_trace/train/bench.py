"""Step benchmark: the wall time of GRPO, TRACE (lambda > 0 and lambda = 0) and all-token FKL
steps on the same batch, in one run (the job behind `tools/bench_step.py`).

Every variant starts each repetition from the same weights and optimizer state and samples the
same prompts with the same seed, so all variants see the same rollouts. Variants are run
round-robin so that slow drift of the machine hits them alike; the median over repetitions is
reported; the order of the variants rotates every repetition. The TRACE lambda > 0 variant is
TRACE-FKL with an annotator that offers every (1-character) segment of a response in order, so
the spans fill the 25% cap: TRACE-FKL's compute profile at a known coverage whatever the
policy's text or accuracy. For that, the benchmark's verifier scores every rollout correct (FKL spans
live on correct rollouts); no part of the compute depends on the reward values. Annotation is
not timed here (the oracle is free, an API annotator is network-bound).

Full step: rollout -> reward -> routes/teacher inputs -> train part -> weight sync.
Train part: old log-probs, teacher pass, forward/backward, optimizer, key-token lift.
"""

from __future__ import annotations

import statistics
import time

__all__ = ["VARIANTS", "bench_step_job"]

# name -> (route variant, lambda)
VARIANTS = {
    "grpo": ("grpo", 0.0),
    "trace": ("trace_fkl", 0.5),
    "trace_lambda0": ("trace_fkl", 0.0),
    "alltoken_fkl": ("all_token_fkl", 0.5),
}


class _FillTheCap:
    """Marks every segment; the span builder keeps them in order up to the coverage cap."""

    name = "fill_the_cap"

    def annotate(self, requests):
        from ..annotate import Annotation

        return [Annotation(tuple(s.id for s in r.segments), "bench") for r in requests]


def _job(config: str, overrides: list[str], repeats: int):
    import torch
    import torch.distributed as dist

    from ..config import load_config
    from ..loss import LossConfig
    from .loop import _gather_to_rank0, make_batch, train_one_step
    from .setup_run import setup_run

    # TRACE at 25% coverage whatever the config's cap; no in-loop eval in the timed steps.
    cfg = load_config(config, ["annotate.coverage_cap=0.25", "annotate.max_segment_chars=1", *overrides,
                               "log.wandb=false", "log.tensorboard=false", "eval.every=0"])
    run = setup_run(cfg, write_run_dir=False)
    run.annotator = _FillTheCap()
    run.verify = lambda items: ["correct"] * len(items)
    params = list(run.ddp.parameters())
    weights0 = [p.detach().clone() for p in params]
    optim0 = run.optimizer.state_dict()
    parts = ("old_logprobs", "teacher", "fwd_bwd", "optimizer", "key_token_lift")
    times: dict[str, dict[str, list[float]]] = {
        v: {k: [] for k in ("full", "train", "rollout", "sync", *parts)} for v in VARIANTS}
    coverage: dict[str, float] = {}
    names = list(VARIANTS)
    for rep in range(repeats + 1):  # repetition 0 warms up and is not counted
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            variant, lam = VARIANTS[name]
            with torch.no_grad():
                for p, w in zip(params, weights0):
                    p.copy_(w)
            run.optimizer.load_state_dict(optim0)
            run.gen.sync(run.ddp, version=0)
            run.cursor = 0
            run.cfg.loss.variant = variant
            loss_cfg = LossConfig(**{**run.loss_kwargs, "variant": variant})
            dist.barrier()
            t0 = time.perf_counter()
            samples, metrics = make_batch(run, 0, lam)
            m = _gather_to_rank0(run, train_one_step(run, 0, lam, samples, loss_cfg, sync=True))
            dist.barrier()
            full = time.perf_counter() - t0
            if rep == 0:
                continue
            if dist.get_rank() == 0:
                t = times[name]
                t["full"].append(full)
                t["train"].append(m["time/train"])
                t["rollout"].append(metrics["time/rollout"])
                for k in parts:
                    t[k].append(m[f"time/{k}"])
                t["sync"].append(m["sync/seconds"])
                coverage[name] = m.get("route/span_coverage", 0.0)
    run.close()
    if dist.get_rank() != 0:
        return None
    med = {v: {k: statistics.median(x) for k, x in t.items()} for v, t in times.items()}
    out = {"config": config, "overrides": overrides, "repeats": repeats, "device": str(run.groups.device),
           "tp": run.groups.tp_size, "pp": run.groups.pp_size, "dp": run.groups.dp_size, "world": dist.get_world_size(),
           "batch_rollouts": cfg.rollout.prompts_per_step * cfg.rollout.n,
           "seconds": med, "coverage": coverage}
    for key, v in (("trace", "trace"), ("trace_lambda0", "trace_lambda0"), ("alltoken_fkl", "alltoken_fkl")):
        out[f"ratio_{key}_vs_grpo"] = med[v]["full"] / med["grpo"]["full"]
        out[f"train_ratio_{key}_vs_grpo"] = med[v]["train"] / med["grpo"]["train"]
    out["targets"] = {
        "trace_le_1.25x_grpo": out["ratio_trace_vs_grpo"] <= 1.25,
        "trace_lambda0_within_5pct": abs(out["ratio_trace_lambda0_vs_grpo"] - 1.0) <= 0.05,
        "alltoken_fkl_slower_than_trace": med["alltoken_fkl"]["full"] > med["trace"]["full"],
    }
    return out


def bench_step_job(config: str, overrides: list[str] | None = None, repeats: int = 5) -> dict:
    from ..config import load_config
    from ..parallel.spawn import launch_layout

    cfg = load_config(config, list(overrides or []))
    results = launch_layout(_job, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp, config, list(overrides or []),
                            repeats)
    return next((r for r in results if r), {})

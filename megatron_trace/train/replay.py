"""Rerun one saved step (a stage record) under any TP/PP: the job behind `tools/replay.py`.

The record holds the step's rollouts, advantages, routes, teacher inputs and lambda, so the
train step needs no engine, verifier or annotator. The weights come from `--ckpt` (a run
checkpoint or a model checkpoint; the model part reloads under any layout) or, for a record of
step 0, from the run's config (its seeded initialisation). The optimizer starts fresh, so the
forward/backward metrics (loss, KL, entropies, clip fractions, grad norm, diagnostics) are
reproduced; the update itself (and the key-token lift measured after it) matches only when the
optimizer has no state yet (step 0, or SGD without momentum).
"""

from __future__ import annotations

import json
import math
import os

__all__ = ["compare_metrics", "replay_job"]

# Measured after the optimizer update, so they depend on the optimizer state replay does not have.
POST_UPDATE = ("lift/key_sampled", "lift/key_teacher", "lift/key_underallocated")


def compare_metrics(got: dict, ref: dict) -> dict:
    """Max relative difference over the non-timing metrics both dicts hold (absolute for values
    below 0.01, where float noise between layouts is relatively large)."""
    worst, worst_key, n = 0.0, None, 0
    for k, v in got.items():
        if "time" in k or "seconds" in k or k in POST_UPDATE or k not in ref or not isinstance(v, (int, float)):
            continue
        r = ref[k]
        if math.isnan(v) and math.isnan(r):
            continue
        n += 1
        d = abs(v - r) / max(abs(r), 1e-2)
        if not d <= worst:  # also catches NaN on one side
            worst, worst_key = (d if math.isfinite(d) else float("inf")), k
    return {"compared": n, "max_rel_diff": worst, "worst_key": worst_key}


def _job(config: str, record: str, ckpt: str | None, tp: int, pp: int, overrides: list[str]):
    import torch.distributed as dist

    from ..config import load_config
    from ..loss import LossConfig
    from ..models.checkpoint import load_checkpoint
    from .loop import _gather_to_rank0, load_record, train_one_step
    from .setup_run import setup_run

    cfg = load_config(config, [*overrides, f"parallel.tp={tp}", f"parallel.pp={pp}", "train.mode=train_only",
                               f"train.records_dir={os.path.dirname(os.path.abspath(record))}", "log.wandb=false"])
    run = setup_run(cfg, write_run_dir=False)
    if ckpt:
        model_dir = os.path.join(ckpt, "model") if os.path.isdir(os.path.join(ckpt, "model")) else ckpt
        load_checkpoint(model_dir, run.groups, model=run.ddp)
    rec = load_record(record)
    metrics = _gather_to_rank0(run, train_one_step(run, rec["step"], rec["lambda"], rec["samples"],
                                                   LossConfig(**run.loss_kwargs), sync=False))
    run.close()
    return {"step": rec["step"], "lambda": rec["lambda"], "tp": tp, "pp": pp, "metrics": metrics} \
        if dist.get_rank() == 0 else None


def replay_job(config: str, record: str, ckpt: str | None = None, tp: int = 1, pp: int = 1,
               overrides: list[str] | None = None, compare: str | None = None) -> dict:
    from ..parallel.spawn import launch

    for path, what in ((config, "--config"), (record, "--record")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{what} {path} does not exist")
    if ckpt and not os.path.isdir(ckpt):
        raise FileNotFoundError(f"--ckpt {ckpt} is not a directory")
    results = launch(_job, tp * pp, config, record, ckpt, tp, pp, list(overrides or []))
    res = next((r for r in results if r), None)
    if res is None:
        return {}
    if compare:
        rows = [json.loads(line) for line in open(compare)]
        ref = next((r for r in rows if r["step"] == res["step"]), None)
        if ref is None:
            raise ValueError(f"--compare {compare} has no row for step {res['step']}")
        res["comparison"] = compare_metrics(res["metrics"], ref)
    return res

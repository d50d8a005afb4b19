"""Run checkpoints: save every `checkpoint.every` steps, resume from the latest, keep the last K
(and, with `checkpoint.keep_best`, the best on the in-loop evaluation).

Layout of `<run.dir>/checkpoints/`:
  step_000004/                  one checkpoint (the number is the next step to run)
    model/                      torch_dist model checkpoint (reloads under any TP/PP)
    optimizer/                  torch_dist optimizer state: Adam moments, fp32 master weights
                                (mixed precision and the distributed optimizer) and the step
    teacher/                    torch_dist teacher snapshot (teacher.mode=snapshot); its version is
                                in trainer_state.json
    rng_rank{r}.pt              torch CPU/CUDA RNG and the Megatron RNG-tracker streams
    trainer_state.json          step, data cursor, exposure sums, weight version, annotator cache,
                                the layout and optimizer it was written with
  latest                        the name of the newest complete checkpoint
  best -> step_000002           checkpoint.keep_best: a relative symlink to the checkpoint whose
                                in-loop eval gave the best `checkpoint.best_metric` so far
  best.json                     its record: step, checkpoint, metric, value and the history of
                                improvements (a resumed run continues from it)

Best checkpoint: an in-loop eval at weights step s whose metric is strictly greater than the
recorded best (ties keep the first; NaN never counts) makes step_s the best, saving it then if
the `checkpoint.every` cadence does not. Pruning to the last `keep_last` never removes the
checkpoint that best.json or `best` names; a former best goes once it is outside the last
keep_last. `megatron-trace eval --ckpt RUN/checkpoints/best` evaluates it.

Resharding: the optimizer state goes through `dist_checkpointing` by the optimizer's own
`sharded_state_dict` (DESIGN section 11). The standard optimizer keys every state tensor like its
parameter, so a checkpoint resumes under any TP/PP/DP. The distributed optimizer writes its
buckets as they are (`dp_reshardable`: no gather, no copy); that resumes under any DP at the same
TP/PP. RNG streams are per rank: they are restored only at the layout they were written with
(otherwise the freshly seeded ones stay, with a warning).

Atomicity: a checkpoint is written into `step_N.tmp/` and renamed to `step_N/` only when every
rank has finished; best.json, `best` (symlink `best.tmp` + os.replace) and then `latest` are
replaced atomically (write + os.replace). A crash at any point leaves `latest` and best.json
naming complete checkpoints (a resume re-points `best` at best.json's should they disagree).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import torch
import torch.distributed as dist

__all__ = ["best_metric", "find_latest", "load_run_checkpoint", "mark_best", "new_best", "read_best", "restore_best",
           "save_run_checkpoint", "to_prune"]

log = logging.getLogger(__name__)

# `dp_reshardable`: the distributed optimizer's buckets, saved in parallel without any gather (the
# model-space formats either gather the whole state on every rank or are unsupported in 0.16.1).
# `chained_optim_avoid_prefix`: the same keys whether or not Megatron chains optimizers.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable", "chained_optim_avoid_prefix": True}


def _ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def find_latest(run_dir: str) -> str | None:
    path = os.path.join(_ckpt_root(run_dir), "latest")
    if not os.path.exists(path):
        return None
    name = open(path).read().strip()
    full = os.path.join(_ckpt_root(run_dir), name)
    return full if os.path.isdir(full) else None


def best_metric(cfg) -> str:
    """The in-loop eval metric that `checkpoint.keep_best` maximises."""
    return cfg.checkpoint.best_metric or ("eval/val/avg@k" if cfg.eval.in_loop_source else "eval/average")


def new_best(best: dict | None, metric: str, value, next_step: int) -> dict | None:
    """best.json's record if `value` (the eval of the weights at `next_step`) beats `best`, else
    None: strictly greater (ties keep the first best), never NaN/inf or a missing value. A best
    recorded for another metric does not count (the history restarts)."""
    if value is None or not math.isfinite(value):
        return None
    same = best is not None and best.get("metric") == metric
    if same and not value > best["value"]:
        return None
    history = best.get("history", []) if same else []
    return {"step": next_step, "checkpoint": f"step_{next_step:06d}", "metric": metric, "value": float(value),
            "history": [*history, {"step": next_step, "value": float(value)}]}


def to_prune(names, keep_last: int, keep=()) -> list[str]:
    """The complete checkpoints (step_N names) that fall outside the last `keep_last`, less `keep`."""
    done = sorted(n for n in names if n.startswith("step_") and not n.endswith(".tmp"))
    return [n for n in done[:-keep_last] if n not in set(keep)]


def read_best(run_dir: str) -> dict | None:
    path = os.path.join(_ckpt_root(run_dir), "best.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _replace_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def _point_best(root: str, name: str) -> None:
    link, tmp = os.path.join(root, "best"), os.path.join(root, "best.tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)  # leftover of a crash
    os.symlink(name, tmp)  # relative: the run directory may move
    os.replace(tmp, link)


def mark_best(root: str, record: dict) -> None:
    """Rank 0: best.json <- record, then `best` -> its checkpoint, each replaced atomically."""
    _replace_json(os.path.join(root, "best.json"), record)
    _point_best(root, record["checkpoint"])


def _best_names(root: str) -> set[str]:
    """The checkpoints best.json and the `best` symlink name (pruning keeps both)."""
    names = set()
    best = read_best(os.path.dirname(root))
    if best is not None:
        names.add(best["checkpoint"])
    link = os.path.join(root, "best")
    if os.path.islink(link):
        names.add(os.path.basename(os.path.normpath(os.readlink(link))))
    return names


def restore_best(run_dir: str) -> dict | None:
    """Rank 0 on (re)start: best.json's record; `best` re-pointed at it if a crash left them apart."""
    root = _ckpt_root(run_dir)
    best = read_best(run_dir)
    if best is not None and os.path.isdir(os.path.join(root, best["checkpoint"])):
        link = os.path.join(root, "best")
        if not os.path.islink(link) or os.readlink(link) != best["checkpoint"]:
            _point_best(root, best["checkpoint"])
    return best


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _single_float16(optimizer):
    """The Float16OptimizerWithFloat16Params that `optimizer` is (or chains alone), else None."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    return opts[0] if len(opts) == 1 and isinstance(opts[0], Float16OptimizerWithFloat16Params) else None


def _float16_sharded_state_dict(opt, model_sd: dict, is_loading: bool) -> dict:
    """`Float16OptimizerWithFloat16Params.sharded_state_dict` with the same tensor keys, fixed for
    param groups that mix 16-bit and fp32 parameters (the local spec keeps RMSNorm weights fp32 in
    a bf16 model). 0.16.1 numbers only the 16-bit parameters and pairs them by position within
    each group: here the optimizer's parameters are matched to the model's by identity. The fp32
    masters are a {group: [...]} dict because an empty group in a list breaks the load's merge."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    if is_loading:
        opt.init_state_fn(opt.optimizer, opt.config)
    state_dict = opt.state_dict()
    in_order = [p for group in opt.optimizer.param_groups for p in group["params"]]  # torch's state ids
    model_of = {id(main): p for g16, g32 in zip(opt.float16_groups, opt.fp32_from_float16_groups)
                for p, main in zip(g16, g32)}
    sharded = get_param_id_to_sharded_param_map(model_sd, [model_of.get(id(p), p) for p in in_order])
    state_id = {id(p): i for i, p in enumerate(in_order)}
    state_dict["fp32_from_fp16_params"] = {
        g: [make_sharded_optimizer_tensor(sharded[state_id[id(main)]], main, prefix="optimizer.state.fp32_param")
            for main in group] for g, group in enumerate(opt.fp32_from_float16_groups) if group}
    step = opt._extract_common_per_param_step(state_dict["optimizer"])
    optim_state_to_sharding_state(state_dict["optimizer"], sharded, exclude_keys="step")
    if step:
        state_dict["optimizer"]["state"]["common_step"] = step
    return state_dict


def _optimizer_sharded_state_dict(run, is_loading: bool) -> dict:
    from ..models.checkpoint import model_sharded_state_dict

    model_sd = model_sharded_state_dict(run.ddp)
    float16 = _single_float16(run.optimizer)
    if float16 is not None:
        return _float16_sharded_state_dict(float16, model_sd, is_loading)
    return run.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=dict(_OPTIM_METADATA))


def _torch_adam_distributed(optimizer) -> list:
    """The distributed optimizers in `optimizer` that run torch's Adam (no TE/Apex on this machine)."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(opt, distrib_optimizer.DistributedOptimizer) and opt.init_state_fn is not None]


def _init_sgd_state(opt, config=None) -> None:
    """torch SGD's momentum buffers, allocated as its first step would (zeros * momentum + grad is
    that step's buffer): Megatron gives SGD no `init_state_fn`, yet calls it to build the state
    dict to load into, and without the buffers there the load would drop them."""
    for group in opt.param_groups:
        if group.get("momentum"):
            for p in group["params"]:
                opt.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def _load_optimizer(run, ckpt_dir: str) -> None:
    """Load `ckpt_dir` into `run.optimizer`. Besides the Float16 fix above and SGD's missing state
    init, this works around three gaps of 0.16.1's distributed optimizer with torch's Adam (TE/Apex
    keep the step in the param groups instead):
    - building the state dict to load into reads the Adam step from the per-parameter state, which
      a fresh optimizer does not have yet: allocate it (zeros, step 0) as the first step would;
    - the load then overwrites every parameter's step with that local 0 and leaves all of them
      sharing one tensor, which torch's foreach Adam would increment once per parameter: give each
      parameter its own step, the checkpoint's;
    - the dp_reshardable load copies into fp32 views of the params without `no_grad`."""
    from megatron.core import dist_checkpointing

    optimizer = run.optimizer
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in opts:
        if opt.init_state_fn is None and isinstance(getattr(opt, "optimizer", None), torch.optim.SGD):
            opt.init_state_fn = _init_sgd_state
    torch_adam = _torch_adam_distributed(optimizer)
    for opt in torch_adam:
        if not opt.optimizer.state:
            opt.init_state_fn(opt.optimizer, opt.config)
            for state in opt.optimizer.state.values():
                state["step"] = torch.tensor(0.0)
    loaded = dist_checkpointing.load(_optimizer_sharded_state_dict(run, is_loading=True), ckpt_dir)
    float16 = _single_float16(optimizer)
    if float16 is not None:
        masters = loaded["fp32_from_fp16_params"]
        loaded["fp32_from_fp16_params"] = [masters.get(g, []) for g in range(len(float16.fp32_from_float16_groups))]
    per_opt = [loaded] if len(opts) == 1 else [loaded[k] for k in sorted(loaded)]  # ChainedOptimizer's layout
    steps = [{g["step"] for g in sd["optimizer"]["param_groups"]} if opt in torch_adam else None
             for opt, sd in zip(opts, per_opt)]
    with torch.no_grad():
        optimizer.load_state_dict(loaded)
    for opt, step in zip(opts, steps):
        if step is not None:
            (step,) = step
            for state in opt.optimizer.state.values():
                state["step"] = torch.tensor(float(step))


def _layout(run) -> dict:
    o = run.cfg.optim
    return {"world_size": dist.get_world_size(), "tp": run.groups.tp_size, "pp": run.groups.pp_size,
            "dp": run.groups.dp_size, "optimizer": o.optimizer, "distributed_optimizer": o.distributed_optimizer}


def _mkdir_collective(path: str) -> None:
    if dist.get_rank() == 0:
        os.makedirs(path)
    dist.barrier()


def save_run_checkpoint(run, next_step: int, trainer_state: dict, *, crash_hook=None, best: dict | None = None) -> str:
    """Collective. Writes checkpoint `step_{next_step}` atomically; marks it best (best: its
    best.json record, `new_best`); prunes to `checkpoint.keep_last` and the best."""
    from megatron.core import dist_checkpointing

    from ..models.checkpoint import save_checkpoint

    root = _ckpt_root(run.cfg.run.dir)
    name = f"step_{next_step:06d}"
    tmp, final = os.path.join(root, name + ".tmp"), os.path.join(root, name)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(tmp)
    dist.barrier()
    hf_config = run.arch.to_hf_dict()
    save_checkpoint(run.ddp, run.groups, os.path.join(tmp, "model"), hf_config=hf_config)
    _mkdir_collective(os.path.join(tmp, "optimizer"))
    dist_checkpointing.save(_optimizer_sharded_state_dict(run, is_loading=False), os.path.join(tmp, "optimizer"))
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    extra = {}
    if getattr(run, "teacher", None) is not None:
        with run.teacher.on_device() as module:
            save_checkpoint(module, run.groups, os.path.join(tmp, "teacher"), hf_config=hf_config)
        extra["teacher_version"] = run.teacher.version
    if crash_hook is not None:
        crash_hook()  # tests: die in the middle of a save
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**trainer_state, **extra, "next_step": next_step, **_layout(run)}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if best is not None:
            mark_best(root, best)
        latest_tmp = os.path.join(root, "latest.tmp")
        with open(latest_tmp, "w") as f:
            f.write(name)
        os.replace(latest_tmp, os.path.join(root, "latest"))
        for old in to_prune(os.listdir(root), run.cfg.checkpoint.keep_last, keep=_best_names(root)):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def _check_resumable(path: str, saved: dict, now: dict) -> None:
    def layout(d):
        return (f"tp={d['tp']}, pp={d['pp']}, dp={d.get('dp', '?')}, optim.optimizer={d['optimizer']}, "
                f"optim.distributed_optimizer={d['distributed_optimizer']}")

    if not os.path.isdir(os.path.join(path, "optimizer")):
        raise ValueError(f"{path} holds per-rank optimizer files from an older megatron-trace; resume it with "
                         f"that version, or start a new run from its weights with model.ckpt={path}/model")
    if (saved["optimizer"], saved["distributed_optimizer"]) != (now["optimizer"], now["distributed_optimizer"]):
        raise ValueError(f"{path} was written with {layout(saved)}; this run has {layout(now)}: set "
                         "optim.optimizer and optim.distributed_optimizer as they were to resume")
    if saved["distributed_optimizer"] and (saved["tp"], saved["pp"]) != (now["tp"], now["pp"]):
        raise ValueError(f"{path} was written with {layout(saved)}; this run has {layout(now)}: the distributed "
                         "optimizer's state reshards across DP only, so set parallel.tp and parallel.pp as they were")


def load_run_checkpoint(run, path: str) -> dict:
    """Collective. Restores model, optimizer, teacher and (same layout) RNG into `run`; returns
    the trainer state."""
    from ..models.checkpoint import load_checkpoint

    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    now = _layout(run)
    _check_resumable(path, state, now)
    load_checkpoint(os.path.join(path, "model"), run.groups, model=run.ddp)
    _load_optimizer(run, os.path.join(path, "optimizer"))
    if (state["world_size"], state["tp"], state["pp"]) == (now["world_size"], now["tp"], now["pp"]):
        _set_rng_state(torch.load(os.path.join(path, f"rng_rank{dist.get_rank()}.pt"), weights_only=False))
    elif dist.get_rank() == 0:
        log.warning("%s was written by %d ranks (tp=%d, pp=%d); this run has %d (tp=%d, pp=%d): the per-rank RNG "
                    "streams stay freshly seeded, so random draws after the resume differ from an uninterrupted run's",
                    path, state["world_size"], state["tp"], state["pp"], now["world_size"], now["tp"], now["pp"])
    teacher = getattr(run, "teacher", None)
    if teacher is not None and os.path.isdir(os.path.join(path, "teacher")):
        with teacher.on_device() as module:
            load_checkpoint(os.path.join(path, "teacher"), run.groups, model=module)
        teacher.version = int(state["teacher_version"])
    return state

"""Run checkpoints: save every `checkpoint.every` steps, resume from the latest, keep the last K.

Layout of `<run.dir>/checkpoints/`:
  step_000004/                  one checkpoint (the number is the next step to run)
    model/                      torch_dist model checkpoint (reloads under any TP/PP)
    optim_rank{r}.pt            this rank's optimizer state (same layout required to resume)
    rng_rank{r}.pt              torch CPU/CUDA RNG and the Megatron RNG-tracker streams
    teacher_rank{r}.pt          the teacher snapshot (teacher.mode=snapshot): weights + version
    trainer_state.json          step, data cursor, exposure sums, weight version, annotator cache
  latest                        the name of the newest complete checkpoint

Atomicity: a checkpoint is written into `step_N.tmp/` and renamed to `step_N/` only when every
rank has finished; `latest` is then replaced atomically (write + os.replace). A crash at any
point leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

__all__ = ["find_latest", "load_run_checkpoint", "save_run_checkpoint"]


def _ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def find_latest(run_dir: str) -> str | None:
    path = os.path.join(_ckpt_root(run_dir), "latest")
    if not os.path.exists(path):
        return None
    name = open(path).read().strip()
    full = os.path.join(_ckpt_root(run_dir), name)
    return full if os.path.isdir(full) else None


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


def save_run_checkpoint(run, next_step: int, trainer_state: dict, *, crash_hook=None) -> str:
    """Collective. Writes checkpoint `step_{next_step}` atomically; prunes to `checkpoint.keep_last`."""
    from ..models.checkpoint import save_checkpoint

    root = _ckpt_root(run.cfg.run.dir)
    name = f"step_{next_step:06d}"
    tmp, final = os.path.join(root, name + ".tmp"), os.path.join(root, name)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(tmp)
    dist.barrier()
    save_checkpoint(run.ddp, run.groups, os.path.join(tmp, "model"), hf_config=run.arch.to_hf_dict())
    torch.save(run.optimizer.state_dict(), os.path.join(tmp, f"optim_rank{rank}.pt"))
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if getattr(run, "teacher", None) is not None:
        torch.save(run.teacher.state_dict(), os.path.join(tmp, f"teacher_rank{rank}.pt"))
    if crash_hook is not None:
        crash_hook()  # tests: die in the middle of a save
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**trainer_state, "next_step": next_step, "world_size": dist.get_world_size(),
                       "tp": run.groups.tp_size, "pp": run.groups.pp_size}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = os.path.join(root, "latest.tmp")
        with open(latest_tmp, "w") as f:
            f.write(name)
        os.replace(latest_tmp, os.path.join(root, "latest"))
        done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
        for old in done[: -run.cfg.checkpoint.keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def load_run_checkpoint(run, path: str) -> dict:
    """Collective. Restores model, optimizer and RNG into `run`; returns the trainer state."""
    from ..models.checkpoint import load_checkpoint

    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if (state["tp"], state["pp"], state["world_size"]) != (run.groups.tp_size, run.groups.pp_size,
                                                            dist.get_world_size()):
        raise ValueError(
            f"{path} was written with tp={state['tp']}, pp={state['pp']}, world={state['world_size']}; resume needs "
            "the same layout (the model alone reloads under any layout via model.ckpt)")
    rank = dist.get_rank()
    load_checkpoint(os.path.join(path, "model"), run.groups, model=run.ddp)
    run.optimizer.load_state_dict(torch.load(os.path.join(path, f"optim_rank{rank}.pt"), weights_only=False))
    _set_rng_state(torch.load(os.path.join(path, f"rng_rank{rank}.pt"), weights_only=False))
    teacher_file = os.path.join(path, f"teacher_rank{rank}.pt")
    if getattr(run, "teacher", None) is not None and os.path.exists(teacher_file):
        run.teacher.load_state_dict(torch.load(teacher_file, weights_only=False))
    return state

"""One sweep cell as one command: [an SFT base ->] training -> evaluation of the best-on-validation
checkpoint (and, with `eval_final`, of the last) on the config's final benchmarks, every problem
(`eval.limit` lifted).

    megatron-trace cell --config C [--sft-config S] [--eval-final] [--stage all|train|eval] [key=value ...]

Outputs, in `run.dir`: what `train` writes, and `eval/best/` (`eval/final/`) with eval.json,
eval.md and samples.jsonl, which `megatron-trace report` reads. With `--sft-config` an SFT base
is trained first into `sft_dir_for(cfg)`, shared by the variants of one size and seed (a file
lock lets one train it while the others wait, then reuse it), and the run starts from it.

A cell that raises leaves `FAILED` (the stage and the error) for the report; a rerun clears it,
resumes training from the latest checkpoint, and skips an evaluation whose eval.json exists.
Under torchrun every rank trains and rank 0 alone evaluates (with `parallel.dp` engines on its
node).
"""

from __future__ import annotations

import fcntl
import os
import traceback

__all__ = ["EVALS", "cell_done", "run_cell", "sft_dir_for"]

# evaluation tag -> the checkpoint it reads (checkpoints/best is checkpoint.keep_best's link)
EVALS = {"best": "best", "final": "latest"}
STAGES = ("all", "train", "eval")


def cell_done(run_dir: str, eval_final: bool = False) -> bool:
    """Every evaluation the cell owes is on disk."""
    tags = ["best", "final"] if eval_final else ["best"]
    return all(os.path.exists(os.path.join(run_dir, "eval", t, "eval.json")) for t in tags)


def _checkpoint(run_dir: str, tag: str) -> str:
    from .train.checkpoint import find_latest

    if tag == "final":
        ckpt = find_latest(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir}/checkpoints: no complete checkpoint to evaluate as final")
        return ckpt
    ckpt = os.path.join(run_dir, "checkpoints", "best")
    if not os.path.exists(ckpt):
        raise FileNotFoundError(f"{ckpt} does not exist: the cell evaluates the best-on-validation checkpoint, "
                                "which needs checkpoint.keep_best=true and eval.every > 0")
    return ckpt


def sft_dir_for(cfg) -> str:
    """Where a cell's SFT base lives: beside the run, shared by every variant of its size and seed
    (`<parent of run.dir>/sft/<model.size>_s<seed>`; the SFT cache keys on the config)."""
    return os.path.join(os.path.dirname(os.path.abspath(cfg.run.dir)), "sft", f"{cfg.model.size}_s{cfg.seed}")


def _release_training() -> None:
    """Under torchrun, rank 0 evaluates in the process that trained: drop its process group and
    cached GPU memory first, so that the evaluation engines get the GPUs."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gpu_engines(cfg) -> int | None:
    """On a GPU node with parallel.dp unset: one evaluation engine per GPU (per parallel.tp GPUs
    for SGLang), so that the evaluation uses the node the training had."""
    import torch

    if cfg.parallel.dp is not None or cfg.parallel.device == "cpu" or not torch.cuda.is_available():
        return None
    per = cfg.parallel.tp if cfg.rollout.engine == "sglang" else 1
    return max(1, torch.cuda.device_count() // per)


def _train(config: str, overrides: list[str], sft_config: str | None, cfg) -> None:
    from .config import check_teacher_data, load_config
    from .parallel import launch_layout

    if sft_config:
        from .train.sft import run_sft

        sft_dir = sft_dir_for(cfg)
        sft_cfg = load_config(sft_config, [*overrides, f"run.dir={sft_dir}"])
        os.makedirs(sft_dir, exist_ok=True)
        with open(os.path.join(sft_dir, ".lock"), "w") as lock:
            if "WORLD_SIZE" not in os.environ:  # under torchrun every rank must enter the SFT together
                fcntl.flock(lock, fcntl.LOCK_EX)  # the variants of one size and seed share the base
            results = launch_layout(run_sft, sft_cfg.parallel.tp, sft_cfg.parallel.pp, sft_cfg.parallel.dp, sft_cfg)
        base = next((r for r in results if r), None)  # rank 0's report (under torchrun, other ranks get None)
        if base:
            print(f"[cell] SFT base {'reused' if base.get('cached') else 'trained'}: {base['hf_dir']}", flush=True)
        overrides = [*overrides, f"model.hf_dir={os.path.join(sft_dir, 'hf')}"]
    cfg = load_config(config, overrides)
    check_teacher_data(cfg)
    from .train.loop import run_training

    launch_layout(run_training, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp, cfg)


def run_cell(config: str, overrides: list[str], *, sft_config: str | None = None, eval_final: bool = False,
             stage: str = "all") -> dict:
    """Returns {"run_dir", "evals": {tag: eval.json path}, "skipped": [tags already evaluated]}."""
    from .config import load_config

    if stage not in STAGES:
        raise ValueError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
    cfg = load_config(config, overrides)  # a bad key fails here, before any work
    run_dir = cfg.run.dir
    failed = os.path.join(run_dir, "FAILED")
    if os.path.exists(failed):
        os.remove(failed)
    current = "train"
    try:
        if stage in ("all", "train"):
            _train(config, list(overrides), sft_config, cfg)
        out = {"run_dir": run_dir, "evals": {}, "skipped": []}
        if stage == "train" or int(os.environ.get("RANK", "0")) != 0:
            return out
        _release_training()
        from .eval.job import run_eval

        eval_over = [*overrides, "eval.limit=null"]
        engines = _gpu_engines(cfg)
        if engines:
            eval_over.append(f"parallel.dp={engines}")
        eval_cfg = load_config(config, eval_over)
        for tag in ("best", "final") if eval_final else ("best",):
            current = f"eval {tag}"
            path = os.path.join(run_dir, "eval", tag, "eval.json")
            if os.path.exists(path):
                out["skipped"].append(tag)
            else:
                run_eval(eval_cfg, ckpt=_checkpoint(run_dir, tag), out_dir=os.path.dirname(path),
                         name=f"{cfg.run.name} ({tag})")
            out["evals"][tag] = path
        return out
    except BaseException as exc:
        os.makedirs(run_dir, exist_ok=True)
        with open(failed, "w") as f:
            f.write(f"{current} failed: {type(exc).__name__}: {exc}\n")
            f.write("".join(traceback.format_exception(exc))[-4000:])
        raise

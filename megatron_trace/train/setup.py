"""Wrap a Megatron model for training: DDP grad buffers, grad finalisation, the optimizer."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..parallel import ParallelGroups

__all__ = ["OptimSettings", "build_optimizer", "lr_at", "wrap_ddp"]


@dataclass(frozen=True)
class OptimSettings:
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False


def lr_at(step: int, total_steps: int, lr: float, min_lr: float = 0.0, warmup_steps: int = 0,
          decay: str = "constant") -> float:
    """The learning rate of (0-based) `step`: linear warm-up to `lr` over `warmup_steps`, then
    constant, or linear/cosine decay to `min_lr` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if decay == "constant":
        return lr
    span = max(total_steps - 1 - warmup_steps, 1)
    frac = min(max((step - warmup_steps) / span, 0.0), 1.0)
    if decay == "linear":
        return min_lr + (lr - min_lr) * (1.0 - frac)
    if decay == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"optim.lr_decay={decay!r}: expected constant, linear or cosine")


def wrap_ddp(model, groups: ParallelGroups, *, grad_reduce_in_fp32: bool = True, sum_over_dp: bool = True,
             use_distributed_optimizer: bool = False):
    """Megatron DDP around one model chunk, with grad finalisation wired into the schedule.

    finalize_model_grads all-reduces grads over DP (x CP) and, for tied embeddings with PP>1,
    between the first and last stage.

    sum_over_dp: our losses are already normalised by *global* counts (loss/routed.py), so DP
    gradients must be summed, not averaged. Megatron sums when `calculate_per_token_loss` is on;
    loss functions then return num_tokens = 0 so that it does not divide either.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    config = model.config
    config.calculate_per_token_loss = sum_over_dp
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=grad_reduce_in_fp32,
            overlap_grad_reduce=False,
            use_distributed_optimizer=use_distributed_optimizer,
        ),
        module=model,
        pg_collection=groups.pg_collection,
    )
    config.finalize_model_grads_func = functools.partial(finalize_model_grads, pg_collection=groups.pg_collection)
    return ddp


def build_optimizer(ddp_model, groups: ParallelGroups, settings: OptimSettings):
    """Megatron's optimizer (fp32 params on CPU; mixed precision comes from the model config)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    mcfg = ddp_model.config
    cfg = OptimizerConfig(
        optimizer=settings.optimizer,
        lr=settings.lr,
        min_lr=settings.lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=mcfg.bf16,
        fp16=mcfg.fp16,
        params_dtype=mcfg.params_dtype if mcfg.params_dtype is not None else torch.float32,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )
    # With explicit groups Megatron refuses its extra gloo groups; on CPU every group is gloo anyway.
    return get_megatron_optimizer(cfg, [ddp_model], pg_collection=groups.pg_collection,
                                  use_gloo_process_groups=False)

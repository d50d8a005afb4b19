"""Process-group setup. The only module in the package that touches Megatron's `parallel_state`.

`initialize()` sets the per-rank process settings (`parallel.env`), starts torch.distributed
(nccl with CUDA, gloo plus CPU mode without), builds
Megatron's TP/PP/CP/DP groups and seeds the RNG streams. It returns a `ParallelGroups` record
that every other package receives explicitly; nothing else reads the globals.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import cpu_mode, megatron_compat
from .env import set_process_env
from .spawn import free_port

__all__ = ["ParallelGroups", "destroy", "initialize"]


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the TP x CP x DP x PP grid and the groups it talks over."""

    tp_size: int
    pp_size: int
    dp_size: int
    cp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int
    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup  # data parallel (without CP)
    dp_cp: dist.ProcessGroup  # data x context parallel: where gradients are all-reduced
    mp: dist.ProcessGroup  # model parallel (TP x PP): where grad norms are summed
    embd: dist.ProcessGroup | None  # first + last PP stage, for tied embeddings
    device: torch.device
    pg_collection: object = field(repr=False)  # megatron ProcessGroupCollection for model ctors

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size * self.dp_size * self.cp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def pp_global_rank(self, stage: int) -> int:
        """Global rank of `stage` in this rank's pipeline (for broadcasts from the owner)."""
        return dist.get_global_rank(self.pp, stage)


def _init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    init_method = os.environ.get("MT_INIT_METHOD")
    if init_method is None:
        if "MASTER_ADDR" in os.environ:
            init_method = "env://"
        elif world == 1:
            init_method = f"tcp://127.0.0.1:{free_port()}"
        else:
            raise RuntimeError(
                f"WORLD_SIZE={world} but neither MASTER_ADDR nor MT_INIT_METHOD is set; "
                "launch with torchrun or megatron_trace.parallel.run_on_ranks"
            )
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)


def initialize(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    seed: int = 1234,
    device: str = "auto",
    timeout_minutes: int = 30,
) -> ParallelGroups:
    """Start distributed and Megatron model parallelism; return this rank's groups.

    device: "auto" picks CUDA when available and CPU mode (gloo) otherwise; "cpu" forces CPU
    mode and is refused on a CUDA machine (CPU mode patches CUDA entry points).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"parallel.device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("parallel.device=cuda but CUDA is not available")
    if not use_cuda:
        cpu_mode.enable()
    megatron_compat.apply()  # no warnings at every step from megatron-core's own calls

    if not dist.is_initialized():
        set_process_env(use_cuda)  # identical on every rank, before any communicator exists
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _init_process_group("nccl" if use_cuda else "gloo", datetime.timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}")

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=not use_cuda,
    )
    tp_rank = ps.get_tensor_model_parallel_rank()
    if use_cuda:
        model_parallel_cuda_manual_seed(seed)
    else:
        cpu_mode.seed_rng_trackers(seed, tp_rank)

    embd = ps.get_embedding_group(check_initialized=False) if pp > 1 else None
    return ParallelGroups(
        tp_size=tp,
        pp_size=pp,
        cp_size=cp,
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=tp_rank,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        mp=ps.get_model_parallel_group(),
        embd=embd,
        device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def destroy() -> None:
    """Tear down Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

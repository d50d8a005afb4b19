"""CPU execution mode: run megatron-core's real TP/PP code paths on CPU over gloo.

megatron-core assumes CUDA in a handful of places (DESIGN section 7). This module is the one
place that bends those assumptions, and only when CUDA is absent:

1. `torch.cuda.current_device()` returns the CPU device (RoPE, gathers and p2p call it).
2. A `TorchFunctionMode` rewrites `device="cuda"` arguments, `.cuda()` and `.to("cuda")` to CPU
   (the PP schedule and the optimizer allocate with an explicit `device="cuda"`).
3. An RNG tracker that keeps `torch.Generator` states for the named streams Megatron forks
   (attention always forks "model-parallel-rng"), so dropout stays reproducible per TP rank.
4. Megatron's clip-by-total-norm asserts `torch.cuda.FloatTensor`; it is replaced by a
   device-agnostic version. The norm itself is still Megatron's TP/PP-aware `get_grad_norm_fp32`.
5. `torch.cuda.synchronize` and friends become no-ops.
6. Activation recompute (`tensor_parallel.checkpoint`) saves and restores the CUDA generator's
   state next to the CPU one and the tracker's; with no CUDA generator that part is empty, so a
   recomputed forward replays the same CPU and tracker streams (dropout included). The recomputed
   forward runs inside backward, and `Tensor.backward` pops the device mapping while it runs (a
   mode is off inside its own handler), so the recompute entry points put it back.
7. Megatron's mixed-precision and distributed optimizers sort parameters by `param.type()` and
   accept only `torch.cuda.*Tensor` names. While their constructors run, `Tensor.type()` reports
   a CPU tensor under its CUDA name (the distributed optimizer's reduce-scatter and all-gather run
   on gloo as they are).

`enable()` is idempotent and refuses to run when CUDA is available: on a GPU machine the real
CUDA paths must be used.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["CpuRNGStatesTracker", "enable", "is_enabled", "seed_rng_trackers"]

log = logging.getLogger(__name__)
_CPU = torch.device("cpu")
_enabled = False
_mode: TorchFunctionMode | None = None
_cuda_type_names = False  # item 7: only while a Megatron optimizer is being built


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False  # ints mean a CUDA ordinal only to .cuda(); torch.device(int) is rare in Megatron


class _CudaToCpu(TorchFunctionMode):
    """Maps every explicit CUDA placement onto the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and _cuda_type_names and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _with_mapping(fn):
    """`fn` with the device mapping active (re-entered when the stack lost it, see item 6)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if any(isinstance(m, _CudaToCpu) for m in torch.overrides._get_current_function_mode_stack()):
            return fn(*args, **kwargs)
        with _CudaToCpu():
            return fn(*args, **kwargs)

    return wrapped


class CpuRNGStatesTracker:
    """Named RNG streams on the CPU generator, with the interface of Megatron's tracker.

    `fork(name)` swaps the global CPU RNG state for the named stream's state and swaps it back
    afterwards, exactly as Megatron's CUDA tracker does with the CUDA generator.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"RNG stream {name!r} is already tracked")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG stream {name!r} was never added (call seed_rng_trackers first)")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def seed_rng_trackers(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU twin of `model_parallel_cuda_manual_seed`: same stream names, same seed offsets."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Device-agnostic replacement for megatron's `clip_grad_by_total_norm_fp32`."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for p in parameters:
            g = getattr(p, attr, None)
            if g is not None:
                g.detach().mul_(coeff)


def _with_cuda_type_names(init):
    @functools.wraps(init)
    def wrapped(*args, **kwargs):
        global _cuda_type_names
        outer, _cuda_type_names = _cuda_type_names, True
        try:
            return init(*args, **kwargs)
        finally:
            _cuda_type_names = outer

    return wrapped


def is_enabled() -> bool:
    return _enabled


def enable() -> None:
    """Switch the process into CPU mode. No-op if already on; an error if CUDA is usable."""
    global _enabled, _mode
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("CPU mode must not be enabled on a machine with CUDA; use the nccl path")

    # Megatron asks for this CUDA scheduling knob whenever TP>1; it means nothing on CPU.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    torch.cuda.current_device = lambda: _CPU
    for name in ("synchronize", "empty_cache", "ipc_collect", "reset_peak_memory_stats"):
        setattr(torch.cuda, name, lambda *a, **k: None)
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None

    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    from megatron.core.optimizer import distrib_optimizer

    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        cls.__init__ = _with_cuda_type_names(cls.__init__)

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    mrandom.CheckpointFunction.backward = staticmethod(_with_mapping(mrandom.CheckpointFunction.backward))
    mrandom.CheckpointWithoutOutput._recompute = _with_mapping(mrandom.CheckpointWithoutOutput._recompute)

    _mode = _CudaToCpu()
    _mode.__enter__()  # stays active for the life of the process
    _enabled = True
    log.info("megatron-trace CPU mode enabled (gloo, cuda->cpu device mapping, CPU RNG tracker)")

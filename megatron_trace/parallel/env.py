"""Process settings that must be the same on every rank, set once before the process group starts.

NCCL reads its variables when a communicator is created, and a communicator whose ranks disagree
on them (CUDA-memory or NVLink-SHARP buffers, say) can fail or hang. SGLang 0.5.6 sets some of them
in the process that constructs an `sglang.Engine` (`entrypoints/engine.py::_set_envs_and_config`):
with colocated rollouts that is only the engine-owner ranks, and only after their communicators
exist. So every rank sets SGLang's values itself, here, before `init_process_group`:

    NCCL_CUMEM_ENABLE=0, NCCL_NVLS_ENABLE=0   SGLang's defaults (it keeps values already set)
    CUDA_DEVICE_MAX_CONNECTIONS=1            what Megatron's TP/SP overlap relies on; SGLang forces
                                             8 for its own processes (`rollout/sglang/engine.py`
                                             puts ours back in the trainer after the launch)
    multiprocessing start method: spawn      SGLang forces it on the owner; fork is unsafe once
                                             CUDA is initialised anyway

Values the user exported are kept (they are the same on every rank: the launcher exports them).
On CPU only the NCCL variables are set (harmless; they keep CPU runs identical to GPU ones in what
child processes inherit); the start method and CUDA's variable are left alone.
"""

from __future__ import annotations

import multiprocessing as mp
import os

__all__ = ["RANK_ENV", "set_process_env"]

# name -> value every rank starts with (unless already exported)
RANK_ENV = {
    "NCCL_CUMEM_ENABLE": "0",
    "NCCL_NVLS_ENABLE": "0",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}
_CUDA_ONLY = ("CUDA_DEVICE_MAX_CONNECTIONS",)


def set_process_env(use_cuda: bool) -> dict[str, str]:
    """Set `RANK_ENV` (where unset) and, with CUDA, the spawn start method. Returns the values in
    force afterwards. Call before `init_process_group` (and before the first CUDA call)."""
    out = {}
    for name, value in RANK_ENV.items():
        if name in _CUDA_ONLY and not use_cuda:
            continue
        os.environ.setdefault(name, value)
        out[name] = os.environ[name]
    if use_cuda:
        mp.set_start_method("spawn", force=True)
    return out

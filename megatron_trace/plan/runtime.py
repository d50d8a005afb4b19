"""CUDA contexts and NCCL communicator buffers on one GPU (both *estimates*).

**CUDA contexts**: `CUDA_CONTEXT_GB` per process that has a context on the GPU, a commonly
measured figure for a PyTorch process on an H100 with CUDA's lazy module loading (PyTorch's
default); not derived from a source. A colocated GPU has two: the trainer's process and the
SGLang scheduler process of its engine TP rank. No third one: weight updates at engine TP > 1
follow SGLang's SPMD path (`rollout/sglang/engine.py`), so each scheduler opens CUDA IPC handles
of its own GPU only. (Plain tensors from the owner would make schedulers 1..t-1 each open a
context on the owner's GPU: `rebuild_cuda_tensor` rebuilds on the device the tensor came from.)

**NCCL** (formula from NCCL's defaults; the channel count is an estimate): each communicator
allocates, per channel and per ring peer (send and receive side), a buffer per protocol:
Simple `NCCL_BUFFSIZE` = 4 MiB, LL128 = NCCL_LL128_ELEMS_PER_THREAD (120) x
NCCL_LL128_MAX_NTHREADS (640) x NCCL_STEPS (8) x 8 B = 4.69 MiB, LL = NCCL_LL_LINES_PER_THREAD
(8) x NCCL_LL_MAX_NTHREADS (512) x NCCL_STEPS (8) x 16 B = 0.5 MiB (`src/init.cc`
DEFAULT_*BUFFSIZE, `src/include/device.h`): bytes = channels x 2 x 9.19 MiB, with
`NCCL_CHANNELS` = 16 channels (NCCL picks 16 to 32 on NVLink H100 nodes; NCCL_MAX_NCHANNELS caps
it). NVLS, CollNet and the proxy's host buffers are not counted. Communicators per GPU: the
trainer's default group and Megatron's TP, DP and PP groups and the embedding group (pp > 1),
each when it has more than one rank; PyTorch creates each at the group's first collective. The
engine's are in engine.py; rank 0 adds the weight-broadcast group under
rollout.placement=remote.
"""

from __future__ import annotations

from .params import GB

CUDA_CONTEXT_GB = 0.5  # estimate: one process's CUDA context on an H100, lazy module loading
NCCL_CHANNELS = 16  # estimate
NCCL_RING_PEERS = 2
NCCL_SIMPLE_BUFFSIZE = 1 << 22  # NCCL_BUFFSIZE default (src/init.cc DEFAULT_BUFFSIZE)
NCCL_LL128_BUFFSIZE = 120 * 640 * 8 * 8  # DEFAULT_LL128_BUFFSIZE
NCCL_LL_BUFFSIZE = 8 * 512 * 8 * 16  # DEFAULT_LL_BUFFSIZE
NCCL_COMM_BYTES = NCCL_CHANNELS * NCCL_RING_PEERS * (NCCL_SIMPLE_BUFFSIZE + NCCL_LL128_BUFFSIZE + NCCL_LL_BUFFSIZE)


def trainer_nccl_groups(tp: int, pp: int, dp: int) -> list[str]:
    """The trainer's NCCL communicators on each of its GPUs (module docstring)."""
    out = ["default"] if tp * pp * dp > 1 else []
    out += [name for name, n in (("TP", tp), ("DP", dp), ("PP", pp)) if n > 1]
    return out + (["embedding"] if pp > 1 else [])


def context_bytes(n: int) -> float:
    return n * CUDA_CONTEXT_GB * GB


def nccl_bytes(n: int) -> float:
    return float(n * NCCL_COMM_BYTES)

"""What a colocated SGLang 0.5.6 engine holds on each GPU it runs on, outside its static pool.

SGLang sizes its static pool (weights + KV cache) at start (`model_runner.py:702-707`,
`:1442-1447`; the package docstring); everything here comes on top of it. Each figure names its
place in the 0.5.6 source (paths under the installed `sglang` package); the ones marked
*estimate* are not byte counts SGLang allocates but SGLang's own heuristics or a formula of ours.

- **CUDA graphs** (private memory pool; *estimate*): `CUDA_GRAPH_MIB_PER_BS` MiB per unit of
  cuda_graph_max_bs, the figure SGLang reserves for its graphs when it picks
  mem_fraction_static itself (`srt/server_args.py:830`). The graphs are captured after the pool
  (`model_runner.py:509-518`), for the decode batch sizes of `server_args.py:878-897` (largest =
  cuda_graph_max_bs, whose default depends on the GPU's memory and the TP size,
  `server_args.py:725-808`). They stay on the GPU while the engine sleeps unless the engine
  captured them under torch_memory_saver, which `cuda_graph_runner.py:516-521` does only with
  `SGLANG_MEMORY_SAVER_CUDA_GRAPH` true ("1"/"true", `srt/utils/common.py:264`); otherwise the
  "cuda_graph" tag of `release_memory_occupation` pauses nothing
  (`scheduler_update_weights_mixin.py:137-138`). The planner reads that variable from its own
  environment (the engine's scheduler processes inherit the trainer's).
- **Graph input buffers** (exact for the large ones): `GraphInputBuffers.create`
  (`srt/model_executor/input_buffers.py:48-63`) for max_bs = cuda_graph_max_bs: the fp32
  `next_token_logits_buffer` (max_bs x V x 4) and `input_embeds` (max_bs x h x B); FA3's decode
  metadata (`srt/layers/attention/flashattention_backend.py:1283-1303`, the default backend on
  Hopper, page size 1): `page_table` max_bs x context_len x 4 and `strided_indices`
  context_len x 8. Index buffers under 64 bytes per batch entry are left out. Allocated by the
  scheduler's PyTorch allocator outside the memory saver's regions, so they stay while it
  sleeps. (FlashInfer, the default off Hopper, has a 384 MiB workspace instead,
  `srt/environ.py:246`; not counted.)
- **Activations** (rollout only; *estimate*): one prefill chunk of chunked_prefill_size tokens
  (`server_args.py:778-795`) through a decoder layer on an engine TP rank of t (`srt/models/
  qwen3.py`, the MLP of `qwen2.py:96-98`): the hidden states and the residual (2h) next to the
  MLP's gate_up (2f/t) and SiLU-and-mul output (f/t), or the attention's qkv ((q + 2kv)/t) and
  output (q/t): chunk x B x (2h + max(3f, 2q + 2kv)/t); plus the sampler of a decode batch of R
  requests (the rollouts one engine serves): fp32 logits, their in-place softmax's temporary and
  the log-probs of return_logprob (`srt/layers/sampler.py:87-184`): 3 x R x V x 4. Prefill
  computes logits only at each request's last prompt position (logprob_start_len -1,
  `scheduler.py:1389-1397`). The scheduler empties its PyTorch cache when the engine sleeps
  (release of "kv_cache" -> `flush_cache` -> `torch.cuda.empty_cache`, `scheduler.py:2245`), so
  the train phase does not hold these. SGLang's own reserve for activations when it picks
  mem_fraction_static (1.5 MiB per chunk token + 512 MiB, at least 10 GiB on GPUs over 60 GiB,
  `server_args.py:821-845`) is a model-agnostic upper bound that does not apply: the recipes set
  rollout.mem_fraction_static.
- **Custom all-reduce** (exact, engine TP 2, 4, 6 or 8 over NVLink): three buffers of max_size
  = 8 MiB per GPU (`custom_all_reduce.py:55-56, 173-186`: the IPC meta buffer, the IPC input
  buffer, rank_data), cudaMalloc'ed outside PyTorch and the memory saver; the meta buffer's
  signal header is left out.
- **NCCL** (see runtime.py): two communicators per GPU at engine TP > 1, the TP group's pynccl
  communicator and its torch.distributed NCCL group (SGLang's `GroupCoordinator`, in the
  parallel-state module of `srt/distributed/`, lines 355 and 567).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..models.qwen3 import Qwen3Arch
from .params import GB, MIB

SGLANG_VERSION = "0.5.6"
MEMORY_SAVER_CUDA_GRAPH_ENV = "SGLANG_MEMORY_SAVER_CUDA_GRAPH"
CUDA_GRAPH_MIB_PER_BS = 2  # server_args.py:830 (estimate: SGLang's reserve, not a measurement)
CUSTOM_AR_WORLD_SIZES = (2, 4, 6, 8)  # custom_all_reduce.py:55
CUSTOM_AR_MAX_SIZE = 8192 * 1024  # custom_all_reduce.py:56 (CUDA; 16 MiB on ROCm)
CUSTOM_AR_BUFFERS = 3  # custom_all_reduce.py:173-186
SAMPLING_COPIES = 3  # sampler.py:87-184


def memory_saver_cuda_graph(environ: Mapping[str, str] | None = None) -> bool:
    """SGLANG_MEMORY_SAVER_CUDA_GRAPH as `get_bool_env_var` reads it (true for "1" and "true")."""
    env = os.environ if environ is None else environ
    return env.get(MEMORY_SAVER_CUDA_GRAPH_ENV, "false").lower() in ("true", "1")


def server_defaults(gpu_memory_gb: float, tp: int) -> tuple[int, int]:
    """(chunked_prefill_size, cuda_graph_max_bs) that SGLang's ServerArgs picks on a CUDA GPU of
    this memory (`server_args.py:725-808`, which compares MiB)."""
    mib = gpu_memory_gb * GB / MIB
    if mib < 20 * 1024:
        return 2048, 8
    if mib < 35 * 1024:
        return 2048, 24 if tp < 4 else 80
    if mib < 60 * 1024:
        return 4096, 32 if tp < 4 else 160
    if mib < 160 * 1024:  # H100 / A100 80 GB (< 90 GiB) and H200 / H20 (< 160 GiB) alike
        return 8192, 256 if tp < 4 else 512
    return 16384, 512


def capture_batch_sizes(max_bs: int) -> list[int]:
    """The decode batch sizes SGLang captures a CUDA graph for (`server_args.py:878-897`)."""
    bs = [1, 2, 4, 8, 12, *range(16, 257, 8), *range(272, 512, 16), *range(512, max_bs + 1, 32)]
    return [b for b in bs if b <= max_bs]


@dataclass(frozen=True)
class EngineMemory:
    """Bytes one GPU of an SGLang engine holds outside the static pool (module docstring)."""

    chunked_prefill_size: int
    cuda_graph_max_bs: int
    requests: int  # rollouts one engine serves (the decode batch)
    cuda_graphs: float  # estimate
    graph_buffers: float
    activations: float  # estimate; rollout phase only
    custom_all_reduce: float
    nccl_comms: int
    graphs_released: bool  # SGLANG_MEMORY_SAVER_CUDA_GRAPH: the graphs leave the GPU while it sleeps


def engine_memory(arch: Qwen3Arch, tp: int, B: int, gpu_memory_gb: float, requests: int,
                  environ: Mapping[str, str] | None = None) -> EngineMemory:
    """What one GPU of an SGLang engine with tp_size `tp` holds besides its pool."""
    chunk, max_bs = server_defaults(gpu_memory_gb, tp)
    max_bs = max(capture_batch_sizes(max_bs))
    h, V, ctx = arch.hidden_size, arch.vocab_size, arch.max_position_embeddings
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    buffers = max_bs * (4 * V + h * B) + max_bs * ctx * 4 + ctx * 8
    layer = chunk * B * (2 * h + max(3 * arch.intermediate_size, 2 * q + 2 * kv) / tp)
    sampling = SAMPLING_COPIES * requests * V * 4
    return EngineMemory(
        chunked_prefill_size=chunk, cuda_graph_max_bs=max_bs, requests=requests,
        cuda_graphs=CUDA_GRAPH_MIB_PER_BS * max_bs * MIB, graph_buffers=float(buffers),
        activations=layer + sampling,
        custom_all_reduce=float(CUSTOM_AR_BUFFERS * CUSTOM_AR_MAX_SIZE if tp in CUSTOM_AR_WORLD_SIZES else 0),
        nccl_comms=2 if tp > 1 else 0, graphs_released=memory_saver_cuda_graph(environ))


def requests_per_engine(rollouts: int, engines: int) -> int:
    return math.ceil(rollouts / max(engines, 1))

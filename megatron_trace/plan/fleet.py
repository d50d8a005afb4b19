"""The fleet side of a job that starts its own rollout servers (`cluster.rollout_nodes`): one
GPU of one server (tp_size = rollout.server_tp), on a node of its own, with no trainer beside it.

SGLang sizes its static pool as `mem_fraction_static` (`cluster.rollout_mem_fraction`, which
the default server command passes) of the GPU's memory; the pool holds the weights shard
(bf16) and the KV cache. Outside it: the CUDA context, CUDA graphs and their buffers, the
activations of a prefill chunk and the sampling buffers (`engine.py`'s estimates), and the
custom all-reduce buffers at tp > 1.
"""

from __future__ import annotations

from ..fleet.job import servers_per_node
from ..models.qwen3 import Qwen3Arch
from .engine import engine_memory, requests_per_engine
from .params import GB, _kv_per_rank
from .runtime import CUDA_CONTEXT_GB

__all__ = ["fleet_memory"]


def fleet_memory(cfg, arch: Qwen3Arch) -> dict:
    """Per-GPU memory of one fleet server, in GB, and how many tokens its KV cache holds."""
    c, r = cfg.cluster, cfg.rollout
    tp, B = r.server_tp, 2  # servers run bf16
    servers = c.rollout_nodes * servers_per_node(cfg, cpu=False)
    em = engine_memory(arch, tp, B, c.gpu_memory_gb, requests_per_engine(r.prompts_per_step * r.n, servers))
    pool = c.rollout_mem_fraction * c.gpu_memory_gb * GB
    weights = arch.num_params * B / tp
    kv = pool - weights
    outside = (CUDA_CONTEXT_GB * GB + em.cuda_graphs + em.graph_buffers + em.activations + em.custom_all_reduce)
    tokens = int(max(kv, 0) // (2 * arch.num_hidden_layers * _kv_per_rank(arch, tp) * B))
    peak = pool + outside
    return {"servers": servers, "server_tp": tp, "nodes": c.rollout_nodes, "mem_fraction_static": c.rollout_mem_fraction,
            "weights_gb": round(weights / GB, 2), "kv_cache_gb": round(max(kv, 0) / GB, 2), "kv_cache_tokens": tokens,
            "outside_pool_gb": round(outside / GB, 2), "peak_gb": round(peak / GB, 2),
            "requests_per_server": em.requests,
            "fits": kv > 0 and peak <= c.gpu_memory_gb * GB}


def fleet_note(f: dict, gpu_memory_gb: float) -> str:
    return (f"{f['servers']} server(s) x {f['server_tp']} GPU(s) on {f['nodes']} node(s); per GPU: pool "
            f"{f['mem_fraction_static']:g} x {gpu_memory_gb:g} GB = weights {f['weights_gb']:.1f} GB + KV cache "
            f"{f['kv_cache_gb']:.1f} GB ({f['kv_cache_tokens']} tokens), outside it {f['outside_pool_gb']:.1f} GB "
            f"(est.: context, CUDA graphs, activations); peak {f['peak_gb']:.1f} GB, "
            + ("fits" if f["fits"] else "DOES NOT FIT: raise rollout.server_tp or lower cluster.rollout_mem_fraction")
            + f"; {f['requests_per_server']} rollouts per server per step")

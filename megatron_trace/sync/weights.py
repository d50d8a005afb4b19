"""Push the actor's weights into a rollout engine, in buckets, with an optional equality check.

The Megatron actor (any TP/PP) streams full HF-named tensors (`models.convert.export_hf_stream`,
a collective every rank of one replica walks: TP gathers stay in the TP group, PP broadcasts in
the replica's pipeline). The rank that owns the replica's engine packs them into buckets of at
most `bucket_bytes` and hands each bucket to `engine.update_weights`; the version is set with the
last bucket (`engine.finish_sync`). An engine with a `begin_sync` (remote servers: abort or
pause what they still run) hears it once the first bucket is gathered, before it is handed
over. Other ranks pass `engine=None`, take part in the stream and drop each tensor as soon as it has passed, so no rank holds more than one bucket
(the owner) or one tensor (the others) beyond its own shards. Every data-parallel replica runs
this at once, each into its own engine.

`per_rank` (colocated SGLang at TP > 1, on every TP rank of the replica's first stage): SGLang's
SPMD path (`rollout/sglang/engine.py`). Each of those ranks keeps the bucket, serialises its own
copies (handles to its own GPU), the owner passes the gathered handles to
`engine.update_weights_per_rank`, and a barrier keeps every copy alive until the engine has read
it. No tensor crosses GPUs.

`verify=True` then compares the engine with the actor on a probe batch (`verify_engine`): the
engine's logits (`engine.probe_logits`) against the actor's gathered logits, or, for engines
without a probe forward, greedy samples' log-probs against the actor's recomputation, and
raises `WeightSyncError`. The engine must be awake (KV cache included) for that.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..models.builder import unwrap_model
from ..models.convert import export_hf_stream
from ..parallel import ParallelGroups

__all__ = ["PerRankSync", "SyncReport", "WeightSyncError", "sync_weights", "verify_engine"]

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """The engine's weights do not reproduce the actor after a sync."""


@dataclass(frozen=True)
class SyncReport:
    version: int
    num_tensors: int
    num_bytes: int
    num_buckets: int
    seconds: float
    max_abs_logit_diff: float | None = None

    def as_metrics(self) -> dict[str, float]:
        out = {"sync/seconds": self.seconds, "sync/bytes": float(self.num_bytes), "sync/version": float(self.version),
               "sync/buckets": float(self.num_buckets)}
        if self.max_abs_logit_diff is not None:
            out["sync/max_abs_logit_diff"] = self.max_abs_logit_diff
        return out


@dataclass(frozen=True)
class PerRankSync:
    """SGLang's SPMD weight path for one replica (see the module docstring). gather(obj) -> every
    TP rank's obj in TP order (a gloo all-gather over this TP group); barrier() over that group;
    serialize(tensor) -> bytes, this rank's handle to its copy."""

    gather: Callable[[object], list]
    barrier: Callable[[], None]
    serialize: Callable[[torch.Tensor], bytes]


def _buckets(stream, bucket_bytes: int, keep: bool = True) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group the stream into buckets of at most `bucket_bytes` (a larger tensor goes alone).

    keep=False (ranks without an engine): yield (name, nbytes) placeholders instead of the tensors,
    so that no rank but the engine's owner ever holds more than the tensor in flight.
    """
    bucket, size = [], 0
    for name, t in stream:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t if keep else nbytes))
        size += nbytes
        del t
    if bucket:
        yield bucket


def _nbytes(x) -> int:
    return x if isinstance(x, int) else x.numel() * x.element_size()


def sync_weights(model, groups: ParallelGroups, engine, version: int, *, bucket_bytes: int = 512 * 2**20,
                 dtype: torch.dtype | None = None, verify: bool = False, probe_ids: torch.Tensor | None = None,
                 tol: float = 1e-4, stream_filter=None, per_rank: PerRankSync | None = None) -> SyncReport:
    """Collective over the model-parallel group. `engine` is None on ranks that do not own it;
    `per_rank` as in the module docstring (None: full tensors to the owner's engine).

    stream_filter: optional function over the (name, tensor) stream (tests use it to corrupt one).
    """
    t0 = time.perf_counter()
    begun = engine is None or not hasattr(engine, "begin_sync")
    stream = export_hf_stream(model, groups, dtype=dtype)
    if stream_filter is not None:
        stream = stream_filter(stream)
    n_t = n_b = n_buckets = 0
    for bucket in _buckets(stream, bucket_bytes, keep=engine is not None or per_rank is not None):
        n_buckets += 1
        n_t += len(bucket)
        n_b += sum(_nbytes(t) for _, t in bucket)
        if not begun:  # as late as possible: the first bucket was gathered while the engine still ran
            engine.begin_sync()
            begun = True
        if per_rank is not None:
            bucket = [(name, t.contiguous()) for name, t in bucket]  # the serialised copies: kept until read
            handles = per_rank.gather([per_rank.serialize(t) for _, t in bucket])  # [tp rank][tensor]
            if engine is not None:
                engine.update_weights_per_rank([(name, [h[i] for h in handles]) for i, (name, _) in enumerate(bucket)])
            per_rank.barrier()
        elif engine is not None:
            engine.update_weights(bucket, None)
        del bucket
    if not begun:
        engine.begin_sync()
    if engine is not None:
        engine.finish_sync(version)  # e.g. SGLang flushes its prefix cache here
    seconds = time.perf_counter() - t0
    if engine is not None:
        log.info("weight sync v%d: %d tensors, %.1f MiB in %d buckets, %.3f s", version, n_t, n_b / 2**20, n_buckets,
                 seconds)
    diff = None
    if verify:
        diff = verify_engine(model, groups, engine, probe_ids=probe_ids, tol=tol)
    return SyncReport(version, n_t, n_b, n_buckets, seconds, diff)


def _members(engine) -> list:
    """The engines behind `engine`: a remote weight group's servers, else the engine itself."""
    members = getattr(engine, "engines", None)
    return list(members) if members else [engine]


def _probe_by_sampling(model, groups: ParallelGroups, engine, probe_ids: torch.Tensor, vocab: int,
                       src: int, obj_group) -> float:
    """Greedy samples from every member engine vs the actor's recomputed log-probs of the same tokens.

    For engines without a logit probe (SGLang servers): the owner asks each engine, broadcasts the
    tokens inside the model-parallel group, and every rank runs the actor forward on them.
    """
    from ..models.forward import forward_logits, gather_full_logits
    from ..rollout import SamplingParams

    n = len(_members(engine)) if engine is not None else 0
    box = [n]
    if dist.is_initialized() and dist.get_world_size(groups.mp) > 1:
        dist.broadcast_object_list(box, src=src, group=obj_group)
    worst = 0.0
    prompts = probe_ids[:, : probe_ids.shape[1] // 2].tolist()
    for k in range(box[0]):
        payload = [None]
        if engine is not None:
            try:
                out = _members(engine)[k].generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=4))
                payload = [[(s.token_ids, s.logprobs) for s in out]]
            except Exception as exc:  # noqa: BLE001 - reported as an infinite difference below
                log.error("weight-sync probe of engine %d failed: %s", k, exc)
                payload = [None]
        if dist.is_initialized() and dist.get_world_size(groups.mp) > 1:
            dist.broadcast_object_list(payload, src=src, group=obj_group)
        samples = payload[0]
        if samples is None:
            worst = float("inf")
            continue
        width = max(len(p) + len(t) for p, (t, _) in zip(prompts, samples))
        seqs = torch.zeros(len(prompts), width, dtype=torch.long)
        for b, (p, (t, _)) in enumerate(zip(prompts, samples)):
            seqs[b, : len(p) + len(t)] = torch.tensor(p + t)
        full = gather_full_logits(forward_logits(model, groups, seqs), groups, vocab, tuple(seqs.shape))
        if engine is not None:
            logp = torch.log_softmax(full.double().cpu(), dim=-1)
            for b, (p, (toks, lps)) in enumerate(zip(prompts, samples)):
                for i, (t, lp) in enumerate(zip(toks, lps)):
                    d = abs(logp[b, len(p) - 1 + i, t].item() - lp)
                    if d > worst:
                        worst = d
                        if d > 1e-2:
                            log.error("engine %d: log-prob of token %d differs from the actor's by %.3e", k, t, d)
    return worst


def verify_engine(model, groups: ParallelGroups, engine, *, probe_ids: torch.Tensor | None = None,
                  tol: float = 1e-4, obj_group=None) -> float:
    """Max difference between every engine behind `engine` and the actor; raises above `tol`.

    Engines with a logit probe (`hf`): max |logit| difference on a probe batch. Others (SGLang,
    local or remote, every server of a weight group): max |log-prob| difference of greedy samples
    against the actor's recomputation. Collective over the model-parallel group (each replica
    checks its own engine); the owner compares and every rank of the group raises together.
    obj_group: where the probe's samples travel as objects (a gloo copy of the model-parallel
    group; default the group itself).
    """
    from ..models.forward import forward_logits, gather_full_logits

    vocab = unwrap_model(model).arch.vocab_size
    if probe_ids is None:
        probe_ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1234))
    src = dist.get_global_rank(groups.mp, 0) if dist.is_initialized() else 0
    obj_group = groups.mp if obj_group is None else obj_group
    kind = [None if engine is None else ("logits" if hasattr(engine, "probe_logits") else "sample")]
    if dist.is_initialized() and dist.get_world_size(groups.mp) > 1:
        dist.broadcast_object_list(kind, src=src, group=obj_group)
    verdict = torch.tensor([0.0], dtype=torch.float64, device=groups.device)
    if kind[0] == "sample":
        verdict[0] = _probe_by_sampling(model, groups, engine, probe_ids, vocab, src, obj_group)
    elif kind[0] == "logits":
        actor = gather_full_logits(forward_logits(model, groups, probe_ids), groups, vocab, tuple(probe_ids.shape))
        if engine is not None:
            ours = engine.probe_logits(probe_ids)[..., :vocab]
            verdict[0] = (ours.float() - actor.float().cpu()).abs().max().item()
    if dist.is_initialized() and dist.get_world_size(groups.mp) > 1:
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX, group=groups.mp)
    diff = float(verdict.item())
    if not diff <= tol:  # also catches NaN
        raise WeightSyncError(
            f"after the weight sync the engine's {'logits' if kind[0] == 'logits' else 'log-probs'} differ from the "
            f"actor's by {diff:.3e} (> {tol:.1e}); a tensor was lost, mis-mapped or corrupted on the way")
    return diff

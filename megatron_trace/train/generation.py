"""Where a step's rollouts come from (`rollout.placement`), and how the engines get the memory
and the weights back and forth (DESIGN section 11).

- colocated: one engine per data-parallel replica, owned by the replica's first rank (TP rank 0
  of PP stage 0). SGLang gets tp_size = parallel.tp and base_gpu_id = that rank's local GPU, so
  it uses the GPUs of the owner's TP group; on CPU it is one `hf` engine per replica.
- remote: SGLang servers (or one sglang-router) that global rank 0 sends requests to; trainer
  ranks do not generate. Weights go from rank 0 by broadcast over a group made as SGLang's
  `init_custom_process_group` makes it.
- rank0: one engine on global rank 0 (debugging; today's behaviour before scale-out).

Every rank calls `sample`, `score`, `sleep`, `wake` and `sync` in the same order; each does
its part and the results are the same on every rank. Scoring is split over the replicas too:
each engine owner verifies its share of the groups.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..parallel import ParallelGroups
from ..rollout.base import RolloutGroup, SamplingParams, rollout_stats
from ..rollout.dispatch import DispatchStats, EngineFleet, balance, colocated_generate

__all__ = ["Generation", "device_free_bytes"]

log = logging.getLogger(__name__)


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory on this rank's accelerator (every process's use counted), or None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0]


class Generation:
    """The rollout side of the loop for one rank (see the module docstring)."""

    def __init__(self, placement: str, groups: ParallelGroups, *, engine=None, fleet: EngineFleet | None = None,
                 sync_target=None, reconnect=None, max_retries: int = 2):
        self.placement = placement
        self.groups = groups
        self.engine = engine  # this rank's engine (colocated owner, or rank 0 for rank0)
        self.fleet = fleet  # remote: rank 0's client fleet
        self.sync_target = sync_target  # remote: rank 0's weight-broadcast group
        self._reconnect = reconnect  # remote: live servers -> a new weight group
        self.max_retries = max_retries
        self.expected_response_len: float | None = None
        self.last_stats = DispatchStats()
        # all_gather_object over NCCL would move pickles through the GPU: use gloo for objects.
        self._obj_group = None
        if dist.is_initialized() and dist.get_backend() != "gloo":
            self._obj_group = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------ who does what

    @staticmethod
    def owns_engine(placement: str, groups: ParallelGroups) -> bool:
        """Does this rank hold a local engine under `placement`?"""
        if placement == "colocated":
            return groups.tp_rank == 0 and groups.pp_rank == 0 and groups.cp_rank == 0
        if placement == "rank0":
            return dist.get_rank() == 0
        return False

    @property
    def scorers(self) -> int:
        """How many ranks verify rewards: every replica's first rank."""
        return self.groups.dp_size

    @property
    def is_scorer(self) -> bool:
        return self.owns_engine("colocated", self.groups)  # the replica's first rank

    def _all_gather(self, obj) -> list:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self._obj_group)
        return out

    def _broadcast(self, obj, src: int = 0):
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self._obj_group)
        return box[0]

    # ------------------------------------------------------------------ rollouts

    def sample(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int],
               metas: Sequence[dict]) -> tuple[list[RolloutGroup], dict[str, float]]:
        """Every rank: the step's rollout groups, in prompt order (prompts that failed on every
        engine are left out and counted in `rollout/failed_prompts`)."""
        t0 = time.perf_counter()
        if self.placement == "colocated":
            results, stats = colocated_generate(
                self.engine, self.groups.dp_rank, self.groups.dp_size, prompts, params, seeds, self._all_gather,
                max_retries=self.max_retries, expected_response_len=self.expected_response_len)
        else:
            payload = None
            if dist.get_rank() == 0:
                fleet = self.fleet if self.fleet is not None else EngineFleet([self.engine], ["rank0"],
                                                                              max_retries=self.max_retries)
                payload = fleet.generate(prompts, params, seeds, self.expected_response_len)
            results, stats = self._broadcast(payload)
        self.last_stats = stats
        groups = [RolloutGroup(i, list(p), r, dict(metas[i]))
                  for i, (p, r) in enumerate(zip(prompts, results)) if r is not None]
        metrics = rollout_stats([s for g in groups for s in g.samples])
        if groups:
            self.expected_response_len = metrics["rollout/response_len_mean"]
        metrics["rollout/failed_prompts"] = float(len(stats.failed))
        # How the work was spread: depends on the layout, so not an algorithm metric.
        metrics.update({k.replace("rollout/", "dispatch/"): v for k, v in stats.as_metrics().items()
                        if k != "rollout/failed_prompts"})
        metrics["time/generate"] = time.perf_counter() - t0
        return groups, metrics

    def score(self, groups: list[RolloutGroup], score_fn) -> list:
        """Every rank: score_fn(groups) -> scored groups, computed by the replicas' first ranks on
        a share each (balanced by response tokens) and gathered back in order."""
        if self.scorers == 1:  # one replica: its first rank (global rank 0) scores everything
            rank0 = not dist.is_initialized() or dist.get_rank() == 0
            return self._broadcast(score_fn(groups) if rank0 else None)
        costs = [sum(len(s.token_ids) + 1 for s in g.samples) for g in groups]
        share = balance(costs, self.scorers)[self.groups.dp_rank]
        mine = (share, score_fn([groups[i] for i in share])) if self.is_scorer else None
        out: list = [None] * len(groups)
        for part in self._all_gather(mine):
            if part is not None:
                for i, sg in zip(*part):
                    out[i] = sg
        return out

    # ------------------------------------------------------------------ memory hand-off

    def _measure(self, fn) -> float:
        """Run fn on this rank's engine; return the device memory it freed (negative: took)."""
        before = device_free_bytes(self.groups.device)
        fn()
        after = device_free_bytes(self.groups.device)
        return 0.0 if before is None else (after - before) / 2**30

    def sleep(self) -> dict[str, float]:
        """Before the train step: the engine releases its weights, KV cache and CUDA graphs."""
        if self.engine is None or self.placement == "remote":
            return {}
        return {"memory/engine_released_gb": self._measure(lambda: self.engine.sleep(None))}

    def wake(self, tags: Sequence[str]) -> dict[str, float]:
        """`wake(["weights"])` before a sync, `wake(["kv_cache", "cuda_graph"])` after it."""
        if self.engine is None or self.placement == "remote":
            return {}
        if self.groups.device.type == "cuda":
            # Activations, off-loaded state and freed grad buffers return to PyTorch's cache, not to
            # the GPU; SGLang allocates outside that cache, so hand the memory back first.
            torch.cuda.empty_cache()
        freed = self._measure(lambda: self.engine.wake(list(tags)))
        return {f"memory/engine_restored_{'_'.join(t for t in tags if t != 'cuda_graph')}_gb": -freed}

    # ------------------------------------------------------------------ weights

    def sync(self, ddp, version: int, verify: bool = False) -> dict[str, float]:
        """Each replica pushes its weights into its own engine (colocated); replica 0 into the
        servers (remote) or into rank 0's engine (rank0)."""
        from ..sync import sync_weights

        if self.placement == "colocated":
            return sync_weights(ddp, self.groups, self.engine, version=version, verify=verify).as_metrics()
        if self.groups.dp_rank != 0:  # the other replicas have no engine to feed
            return {}
        if self.placement == "remote" and dist.get_rank() == 0:
            self._drop_dead_servers()
        target = self.sync_target if self.placement == "remote" else self.engine
        if self.placement == "remote" and target is None and dist.get_rank() == 0:
            return {}  # rollout.remote.weight_sync=none
        return sync_weights(ddp, self.groups, target if dist.get_rank() == 0 else None, version=version,
                            verify=verify).as_metrics()

    def _drop_dead_servers(self) -> None:
        """A server that died leaves the weight group too: the group is rebuilt from the live
        ones (a broadcast to a dead peer would fail or hang)."""
        group = self.sync_target
        if group is None or self._reconnect is None:
            return
        live = [e for e in group.engines if e.health()]
        if len(live) == len(group.engines):
            return
        dead = [e.base_url for e in group.engines if e not in live]
        log.warning("weight sync: server(s) %s are down; rebuilding the weight group with %d live server(s)",
                    ", ".join(dead), len(live))
        try:
            group.close()
        except Exception as exc:  # noqa: BLE001 - the dead servers cannot answer the teardown
            log.info("closing the old weight group: %s", exc)
        if self.fleet is not None:
            for i, e in enumerate(self.fleet.engines):
                if getattr(e, "base_url", None) in dead and self.fleet.alive[i]:
                    self.fleet.alive[i] = False
        if not live:
            raise RuntimeError(f"every rollout server is down ({', '.join(dead)})")
        self.sync_target = self._reconnect(live)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        if self.sync_target is not None:
            try:
                self.sync_target.close()
            except Exception as exc:  # noqa: BLE001 - best effort at exit
                log.info("closing the weight group: %s", exc)
        if self.fleet is not None:
            for e in self.fleet.engines:
                e.shutdown()


"""Where a step's rollouts come from (`rollout.placement`), and how the engines get the memory
and the weights back and forth (DESIGN section 11).

- colocated: one engine per data-parallel replica, owned by the replica's first rank (TP rank 0
  of PP stage 0). SGLang gets tp_size = parallel.tp and base_gpu_id = that rank's local GPU, so
  it uses the GPUs of the owner's TP group; on CPU it is one `hf` engine per replica.
- remote: SGLang servers (or one sglang-router) that global rank 0 sends requests to; trainer
  ranks do not generate. Weights go from rank 0 by broadcast over a group made as SGLang's
  `init_custom_process_group` makes it (or nowhere: `rollout.remote.weight_sync=none`, which
  every rank reads from the config).
- rank0: one engine on global rank 0 (debugging; today's behaviour before scale-out).

Every rank calls `sample`, `score`, `sleep`, `wake`, `sync`, `verify` and `drive` in the same
order; each does its part and the results are the same on every rank. Scoring is split over the
replicas too: each engine owner verifies its share of the groups. Objects and waits go over
gloo groups with a long time-out (`parallel.host`), never over NCCL.

**The memory hand-off** (colocated). The engine's TP workers run on every GPU of the replica's
first stage, not only on the owner's, so every rank takes part:
    sleep:  owner releases the engine's memory -> barrier over the replica's model-parallel group
            (only then may any rank reload off-loaded state)
    wake:   every rank empties PyTorch's cache -> barrier -> owner resumes the engine's memory
The barrier in `wake` keeps the owner from resuming while another GPU of the replica still caches
the trainer's activations.

**In-loop evaluation** (`drive`): global rank 0 runs the evaluation harness; with colocated
engines its `generate` is a collective that spreads each batch over every replica's engine
(`colocated_generate`), while the other ranks serve those requests until rank 0 is done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from ..parallel import ParallelGroups
from ..parallel.host import HostGroups
from ..rollout.base import RolloutGroup, SamplingParams, rollout_stats
from ..rollout.dispatch import (
    DispatchingEngine,
    DispatchStats,
    EngineFleet,
    FleetEngine,
    balance,
    colocated_generate,
)

__all__ = ["Generation"]

log = logging.getLogger(__name__)


class Generation:
    """The rollout side of the loop for one rank (see the module docstring).

    remote_weight_sync: remote placement only; False for `rollout.remote.weight_sync=none`.
    per_rank_weights: colocated SGLang at TP > 1 (SGLang's SPMD weight path, `sync/weights.py`).
    cuda: the `torch.cuda` module on CUDA ranks (a test double may stand in), None on CPU.
    """

    def __init__(self, placement: str, groups: ParallelGroups, *, engine=None, fleet: EngineFleet | None = None,
                 sync_target=None, reconnect=None, max_retries: int = 2, remote_weight_sync: bool = True,
                 per_rank_weights: bool = False, wait_timeout_minutes: float = 360.0, cuda="auto"):
        self.placement = placement
        self.groups = groups
        self.engine = engine  # this rank's engine (colocated owner, or rank 0 for rank0)
        self.fleet = fleet  # remote: rank 0's client fleet
        self.sync_target = sync_target  # remote: rank 0's weight-broadcast group
        self._reconnect = reconnect  # remote: live servers -> a new weight group
        self.max_retries = max_retries
        self.remote_weight_sync = remote_weight_sync
        self.per_rank_weights = per_rank_weights and placement == "colocated" and groups.pp_rank == 0
        self.cuda = (torch.cuda if groups.device.type == "cuda" else None) if cuda == "auto" else cuda
        self.pause_mode: str | None = None  # remote, asynchronous: the servers pause (not abort) for a sync
        self.expected_response_len: float | None = None
        self.last_stats = DispatchStats()
        self.host = HostGroups.build(groups.mp, groups.tp, wait_timeout_minutes)

    # ------------------------------------------------------------------ who does what

    @staticmethod
    def owns_engine(placement: str, groups: ParallelGroups) -> bool:
        """Does this rank hold a local engine under `placement`?"""
        if placement == "colocated":
            return groups.tp_rank == 0 and groups.pp_rank == 0 and groups.cp_rank == 0
        if placement == "rank0":
            return _rank() == 0
        return False

    @property
    def scorers(self) -> int:
        """How many ranks verify rewards: every replica's first rank."""
        return self.groups.dp_size

    @property
    def is_scorer(self) -> bool:
        return self.owns_engine("colocated", self.groups)  # the replica's first rank

    def broadcast(self, obj, src: int = 0):
        """obj of global rank `src` on every rank (gloo)."""
        return self.host.broadcast(obj, src)

    def all_gather(self, obj) -> list:
        """Every rank's obj, in rank order (gloo)."""
        return self.host.all_gather(obj)

    # ------------------------------------------------------------------ rollouts

    def _colocated(self, prompts, params, seeds):
        return colocated_generate(self.engine, self.groups.dp_rank, self.groups.dp_size, prompts, params, seeds,
                                  self.all_gather, max_retries=self.max_retries,
                                  expected_response_len=self.expected_response_len)

    def sample(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int],
               metas: Sequence[dict], local: bool = False) -> tuple[list[RolloutGroup], dict[str, float]]:
        """Every rank: the step's rollout groups, in prompt order (prompts that failed on every
        engine are left out and counted in `rollout/failed_prompts`).

        local: rank 0 alone, without a collective (the asynchronous producer's thread; remote
        placement), the other ranks do not call it."""
        t0 = time.perf_counter()
        if self.placement == "colocated":
            if local:
                raise RuntimeError("colocated engines generate collectively; local sampling is for remote servers")
            results, stats = self._colocated(prompts, params, seeds)
        else:
            payload = None
            if local or _rank() == 0:
                fleet = self.fleet if self.fleet is not None else EngineFleet([self.engine], ["rank0"],
                                                                              max_retries=self.max_retries)
                payload = fleet.generate(prompts, params, seeds, self.expected_response_len)
            results, stats = payload if local else self.broadcast(payload)
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

    def score(self, groups: list[RolloutGroup], score_fn, local: bool = False) -> list:
        """Every rank: score_fn(groups) -> scored groups, computed by the replicas' first ranks on
        a share each (balanced by response tokens) and gathered back in order. local: rank 0
        alone scores everything (as in `sample`)."""
        if local:
            return score_fn(groups)
        if self.scorers == 1:  # one replica: its first rank (global rank 0) scores everything
            return self.broadcast(score_fn(groups) if _rank() == 0 else None)
        costs = [sum(len(s.token_ids) + 1 for s in g.samples) for g in groups]
        share = balance(costs, self.scorers)[self.groups.dp_rank]
        mine = (share, score_fn([groups[i] for i in share])) if self.is_scorer else None
        out: list = [None] * len(groups)
        for part in self.all_gather(mine):
            if part is not None:
                for i, sg in zip(*part):
                    out[i] = sg
        return out

    # ------------------------------------------------------------------ evaluation

    def drive(self, fn: Callable[[object], object]):
        """Every rank: global rank 0 returns fn(engine); the others serve its engine requests and
        return None. `engine` spreads each `generate` over every replica's engine (colocated), or
        is rank 0's fleet or engine. An exception on rank 0 is raised on every rank."""
        if _rank() != 0:
            return self._serve()
        engine = _CollectiveEngine(self) if self.placement == "colocated" else self._rank0_engine()
        error = None
        try:
            return fn(engine)
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.broadcast(("done", error))

    def _rank0_engine(self):
        if self.fleet is not None:
            return FleetEngine(self.fleet)
        return self.engine

    def _serve(self) -> None:
        while True:
            kind, *args = self.broadcast(None)
            if kind == "generate":
                self._colocated(*args)
            elif kind == "done":
                if args[0] is not None:
                    raise RuntimeError(f"rank 0 failed while the other ranks served it: {args[0]}")
                return None

    # ------------------------------------------------------------------ memory hand-off

    def _free_bytes(self) -> int | None:
        """Free memory on this rank's accelerator (every process's use counted), or None on CPU."""
        if self.cuda is None:
            return None
        self.cuda.synchronize(self.groups.device)
        return self.cuda.mem_get_info(self.groups.device)[0]

    def _measure(self, fn) -> float:
        """Run fn on this rank's engine; return the device memory it freed (negative: took)."""
        before = self._free_bytes()
        fn()
        after = self._free_bytes()
        return 0.0 if before is None else (after - before) / 2**30

    def sleep(self) -> dict[str, float]:
        """Before the train step: the engine releases its weights, KV cache and CUDA graphs. Every
        rank of the replica returns only after that (they may reload off-loaded state next)."""
        if self.placement == "remote":
            return {}
        out = {}
        if self.engine is not None:
            out["memory/engine_released_gb"] = self._measure(lambda: self.engine.sleep(None))
        self.host.barrier_mp()
        return out

    def wake(self, tags: Sequence[str]) -> dict[str, float]:
        """`wake(["weights"])` before a sync, `wake(["kv_cache", "cuda_graph"])` after it."""
        if self.placement == "remote":
            return {}
        if self.cuda is not None:
            # Activations, off-loaded state and freed grad buffers return to PyTorch's cache, not to
            # the GPU; SGLang allocates outside that cache, on every GPU of the replica.
            self.cuda.empty_cache()
        self.host.barrier_mp()
        if self.engine is None:
            return {}
        freed = self._measure(lambda: self.engine.wake(list(tags)))
        return {f"memory/engine_restored_{'_'.join(t for t in tags if t != 'cuda_graph')}_gb": -freed}

    # ------------------------------------------------------------------ weights

    def _target(self):
        """(does this rank's replica sync, this rank's engine or weight group or None). Remote:
        the weight group as it stands (`sync` rebuilds it first when a server died)."""
        if self.placement == "colocated":
            return True, self.engine
        if self.groups.dp_rank != 0:  # the other replicas have no engine to feed
            return False, None
        if self.placement == "remote":
            if not self.remote_weight_sync:  # every rank knows it from the config
                return False, None
            return True, self.sync_target if _rank() == 0 else None
        return True, self.engine if _rank() == 0 else None

    def sync(self, ddp, version: int) -> dict[str, float]:
        """Each replica pushes its weights into its own engine (colocated); replica 0 into the
        servers (remote) or into rank 0's engine (rank0)."""
        from ..sync import PerRankSync, sync_weights

        if self.placement == "remote" and self.remote_weight_sync and _rank() == 0:
            self._drop_dead_servers()
        syncs, target = self._target()
        if not syncs:
            return {}
        per_rank = None
        if self.per_rank_weights:
            from ..rollout.sglang import serialize_local

            per_rank = PerRankSync(self.host.gather_tp, self.host.barrier_tp, serialize_local)
        paused = self.placement == "remote" and self.pause_mode is not None and target is not None
        if paused:
            target.pause_mode = self.pause_mode  # (also a group rebuilt after a server died)
        out = sync_weights(ddp, self.groups, target, version=version, per_rank=per_rank).as_metrics()
        if paused:
            out["async/pause_s"] = target.last_pause_s
        return out

    def verify(self, ddp, tol: float) -> dict[str, float]:
        """After a sync and `wake(["kv_cache", ...])`: every engine against the actor (raises
        `WeightSyncError` above tol). Collective over each syncing replica."""
        from ..sync import verify_engine

        syncs, target = self._target()
        if not syncs:
            return {}
        diff = verify_engine(ddp, self.groups, target, tol=tol, obj_group=self.host.mp)
        return {"sync/verify_max_abs_diff": diff}

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


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


class _CollectiveEngine(DispatchingEngine):
    """Rank 0's engine in `Generation.drive` with colocated engines: each `generate` is sent to
    every rank and spread over every replica's engine."""

    def __init__(self, gen: Generation):
        super().__init__()
        self.gen = gen
        self.weight_version = gen.engine.weight_version if gen.engine is not None else 0

    def _dispatch(self, prompts, params, seeds):
        prompts = [list(p) for p in prompts]
        self.gen.broadcast(("generate", prompts, params, seeds))
        return self.gen._colocated(prompts, params, seeds)

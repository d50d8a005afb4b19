"""Gloo groups for the host side of a step: pickled objects and waits on other ranks' slow work.

Rollouts, stage records and metrics travel between ranks as Python objects, and ranks wait on
each other while some of them generate, annotate or evaluate (a recipe's in-loop evaluation runs
for tens of minutes). Neither belongs on NCCL: objects would be staged through the GPU, and a rank
blocked in an NCCL collective for longer than the group's time-out (Megatron's default, 30 min)
is killed by `TORCH_NCCL_ASYNC_ERROR_HANDLING`. These groups are gloo, whatever the training
backend, with their own time-out (`parallel.wait_timeout_minutes`, hours by default): longer than
the slowest generation, annotation or evaluation a rank waits through.

`HostGroups.build` is collective over the world (every rank calls it once, in the same place).
Without torch.distributed (a plain single process) every operation is local.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["HostGroups"]


def _subgroup(mine: list[int], world: dist.ProcessGroup, timeout: datetime.timedelta) -> dist.ProcessGroup:
    """A gloo group for every distinct rank list the ranks hold (collective over `world`); returns
    the one holding this rank. Every rank must create every group, in the same order."""
    lists: list = [None] * dist.get_world_size()
    dist.all_gather_object(lists, sorted(mine), group=world)
    own = None
    for ranks in sorted({tuple(r) for r in lists}):
        g = dist.new_group(list(ranks), backend="gloo", timeout=timeout)
        if dist.get_rank() in ranks:
            own = g
    assert own is not None
    return own


@dataclass
class HostGroups:
    """This rank's gloo groups: the world, its model-parallel group (TP x PP of its replica) and
    its TP group. All None without torch.distributed."""

    world: dist.ProcessGroup | None = None
    mp: dist.ProcessGroup | None = None
    tp: dist.ProcessGroup | None = None
    timeout: datetime.timedelta | None = None

    @classmethod
    def build(cls, mp: dist.ProcessGroup, tp: dist.ProcessGroup, timeout_minutes: float) -> HostGroups:
        """Collective: gloo copies of the world and of the given model-parallel and TP groups."""
        if not dist.is_initialized():
            return cls()
        timeout = datetime.timedelta(minutes=timeout_minutes)
        world = dist.new_group(backend="gloo", timeout=timeout)
        return cls(world=world, mp=_subgroup(dist.get_process_group_ranks(mp), world, timeout),
                   tp=_subgroup(dist.get_process_group_ranks(tp), world, timeout), timeout=timeout)

    @property
    def active(self) -> bool:
        return self.world is not None and dist.get_world_size(self.world) > 1

    def broadcast(self, obj, src: int = 0):
        """obj of global rank `src`, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.world)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's obj, in rank order."""
        if not self.active:
            return [obj]
        out: list = [None] * dist.get_world_size(self.world)
        dist.all_gather_object(out, obj, group=self.world)
        return out

    def gather_tp(self, obj) -> list:
        """Every TP rank's obj (this rank's TP group), in TP-rank order, on every rank of the group."""
        if self.tp is None or dist.get_world_size(self.tp) == 1:
            return [obj]
        out: list = [None] * dist.get_world_size(self.tp)
        dist.all_gather_object(out, obj, group=self.tp)
        return out

    def barrier_mp(self) -> None:
        """Wait for every rank of this replica's model-parallel group."""
        if self.mp is not None and dist.get_world_size(self.mp) > 1:
            dist.barrier(group=self.mp)

    def barrier_tp(self) -> None:
        if self.tp is not None and dist.get_world_size(self.tp) > 1:
            dist.barrier(group=self.tp)

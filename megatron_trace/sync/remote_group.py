"""A process group shared with SGLang servers for weight updates, outside the default group.

SGLang 0.5.6 (`sglang/srt/model_executor/model_runner.py::init_weights_update_group`) joins a
weight-update group with its own `sglang/srt/utils/common.py::init_custom_process_group`:

  1. `rendezvous(init_method, rank, world_size, timeout=...)` -> (store, rank, world_size);
     `store.set_timeout(timeout)`. With `tcp://host:port`, rank 0 hosts the TCPStore.
  2. `store = PrefixStore(group_name, store)`.
  3. torch's private `distributed_c10d._new_process_group_helper(world_size, rank, [], backend,
     store, group_name=group_name, <options>=None, timeout=timeout, device_id=None)`, which wraps
     the store once more in `PrefixStore(f"{group_name}/", ...)`.
  4. `_world.pg_group_ranks[pg] = {i: i for i in range(world_size)}`, so that `dist.broadcast(t,
     src=0, group=pg)` maps rank 0 of the group without a default group.

The trainer (rank 0) must build its side the same way: any other key layout in the store and the
ranks never meet (gloo times out, NCCL hangs). This module re-implements those steps; it never
creates or changes the default process group.

The options argument of `_new_process_group_helper` was `pg_options` before torch 2.6 and is
`backend_options` since. SGLang 0.5.6 picks the name with a *string* comparison,
`str(torch.__version__) >= "2.6"`, which is right for its pinned torch 2.9.1 but wrong for 2.10 and
later ("2.13" < "2.6" as strings); here the helper's signature decides.
"""

from __future__ import annotations

import inspect
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["destroy_custom_process_group", "init_custom_process_group"]


def _options_kwarg(helper) -> str | None:
    params = inspect.signature(helper).parameters
    for name in ("backend_options", "pg_options"):
        if name in params:
            return name
    return None


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                              timeout: timedelta | float | None = None, options=None,
                              device_id: torch.device | None = None):
    """Create (and join) a process group the way SGLang's weight-update group is created.

    backend: "gloo" or "nccl". init_method: "tcp://host:port" (rank 0 hosts the store there).
    timeout: a timedelta or seconds; None = torch's default process-group timeout.
    Blocks until every rank has joined for backends that connect eagerly (gloo). Returns the
    ProcessGroup; use it as `group=` in `dist.broadcast(t, src=0, group=pg)`.
    """
    from torch.distributed import distributed_c10d as c10d

    if not group_name:
        raise ValueError("group_name must be a non-empty string (SGLang uses it as the store prefix)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if timeout is None:
        timeout = c10d.default_pg_timeout
    elif not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    backend_ = c10d.Backend(backend) if backend else c10d.Backend("undefined")

    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)

    kwargs = {"group_name": group_name, "timeout": timeout}
    opt_name = _options_kwarg(c10d._new_process_group_helper)
    if opt_name is not None:
        kwargs[opt_name] = options
    if "device_id" in inspect.signature(c10d._new_process_group_helper).parameters:
        kwargs["device_id"] = device_id

    # torch splits a new NCCL communicator from the default group when that group is eagerly
    # initialised (bound to a device). The weight-update group's members are not a subset of the
    # trainer's world, so a split would be wrong: hide the binding while the group is created.
    default_pg = c10d._get_default_group() if dist.is_initialized() else None
    bound = getattr(default_pg, "bound_device_id", None) if default_pg is not None else None
    if bound is not None:
        default_pg.bound_device_id = None
    try:
        pg, _ = c10d._new_process_group_helper(world_size, rank, [], backend_, store, **kwargs)
    finally:
        if bound is not None:
            default_pg.bound_device_id = bound
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_custom_process_group(pg) -> None:
    """Tear down a group made by `init_custom_process_group` (the default group is untouched)."""
    if pg is not None:
        dist.destroy_process_group(pg)

"""Two warnings that megatron-core 0.16 prints at every step, which a user cannot act on, removed
where they start (on CPU and GPU alike; `state.initialize` calls `apply()` on every rank):

1. **Deprecated collectives.** Megatron binds `torch.distributed.all_gather_into_tensor` and
   `reduce_scatter_tensor` into module globals at import (`dist_all_gather_func`,
   `dist_reduce_scatter_func`); torch 2.13 deprecates both in favour of `all_gather_single` and
   `reduce_scatter_single`, same arguments. Where torch has the new names, those globals are
   rebound to them (a global that Megatron set to something else, such as its fp32-accumulating
   reduce-scatter, is left alone). On an older torch nothing changes and nothing warns.
2. **The distributed optimizer's `zero_grad`** reads `.grad` of its fp32 shard views, which are
   not leaf tensors (Megatron's own comment there: "throws grad-access warning"); torch warns on
   every such read. The cause is in Megatron, so only that call runs with exactly that warning
   ignored.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch.distributed as dist

__all__ = ["apply"]

# module -> the globals that hold a collective
_COLLECTIVE_GLOBALS = {
    "megatron.core.distributed.param_and_grad_buffer": ("dist_all_gather_func", "dist_reduce_scatter_func"),
    "megatron.core.tensor_parallel.mappings": ("dist_all_gather_func", "dist_reduce_scatter_func"),
    "megatron.core.tensor_parallel.layers": ("dist_all_gather_func", "dist_reduce_scatter_func"),
    "megatron.core.utils": ("dist_all_gather_func",),
}
_NON_LEAF_GRAD = r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"


def _current_collectives() -> dict:
    """deprecated torch function -> its replacement, for the ones this torch has."""
    pairs = {"all_gather_into_tensor": "all_gather_single", "reduce_scatter_tensor": "reduce_scatter_single"}
    return {getattr(dist, old): getattr(dist, new) for old, new in pairs.items()
            if hasattr(dist, old) and hasattr(dist, new)}


def _quiet_non_leaf_grad(fn):
    if getattr(fn, "_mt_quiet", False):
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NON_LEAF_GRAD, category=UserWarning)
            return fn(*args, **kwargs)

    wrapped._mt_quiet = True
    return wrapped


def apply() -> None:
    """Idempotent."""
    replace = _current_collectives()
    for name, attrs in _COLLECTIVE_GLOBALS.items():
        module = importlib.import_module(name)
        for attr in attrs:
            current = getattr(module, attr, None)
            if current in replace:
                setattr(module, attr, replace[current])
    from megatron.core.optimizer import distrib_optimizer

    distrib_optimizer._zero_grad_group_helper = _quiet_non_leaf_grad(distrib_optimizer._zero_grad_group_helper)

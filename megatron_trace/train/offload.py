"""Give the rollout engine the trainer's optimizer state and gradient memory while it generates.

`train.offload_during_rollout` (colocated placement): after the train step the optimizer's state
(Adam moments, and fp32 master weights under mixed precision) is copied to host memory (pinned
on CUDA) and its device storage released; the DDP gradient buffers are released outright (the
next step zeroes them anyway). `reload` restores both before the next train step. Storage is
resized in place, so every view (`param.main_grad`, the optimizer's references) stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["TrainerOffload"]


def _torch_optimizers(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            yield opt, inner


def _grad_buffers(ddp):
    for name in ("buffers", "expert_parallel_buffers"):
        for buf in getattr(ddp, name, None) or []:
            yield buf.grad_data


@dataclass
class TrainerOffload:
    ddp: object
    optimizer: object
    offloaded: bool = False
    _host: list = field(default_factory=list, repr=False)  # (device tensor, host copy)
    _grad_sizes: list = field(default_factory=list, repr=False)

    def _state_tensors(self):
        model_params = {id(p) for p in self.ddp.parameters()}
        seen = set()
        for _, inner in _torch_optimizers(self.optimizer):
            for group in inner.param_groups:
                for p in group["params"]:
                    if id(p) not in model_params and id(p) not in seen:  # fp32 master copies
                        seen.add(id(p))
                        yield p.data
            for st in inner.state.values():
                for v in st.values():
                    if torch.is_tensor(v) and v.numel() > 1 and id(v) not in seen:
                        seen.add(id(v))
                        yield v

    def offload(self) -> dict[str, float]:
        """Release the device memory of the optimizer state and the gradient buffers."""
        if self.offloaded:
            return {}
        state_bytes = grad_bytes = 0
        for t in self._state_tensors():
            storage = t.untyped_storage()
            if storage.nbytes() == 0:
                continue
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            host.copy_(t, non_blocking=t.is_cuda)
            self._host.append((t, host, storage.nbytes()))
            state_bytes += storage.nbytes()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for t, _, _ in self._host:
            t.untyped_storage().resize_(0)
        for g in _grad_buffers(self.ddp):
            n = g.untyped_storage().nbytes()
            self._grad_sizes.append((g, n))
            g.untyped_storage().resize_(0)
            grad_bytes += n
        self.offloaded = True
        return {"memory/offloaded_optimizer_gb": state_bytes / 2**30, "memory/released_grad_buffers_gb": grad_bytes / 2**30}

    def reload(self) -> None:
        if not self.offloaded:
            return
        for t, host, nbytes in self._host:
            t.untyped_storage().resize_(nbytes)
            t.copy_(host, non_blocking=t.is_cuda)
        for g, n in self._grad_sizes:
            g.untyped_storage().resize_(n)
            g.zero_()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._host.clear()
        self._grad_sizes.clear()
        self.offloaded = False

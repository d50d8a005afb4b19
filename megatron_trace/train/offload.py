"""Give the rollout engine the trainer's optimizer state and gradient memory while it generates.

`train.offload_during_rollout` (colocated placement): after the train step the optimizer's own
memory (Adam moments / SGD momentum, and fp32 master weights under mixed precision) is copied to
host memory (pinned on CUDA) and its device storage released; the DDP gradient buffers are
released outright (the next step zeroes them anyway). `reload` restores both before the next
train step.

The work is done per *storage*, never per tensor, for two reasons:

* Several optimizer tensors may be views of one storage (a flat buffer). Each storage is copied
  to the host whole, resized to 0, and on reload resized back and its bytes copied in, so every
  view of it (`param.main_grad`, the optimizer's references) stays valid and nothing is handled
  twice.
* Not every tensor the optimizer holds is its own memory. With Megatron's distributed optimizer
  the param-group tensors of fp32 parameters (fp32 runs, and the fp32 RMSNorm weights of the
  local spec in bf16 runs) are shard views `model_param.detach().view(-1)[start:end]` into DDP's
  parameter buffer (`ddp.buffers[i].param_data`): releasing their storage would free the whole
  model, and the weight sync would then read freed memory (a SIGSEGV on CPU). So a storage that a
  model parameter or a DDP buffer (`param_data`/`grad_data` of `buffers` and
  `expert_parallel_buffers`) also uses is never off-loaded by the optimizer path: parameter
  storages stay on the device, and grad-buffer storages are released only by the grad path. Such
  tensors are reported as `memory/offload_skipped_shared_gb`; `memory/offloaded_optimizer_gb`
  counts only the bytes actually moved. (The distributed optimizer's fp32 main copies of bf16
  params, `shard_fp32_from_float16_groups`, are clones and are moved; the shard `.grad`s and
  `param.main_grad` are views into the released grad buffer, which nothing reads before `reload`
  restores and zeroes it.)
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


def _chunks(ddp):
    return ddp if isinstance(ddp, (list, tuple)) else [ddp]


def _ddp_buffers(ddp):
    for chunk in _chunks(ddp):
        for name in ("buffers", "expert_parallel_buffers"):
            yield from getattr(chunk, name, None) or []


def _grad_buffers(ddp):
    for buf in _ddp_buffers(ddp):
        g = getattr(buf, "grad_data", None)
        if torch.is_tensor(g):
            yield g


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _shared_storages(ddp) -> set[int]:
    """data_ptrs of the storages the model itself uses: parameters, their main grads, and the
    param/grad buffers of DDP."""
    keys = set()
    for chunk in _chunks(ddp):
        for p in chunk.parameters():
            keys.add(_key(p))
            main_grad = getattr(p, "main_grad", None)
            if torch.is_tensor(main_grad):
                keys.add(_key(main_grad))
    for buf in _ddp_buffers(ddp):
        for name in ("param_data", "grad_data"):
            t = getattr(buf, name, None)
            if torch.is_tensor(t):
                keys.add(_key(t))
    keys.discard(0)  # empty storages
    return keys


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over the whole storage."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


@dataclass
class TrainerOffload:
    ddp: object
    optimizer: object
    offloaded: bool = False
    _host: list = field(default_factory=list, repr=False)  # (device storage, host bytes)
    _grad_sizes: list = field(default_factory=list, repr=False)  # (grad storage, nbytes)

    def _state_tensors(self):
        """The optimizer's tensors: param-group tensors that are not model parameters (master
        copies, distributed-optimizer shards) and state tensors (the step counter excluded)."""
        model_params = {id(p) for chunk in _chunks(self.ddp) for p in chunk.parameters()}
        seen = set()
        for _, inner in _torch_optimizers(self.optimizer):
            for group in inner.param_groups:
                for p in group["params"]:
                    if id(p) not in model_params and id(p) not in seen:
                        seen.add(id(p))
                        yield p.data
            for st in inner.state.values():
                for v in st.values():
                    if torch.is_tensor(v) and v.numel() > 1 and id(v) not in seen:
                        seen.add(id(v))
                        yield v

    def _plan(self):
        """Group the optimizer's tensors by storage. Returns ({data_ptr: storage} to move,
        bytes of optimizer tensors skipped because their storage is the model's)."""
        shared = _shared_storages(self.ddp)
        move: dict[int, torch.UntypedStorage] = {}
        skipped = 0
        for t in self._state_tensors():
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if storage.nbytes() == 0 or key == 0:
                continue
            if key in shared:
                skipped += t.numel() * t.element_size()
            else:
                move.setdefault(key, storage)
        return move, skipped

    def offload(self) -> dict[str, float]:
        """Release the device memory of the optimizer state and the gradient buffers."""
        if self.offloaded:
            return {}
        move, skipped = self._plan()
        state_bytes = grad_bytes = 0
        for storage in move.values():
            on_cuda = storage.device.type == "cuda"
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, device="cpu", pin_memory=on_cuda)
            host.copy_(_as_bytes(storage), non_blocking=on_cuda)
            self._host.append((storage, host))
            state_bytes += storage.nbytes()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for storage, _ in self._host:
            storage.resize_(0)
        released = set()
        for g in _grad_buffers(self.ddp):
            storage = g.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in released:
                continue
            released.add(storage.data_ptr())
            n = storage.nbytes()
            self._grad_sizes.append((storage, n))
            storage.resize_(0)
            grad_bytes += n
        self.offloaded = True
        return {"memory/offloaded_optimizer_gb": state_bytes / 2**30,
                "memory/offload_skipped_shared_gb": skipped / 2**30,
                "memory/released_grad_buffers_gb": grad_bytes / 2**30}

    def reload(self) -> None:
        if not self.offloaded:
            return
        for storage, host in self._host:
            storage.resize_(host.numel())
            _as_bytes(storage).copy_(host, non_blocking=storage.device.type == "cuda")
        for storage, n in self._grad_sizes:
            storage.resize_(n)
            _as_bytes(storage).zero_()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._host.clear()
        self._grad_sizes.clear()
        self.offloaded = False

"""Teacher weights for the privileged forward pass (DESIGN section 2, step 4).

live      the actor itself (`train_step(teacher=None)`): no extra memory; the teacher moves
          with every update.
snapshot  a second module of the same layout, refreshed from the actor at the start of every
          step that is a multiple of `sync_every` (step 0 included), while the schedule still
          needs a teacher. With `offload`, its weights wait in CPU memory between passes and
          visit the accelerator only for the teacher forward.

The snapshot is part of run checkpoints (its weights through `dist_checkpointing`, its version in
trainer_state.json; train/checkpoint.py), so a resumed run uses the same teacher as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib

import torch

from ..models.builder import build_model, unwrap_model

__all__ = ["SnapshotTeacher"]


class SnapshotTeacher:
    def __init__(self, arch, groups, *, params_dtype: torch.dtype, use_te: bool | None, sync_every: int,
                 offload: bool = False):
        self.groups, self.sync_every, self.offload = groups, sync_every, offload
        self.module = build_model(arch, groups, params_dtype=params_dtype, use_te=use_te, perform_initialization=False)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.version = -1  # the actor step the weights were taken at
        if offload:
            self.module.to("cpu")

    def due(self, step: int) -> bool:
        """A refresh is due at multiples of sync_every, and whenever the snapshot holds no weights yet."""
        return self.version < 0 or (step % self.sync_every == 0 and self.version != step)

    @torch.no_grad()
    def refresh(self, actor, step: int) -> None:
        """Copy the actor's current weights (this rank's shards) into the snapshot."""
        src = unwrap_model(actor).state_dict(keep_vars=False)
        for name, t in self.module.state_dict(keep_vars=True).items():
            if isinstance(t, torch.Tensor) and name in src:
                t.copy_(src[name].to(t.device))
        self.version = step

    @contextlib.contextmanager
    def on_device(self):
        """The module, on the accelerator for the duration of the block."""
        if self.offload and self.groups.device.type != "cpu":
            self.module.to(self.groups.device)
            try:
                yield self.module
            finally:
                self.module.to("cpu")
        else:
            yield self.module

"""A KV cache for the `hf` engine's decode loop: preallocated once per batch, written in place,
and able to drop finished rows.

transformers' default `DynamicCache` concatenates every layer's keys and values with the new
token's at every step, copying the whole cache each time; on the demo model that copy was a third
of a decode step on CPU. Here each layer allocates `[batch, heads, capacity, head_dim]` on its
first update (prompt length + max_new_tokens), writes new entries into the next free columns and
hands the model views of the filled part, so attention still runs over the filled length only.

`keep(rows, drop_left)` compacts: it keeps the given batch rows (finished rows leave) and drops
the first `drop_left` columns (left padding that no remaining row needs), so that compute follows
the live rows. The layer subclasses transformers' `DynamicLayer` for everything else (mask sizes,
sequence length), which exists with this shape from transformers 4.56 on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["GrowingCache"]


class _GrowingLayer(DynamicLayer):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        value_states = key_states if value_states is None else value_states
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, dk = key_states.shape
        self._k = key_states.new_empty((b, h, self.capacity, dk))
        self._v = value_states.new_empty((b, value_states.shape[1], self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def _expose(self) -> None:
        self.keys = self._k[:, :, : self._len]
        self.values = self._v[:, :, : self._len]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._k is None:
            self.lazy_initialization(key_states, value_states)
        end = self._len + key_states.shape[-2]
        if end > self._k.shape[2]:
            raise RuntimeError(f"KV cache full: {end} positions for a capacity of {self._k.shape[2]}")
        self._k[:, :, self._len:end].copy_(key_states)
        self._v[:, :, self._len:end].copy_(value_states)
        self._len = end
        self._expose()
        return self.keys, self.values

    def keep(self, rows: torch.Tensor, drop_left: int) -> None:
        if self._k is None:
            return
        self._k = self._k[rows, :, drop_left:]
        self._v = self._v[rows, :, drop_left:]
        self._len -= drop_left
        self._expose()


class GrowingCache(Cache):
    """One `_GrowingLayer` per decoder layer, each holding `capacity` positions."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[_GrowingLayer(capacity) for _ in range(num_layers)])

    def keep(self, rows: Sequence[int] | torch.Tensor, drop_left: int = 0) -> None:
        """Keep batch rows `rows` (in that order) and drop the first `drop_left` columns."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        for layer in self.layers:
            layer.keep(idx.to(layer.device) if layer.is_initialized else idx, drop_left)

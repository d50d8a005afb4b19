"""Metrics with declared cross-rank reductions.

Every metric says how it combines across ranks and micro-batches, so that the logged number is
the one a single process holding the whole batch would compute:
  mean: a (sum, count) pair; ranks add both, the value is sum / count
  sum:  ranks add values (e.g. partial losses already normalised by global counts)
  max / min: elementwise over ranks
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Stats"]


class Stats:
    def __init__(self) -> None:
        self._mean: dict[str, list[torch.Tensor]] = {}
        self._sum: dict[str, torch.Tensor] = {}
        self._max: dict[str, torch.Tensor] = {}
        self._min: dict[str, torch.Tensor] = {}

    @staticmethod
    def _f(x) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.float64).detach().reshape(())

    def mean(self, name: str, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate the mean of `values` (optionally only where `mask`)."""
        v = values.detach().double()
        if mask is not None:
            v = v[mask]
        s, c = self._mean.setdefault(name, [torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)])
        s += v.sum().cpu()
        c += v.numel()

    def mean_of(self, name: str, total, count) -> None:
        """Accumulate a mean from an explicit numerator and denominator."""
        s, c = self._mean.setdefault(name, [torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)])
        s += self._f(total).cpu()
        c += self._f(count).cpu()

    def sum(self, name: str, value) -> None:
        self._sum[name] = self._sum.get(name, torch.zeros((), dtype=torch.float64)) + self._f(value).cpu()

    def max(self, name: str, value) -> None:
        v = self._f(value).cpu()
        self._max[name] = torch.maximum(self._max[name], v) if name in self._max else v

    def min(self, name: str, value) -> None:
        v = self._f(value).cpu()
        self._min[name] = torch.minimum(self._min[name], v) if name in self._min else v

    def merge(self, other: Stats) -> Stats:
        """Fold another micro-batch's stats into this one (same rules as across ranks)."""
        for k, (s, c) in other._mean.items():
            self.mean_of(k, s, c)
        for k, v in other._sum.items():
            self.sum(k, v)
        for k, v in other._max.items():
            self.max(k, v)
        for k, v in other._min.items():
            self.min(k, v)
        return self

    def reduce(self, group=None, device: torch.device | str = "cpu") -> dict[str, float]:
        """Combine across `group` (every rank must hold the same metric names) and return floats.

        A mean with count 0 (e.g. FKL on a batch with no key spans) is NaN, not 0.
        """
        mean_keys, sum_keys = sorted(self._mean), sorted(self._sum)
        max_keys, min_keys = sorted(self._max), sorted(self._min)
        adds = torch.stack([x for k in mean_keys for x in self._mean[k]] + [self._sum[k] for k in sum_keys]
                           + [torch.zeros((), dtype=torch.float64)])
        maxes = torch.stack([self._max[k] for k in max_keys] + [-self._min[k] for k in min_keys]
                            + [torch.zeros((), dtype=torch.float64)])
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            adds, maxes = adds.to(device), maxes.to(device)
            dist.all_reduce(adds, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            adds, maxes = adds.cpu(), maxes.cpu()
        out: dict[str, float] = {}
        for i, k in enumerate(mean_keys):
            s, c = adds[2 * i].item(), adds[2 * i + 1].item()
            out[k] = s / c if c else float("nan")
        off = 2 * len(mean_keys)
        out.update({k: adds[off + i].item() for i, k in enumerate(sum_keys)})
        out.update({k: maxes[i].item() for i, k in enumerate(max_keys)})
        out.update({k: -maxes[len(max_keys) + i].item() for i, k in enumerate(min_keys)})
        return out

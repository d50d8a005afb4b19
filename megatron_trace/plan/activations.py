"""Activation bytes of the trainer's passes (Korthikanti et al. 2022 re-derived for Qwen3; the
package docstring gives the formulas and the recompute modes)."""

from __future__ import annotations

from dataclasses import dataclass


def _fused_attention(cfg) -> bool:
    if cfg.model.use_te is not None:
        return bool(cfg.model.use_te)
    return cfg.parallel.device != "cpu"


@dataclass(frozen=True)
class _Shape:
    """Per-rank widths and the micro-batch shape the activation formulas read."""

    h: int
    q: int  # query width / tp
    kv: int  # KV width / tp
    f: int  # SwiGLU width / tp
    a: int  # query heads / tp
    B: int  # bytes per activation element
    sp_div: int  # tp under sequence parallelism, else 1

    def layer_bytes(self, tokens: int, row: int, keep_scores: bool) -> float:
        """Bytes one layer keeps for backward over `tokens` tokens (package docstring)."""
        c = 3 * self.q if keep_scores else self.q + 2 * self.kv
        t = (self.q + self.kv) + c + self.q + 4 * self.f
        scores = self.a * row * (4 + self.B if self.B == 2 else 4) if keep_scores else 0
        return tokens * (self.B * (4 * self.h / self.sp_div + t) + scores)


def _stage_activations(cfg, sh: _Shape, layers: int, tokens: int, row: int, fused: bool) -> tuple[float, str]:
    """Activation bytes of one micro-batch on a stage of `layers` layers, and the recompute label."""
    o = cfg.optim
    full_layer = sh.layer_bytes(tokens, row, not fused)
    if o.recompute == "full":
        k = o.recompute_num_layers
        if not (1 <= k <= layers and (o.recompute_method == "block" or layers % k == 0)):
            raise ValueError(f"config key 'optim.recompute_num_layers': value {k} is not allowed; expected an integer "
                             f"in [1, {layers}] (the layers of a pipeline stage)"
                             + (" that divides it" if o.recompute_method == "uniform" else ""))
        layer_input = tokens * sh.h * sh.B / sh.sp_div
        if o.recompute_method == "uniform":
            return layers // k * layer_input + k * full_layer, f"full (uniform, {k}-layer chunks)"
        kept = sh.layer_bytes(tokens, row, False)
        return k * layer_input + (layers - k) * kept + full_layer, f"full (block, first {k} layers of a stage)"
    return layers * sh.layer_bytes(tokens, row, not fused and o.recompute == "none"), o.recompute

"""Next-token sampling for the `hf` engine, vectorised over the batch and reproducible per row.

Every row draws its randomness from a counter-based generator: the uniform of row r at response
position t is a pure function of (r's seed, t), computed for the whole batch at once with int64
torch ops (splitmix64: a Weyl sequence through a 64-bit finaliser; the multiplications wrap
modulo 2^64, and right shifts are made logical with a mask). One uniform per row and step then
picks the token by inverse CDF over the filtered distribution. A row's samples therefore depend
on its seed and its logits only: not on the batch it shares, the batch's size or the number of
engines; no per-row `torch.Generator` and no Python loop over rows.

The reported log-prob is that of the tempered distribution before top-k/top-p (see `base.py`).
"""

from __future__ import annotations

import torch

__all__ = ["counter_uniforms", "filter_top_k_top_p", "sample_next", "splitmix64"]

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GAMMA = _signed(0x9E3779B97F4A7C15)  # splitmix64's Weyl increment
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's `>>` is arithmetic on negative values)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output finaliser on int64 tensors (bit-for-bit the unsigned algorithm)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def counter_uniforms(seeds: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (float64, 53 random bits), one per seed: output number `position` of the
    splitmix64 stream whose state starts at splitmix64(seed). Pure in (seed, position)."""
    state = splitmix64(seeds.to(torch.int64))
    z = splitmix64(state + (torch.as_tensor(position, dtype=torch.int64, device=seeds.device) + 1) * _GAMMA)
    return _shr(z, 11).to(torch.float64) * (2.0 ** -53)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k, then top-p, as -inf entries of a copy; the most likely token always stays."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass *before* it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row i's token: the first index whose cumulative probability exceeds u_i times the row's
    total. A zero-probability token never has a CDF step, so it is never chosen; the rare float
    round-up past the last step falls back to the last token with positive probability."""
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
    if bool((probs.gather(1, idx) == 0).any()):  # u * total rounded up to the total
        vocab = torch.arange(probs.shape[-1], device=probs.device)
        last_positive = torch.where(probs > 0, vocab, -1).amax(-1, keepdim=True)
        idx = torch.minimum(idx, last_positive)
    return idx[:, 0]


def sample_next(logits: torch.Tensor, seeds: torch.Tensor, position: int, temperature: float, top_k: int = -1,
                top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens `[B]` and their log-probs `[B]` from fp32 logits `[B, V]`.

    temperature 0 is greedy (log-probs of softmax(logits)); otherwise row i samples from
    softmax(filter(logits / T)) with `counter_uniforms(seeds, position)[i]` and reports
    log softmax(logits / T) of its token."""
    if temperature <= 0:
        tokens = logits.argmax(-1)
        logp = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / temperature
        logp = torch.log_softmax(scaled, dim=-1)
        filtered = filter_top_k_top_p(scaled, top_k, top_p)
        probs = logp.exp() if filtered is scaled else torch.softmax(filtered, dim=-1)
        tokens = _inverse_cdf(probs, counter_uniforms(seeds, position))
    return tokens, logp.gather(1, tokens[:, None])[:, 0]

"""Vocab-parallel per-token statistics with analytic gradients: log-prob, entropy, FKL, RKL.

Shape legend: T tokens, V this rank's vocabulary shard (V_pad / tp), c a chunk of tokens.
Logits arrive `[T, V]`, sharded along the vocabulary over `tp_group`, and are never gathered.

Per token only scalars cross ranks (max, sum-exp, partial sums), so traffic is O(T) per
collective. Forward and backward walk the tokens in chunks: each chunk is cast to the compute
dtype (fp32, or fp64 for fp64 inputs), the softmax is recomputed from the saved logits and the
saved per-token scalars (max m and log-sum-exp), and temporaries never exceed a few `[c, V]`
buffers. Backward needs no collectives. Inputs are never modified (Megatron's own CE overwrites
fp32 logits in place; these functions copy each chunk instead).

Gradients, with q = student softmax, p = teacher softmax (teacher is constant), all w.r.t. the
student logits z = logits / temperature, then divided by temperature:
  log-prob of y:   onehot(y) - q
  entropy H:       -q * (log q + H)
  FKL = KL(p||q):  q * P_U - p * 1_U            (U: entries whose term is not clipped,
  RKL = KL(q||p):  q * (1_U * (r + 1) - B)       P_U = sum_U p, r = log q - log p,
                                                 B = sum_U q (r + 1))
Without clipping, U is everything, P_U = 1 and B = RKL + 1, which gives the familiar q - p and
q * (r - RKL).

Entry clipping (the paper's 0.05, direction unstated there), `clip_mode`:
  upper  each per-vocabulary-entry term d_j = p_j (log p_j - log q_j) (FKL) or
         q_j (log q_j - log p_j) (RKL) is clipped from above before summing:
         D = sum_j min(d_j, clip); negative terms are kept (the OPSD-style clamp);
  abs    D = sum_j clamp(d_j, -clip, clip);
  grad   D is unclipped; each vocabulary entry of dD/dz is clamped to [-clip, clip] (z = the
         scaled student logits, before the upstream weight and the 1/temperature factor).
In `upper` and `abs` a clipped entry contributes no gradient, like `torch.clamp` (ties count as
unclipped), so U above is the set of unclipped entries.

Masked vocabulary: entries with global id >= `vocab_size` (Megatron's padding) and -inf input
logits have zero probability. Terms 0 * log 0 are taken as 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["CLIP_MODES", "DEFAULT_CHUNK_ELEMENTS", "token_argmax", "token_argmax_prob_gap", "token_divergence",
           "token_logprob_and_entropy"]

# About 8 MB of fp32 per [c, V] temporary: a handful of them stay in a server CPU's L3 and are
# small next to GPU memory, while chunks stay long enough for efficient kernels.
DEFAULT_CHUNK_ELEMENTS = 2**21


def _world(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(num_tokens: int, shard: int, chunk_size: int | None) -> list[tuple[int, int]]:
    c = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // max(shard, 1))
    return [(i, min(i + c, num_tokens)) for i in range(0, num_tokens, c)]


class _Shard:
    """Where this rank's vocabulary slice sits, and how many of its columns are real."""

    def __init__(self, logits: torch.Tensor, group, vocab_size: int | None):
        self.rank, self.size = _world(group)
        self.width = logits.shape[-1]
        self.start = self.rank * self.width
        self.valid = self.width if vocab_size is None else min(self.width, max(0, vocab_size - self.start))

    def scaled(self, rows: torch.Tensor, temperature: float, dtype: torch.dtype, copy: bool = True) -> torch.Tensor:
        """`[c, V]` rows / temperature in `dtype`, padding set to -inf: a fresh copy, or (copy=False,
        for a temporary the caller owns) in place when `rows` already has `dtype`."""
        z = rows.to(dtype, copy=copy)
        if temperature != 1.0:
            z.div_(temperature)
        if self.valid < self.width:
            z[:, self.valid:] = float("-inf")
        return z


def _logsumexp_stats(z: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Global per-row max m and log sum exp(z - m) of a vocab-sharded `[c, V]` block."""
    m = _all_reduce(z.amax(dim=-1), dist.ReduceOp.MAX, group)
    s = _all_reduce(torch.exp(z - m[:, None]).sum(-1), dist.ReduceOp.SUM, group)
    return m, s.log()


# --------------------------------------------------------------------------- log-prob + entropy


class _LogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, temperature, vocab_size, chunk_size, entropy_grad):
        shard = _Shard(logits, group, vocab_size)
        cdt = _compute_dtype(logits)
        T = logits.shape[0]
        logprob = torch.empty(T, dtype=cdt, device=logits.device)
        entropy = torch.empty_like(logprob)
        m_all, lse_all = torch.empty_like(logprob), torch.empty_like(logprob)
        for a, b in _chunks(T, shard.width, chunk_size):
            z = shard.scaled(logits[a:b], temperature, cdt)  # [c, V]
            m = _all_reduce(z.amax(dim=-1), dist.ReduceOp.MAX, group)
            z.sub_(m[:, None])
            local = targets[a:b] - shard.start
            owned = (local >= 0) & (local < shard.width)
            zt = torch.where(owned, z.gather(1, local.clamp(0, shard.width - 1)[:, None])[:, 0], 0.0)
            e = torch.exp(z)
            # One SUM all-reduce for [sum e, sum e*z, z_target]. 0 * -inf (masked entries) is
            # NaN in e*z; nansum drops exactly those, since finite inputs never produce NaN here.
            partial = torch.stack([e.sum(-1), torch.nansum(e.mul_(z), -1), zt], dim=-1)
            s, ez, zt = _all_reduce(partial, dist.ReduceOp.SUM, group).unbind(-1)
            lse = s.log()
            logprob[a:b] = zt - lse
            entropy[a:b] = lse - ez / s
            m_all[a:b], lse_all[a:b] = m, lse
        ctx.save_for_backward(logits, targets, m_all, lse_all, entropy)
        ctx.meta = (shard, cdt, temperature, chunk_size, entropy_grad)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_lp, g_h):
        logits, targets, m_all, lse_all, entropy = ctx.saved_tensors
        shard, cdt, temperature, chunk_size, entropy_grad = ctx.meta
        entropy_grad = entropy_grad and g_h is not None
        grad = torch.empty_like(logits)
        for a, b in _chunks(logits.shape[0], shard.width, chunk_size):
            logq = shard.scaled(logits[a:b], temperature, cdt).sub_(m_all[a:b, None]).sub_(lse_all[a:b, None])
            gz = logprob_entropy_grad(logq, targets[a:b], shard.start, g_lp[a:b],
                                      g_h[a:b] if entropy_grad else None, entropy[a:b])
            if temperature != 1.0:
                gz.div_(temperature)
            grad[a:b] = gz
        return grad, None, None, None, None, None, None


def logprob_entropy_grad(logq: torch.Tensor, targets: torch.Tensor, start: int, g_lp: torch.Tensor,
                         g_h: torch.Tensor | None, entropy: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """d(g_lp * log q_y + g_h * H)/dz of one `[c, V]` chunk (logq: log-softmax of the scaled
    logits, consumed as the buffer), before the 1/temperature factor. start: the shard's first id.
    q: exp(logq) when the caller has it (consumed too), else computed."""
    cdt = logq.dtype
    q = torch.exp(logq) if q is None else q
    if g_h is not None:
        # dH/dz = -q (log q + H); 0 * -inf at masked entries is NaN and means 0.
        t = logq.add_(entropy[:, None]).mul_(q).nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        gz = q.mul_(-g_lp[:, None].to(cdt)).sub_(t.mul_(g_h[:, None].to(cdt)))
    else:
        gz = q.mul_(-g_lp[:, None].to(cdt))  # -g * q, reusing q's buffer
    local = targets - start
    rows = torch.nonzero((local >= 0) & (local < logq.shape[-1]))[:, 0]
    gz[rows, local[rows]] += g_lp[rows].to(cdt)
    return gz


def token_logprob_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of `targets` and entropy of softmax(logits / temperature).

    logits: `[T, V/tp]` this rank's vocabulary shard (any float dtype; bf16 is accumulated in
    fp32). targets: `[T]` global token ids. vocab_size: the real vocabulary; shard columns past
    it (padding) are masked. tp_group None means no tensor parallelism. Returns `([T], [T])` in
    fp32 (fp64 for fp64 logits). The entropy is a metric unless `entropy_grad=True`.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [T, V] and targets [T], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return _LogProbEntropy.apply(logits, targets, tp_group, float(temperature), vocab_size, chunk_size, entropy_grad)


@torch.no_grad()
def token_argmax(logits: torch.Tensor, tp_group=None, *, vocab_size: int | None = None) -> torch.Tensor:
    """Global id of each row's most likely token `[T]` from vocab-sharded logits `[T, V/tp]`.

    Only two scalars per token cross ranks (the shard maxima, then the smallest id that reaches
    the global maximum), so ties go to the smallest id on every TP layout. Padding columns past
    `vocab_size` never win.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits [T, V], got {tuple(logits.shape)}")
    shard = _Shard(logits, tp_group, vocab_size)
    return _global_argmax(shard.scaled(logits, 1.0, _compute_dtype(logits)), shard, tp_group)[0]


def _global_argmax(values: torch.Tensor, shard: _Shard, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Global id of each row's largest entry of vocab-sharded `[c, V]` values (padding already at
    -inf), and that value: a MAX all-reduce of the shard maxima, then a MIN all-reduce of the ids
    that reach it (ties go to the smallest id)."""
    local_max, local_idx = values.max(dim=-1)
    best = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
    none = torch.iinfo(torch.long).max
    ids = torch.where(local_max == best, local_idx + shard.start, torch.full_like(local_idx, none))
    return _all_reduce(ids, dist.ReduceOp.MIN, group), best


@torch.no_grad()
def token_argmax_prob_gap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tp_group=None, *,
                          temperature: float = 1.0, vocab_size: int | None = None,
                          chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The token the teacher supports most beyond the student at each row, and by how much:
    v* = argmax_v p(v) - q(v) and p(v*) - q(v*), `([T], [T])`, with p = softmax(teacher / temperature)
    and q = softmax(student / temperature) (the key-token lift's under-allocated token).

    Both logits are `[T, V/tp]` shards of the same layout and are never gathered. Per chunk of
    rows: one MAX and one SUM all-reduce (each side's global log-sum-exp), this shard's p - q,
    then `token_argmax`'s two-scalar reduction (MAX of the value, MIN of the id that reaches it),
    so ties go to the smallest id on every TP layout. Padding columns past `vocab_size` are out
    of both softmaxes and never win. The gap is in fp32 (fp64 when either input is fp64).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student and teacher logits must both be [T, V/tp], got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    shard = _Shard(student_logits, tp_group, vocab_size)
    cdt = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    T = student_logits.shape[0]
    ids = torch.empty(T, dtype=torch.long, device=student_logits.device)
    gap = torch.empty(T, dtype=cdt, device=student_logits.device)
    for a, b in _chunks(T, shard.width, chunk_size):
        z = shard.scaled(student_logits[a:b], temperature, cdt)
        t = shard.scaled(teacher_logits[a:b], temperature, cdt)
        m = _all_reduce(torch.stack([z.amax(-1), t.amax(-1)], -1), dist.ReduceOp.MAX, tp_group)
        q, p = z.sub_(m[:, :1]).exp_(), t.sub_(m[:, 1:]).exp_()
        s = _all_reduce(torch.stack([q.sum(-1), p.sum(-1)], -1), dist.ReduceOp.SUM, tp_group)
        d = p.div_(s[:, 1:]).sub_(q.div_(s[:, :1]))  # p - q, in p's buffer
        d[:, shard.valid:] = float("-inf")
        ids[a:b], gap[a:b] = _global_argmax(d, shard, tp_group)
    return ids, gap


# --------------------------------------------------------------------------- FKL / RKL


def _divergence_terms(logq: torch.Tensor, logp: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry terms d `[c, V]` and the probabilities that weight them (p for FKL, q for RKL)."""
    if kind == "forward":
        w = torch.exp(logp)
        return w * (logp - logq), w
    w = torch.exp(logq)
    return w * (logq - logp), w


CLIP_MODES = ("upper", "abs", "grad", "none")


def _over(d: torch.Tensor, clip: float, mode: str) -> torch.Tensor:
    """Entries whose term is clipped (NaN terms, 0 * log 0, compare False: kept, worth 0)."""
    return d > clip if mode == "upper" else d.abs() > clip


def divergence_from_logsoftmax(logq: torch.Tensor, logp: torch.Tensor, kind: str, entry_clip: float | None,
                               mode: str, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (D, aux, clipped-entry count) of one chunk from vocab-sharded log-softmaxes
    `[c, V]`, with the per-entry clip: one SUM all-reduce (two in grad mode, for the count)."""
    cdt = logq.dtype
    d, w = _divergence_terms(logq, logp, kind)
    if entry_clip is None or mode == "grad":
        over = torch.zeros_like(d, dtype=torch.bool)
    else:
        over = _over(d, entry_clip, mode)
    d_kept = torch.where(over, 0.0, d)
    if kind == "forward":
        aux = torch.where(over, 0.0, w).sum(-1)  # P_U
    else:
        aux = torch.nansum(d_kept, -1) + torch.where(over, 0.0, w).sum(-1)  # B
    n_over = over.sum(-1).to(cdt)
    # clipped entries count +clip (from above) or -clip (from below, abs mode)
    clip_total = (torch.where(over & (d > 0), 1.0, 0.0) - torch.where(over & (d < 0), 1.0, 0.0)).sum(-1)
    clip_total = clip_total.to(cdt) * (entry_clip or 0.0)
    partial = torch.stack([torch.nansum(d_kept, -1) + clip_total, aux, n_over], -1)
    value, aux, n_over = _all_reduce(partial, dist.ReduceOp.SUM, group).unbind(-1)
    if entry_clip is not None and mode == "grad":  # entries of dD/dz beyond the clip
        g = _unclipped_grad(logq, logp, kind, aux[:, None])
        n_over = _all_reduce((g.abs() > entry_clip).sum(-1).to(cdt), dist.ReduceOp.SUM, group)
    return value, aux, n_over


class _Divergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, kind, group, temperature, entry_clip, vocab_size, chunk_size, mode):
        shard = _Shard(student, group, vocab_size)
        cdt = _compute_dtype(student)
        T = student.shape[0]
        out = torch.empty(T, dtype=cdt, device=student.device)
        clipped = torch.empty_like(out)
        stats = torch.empty(T, 5, dtype=cdt, device=student.device)  # m_z, lse_z, m_t, lse_t, P_U or B
        for a, b in _chunks(T, shard.width, chunk_size):
            z = shard.scaled(student[a:b], temperature, cdt)
            t = shard.scaled(teacher[a:b], temperature, cdt)
            m = _all_reduce(torch.stack([z.amax(-1), t.amax(-1)], -1), dist.ReduceOp.MAX, group)
            z.sub_(m[:, :1])
            t.sub_(m[:, 1:])
            s = torch.stack([torch.exp(z).sum(-1), torch.exp(t).sum(-1)], -1)
            lse = _all_reduce(s, dist.ReduceOp.SUM, group).log()
            logq, logp = z.sub_(lse[:, :1]), t.sub_(lse[:, 1:])
            value, aux, n_over = divergence_from_logsoftmax(logq, logp, kind, entry_clip, mode, group)
            out[a:b], clipped[a:b] = value, n_over
            stats[a:b] = torch.stack([m[:, 0], lse[:, 0], m[:, 1], lse[:, 1], aux], -1)
        ctx.save_for_backward(student, teacher, stats)
        ctx.meta = (shard, cdt, kind, temperature, entry_clip, chunk_size, mode)
        ctx.mark_non_differentiable(clipped)
        return out, clipped

    @staticmethod
    def backward(ctx, g_out, _g_clipped):
        student, teacher, stats = ctx.saved_tensors
        shard, cdt, kind, temperature, entry_clip, chunk_size, mode = ctx.meta
        grad = torch.empty_like(student)
        for a, b in _chunks(student.shape[0], shard.width, chunk_size):
            st = stats[a:b]
            # Same operation order as the forward, so the clip decisions match it exactly.
            logq = shard.scaled(student[a:b], temperature, cdt).sub_(st[:, 0:1]).sub_(st[:, 1:2])
            logp = shard.scaled(teacher[a:b], temperature, cdt).sub_(st[:, 2:3]).sub_(st[:, 3:4])
            gz = divergence_grad(logq, logp, kind, st[:, 4:5], entry_clip, mode)
            gz.mul_(g_out[a:b, None].to(cdt))
            if temperature != 1.0:
                gz.div_(temperature)
            grad[a:b] = gz
        return grad, None, None, None, None, None, None, None, None


def divergence_grad(logq: torch.Tensor, logp: torch.Tensor, kind: str, aux: torch.Tensor, entry_clip: float | None,
                    mode: str, q: torch.Tensor | None = None, p: torch.Tensor | None = None) -> torch.Tensor:
    """dD/dz of one `[c, V]` chunk (log-softmaxes of the scaled logits; logq is consumed), before
    the upstream weight and the 1/temperature factor. aux `[c, 1]`: P_U (FKL) or B (RKL).
    q, p: exp(logq) and exp(logp) when the caller has them (q is consumed, p only read), else
    computed."""
    if entry_clip is None or mode == "grad":
        gz = _unclipped_grad(logq, logp, kind, aux, q, p)
        if entry_clip is not None:
            gz.clamp_(-entry_clip, entry_clip)
        return gz
    if kind == "forward":
        p = torch.exp(logp) if p is None else p
        q = torch.exp(logq) if q is None else q
        keep = ~_over(p * (logp - logq), entry_clip, mode)
        return q.mul_(aux).sub_(p * keep)  # q * P_U - p * 1_U
    q = torch.exp(logq) if q is None else q
    r = logq.sub_(logp)  # log q - log p, in logq's buffer
    over = _over(q * r, entry_clip, mode)
    coef = r.add_(1.0).masked_fill_(over, 0.0)
    # q * (1_U (r + 1) - B); entries with q = 0 carry no gradient (0 * inf is NaN there).
    return coef.sub_(aux).mul_(q).masked_fill_(q == 0, 0.0)


def _unclipped_grad(logq: torch.Tensor, logp: torch.Tensor, kind: str, aux: torch.Tensor,
                    q: torch.Tensor | None = None, p: torch.Tensor | None = None) -> torch.Tensor:
    """dD/dz of the unclipped divergence, `[c, V]` (aux: P_U = 1 for FKL, B = D + 1 for RKL;
    q, p: exp(logq), exp(logp) when the caller has them, q consumed)."""
    q = torch.exp(logq) if q is None else q
    if kind == "forward":
        return q.sub_(torch.exp(logp) if p is None else p)  # q - p
    # q * (r + 1 - B); q = 0 entries carry no gradient
    return (logq - logp).add_(1.0).sub_(aux).mul_(q).masked_fill_(q == 0, 0.0)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    tp_group=None,
    temperature: float = 1.0,
    entry_clip: float | None = None,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    return_clip_counts: bool = False,
    clip_mode: str = "upper",
):
    """Per-token full-vocabulary KL between teacher and student, `[T]`.

    kind: "forward" = KL(teacher || student), "reverse" = KL(student || teacher). Both logits
    are `[T, V/tp]` shards of the same layout and are divided by `temperature`. The gradient
    flows to the student only. entry_clip with clip_mode (upper | abs | grad | none; see the
    module doc) clips per vocabulary entry. With `return_clip_counts`, also returns the number of
    clipped entries per token (terms, or gradient entries in grad mode).
    """
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
    if clip_mode == "none":
        entry_clip = None
    if kind not in ("forward", "reverse"):
        raise ValueError(f"kind must be 'forward' or 'reverse', got {kind!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student and teacher logits must both be [T, V/tp], got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if entry_clip is not None and entry_clip <= 0:
        raise ValueError(f"entry_clip must be positive or None, got {entry_clip}")
    value, counts = _Divergence.apply(student_logits, teacher_logits.detach(), kind, tp_group, float(temperature),
                                      entry_clip, vocab_size, chunk_size, clip_mode)
    return (value, counts) if return_clip_counts else value

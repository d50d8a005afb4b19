"""A fused, vocab-parallel LM head: per-token log-prob, entropy, FKL and RKL straight from final
hidden states and this rank's output-weight shard. No `[T, V/tp]` logits tensor ever exists.

Shape legend: T student tokens, K of them carry a KL (rows `kl_index`, ascending), H hidden
size, V this rank's vocabulary shard (V_pad / tp), c a chunk of tokens.

Forward, per chunk of c student rows (and the k KL rows among them):
  z = hidden_c @ W^T / T_s and t = teacher_hidden_k @ W_t^T / T_s, local `[c, V]` / `[k, V]`,
      computed in the weights' dtype and accumulated in fp32 (fp64 for fp64 inputs), padding
      columns (global id >= vocab_size) set to -inf;
  one MAX all-reduce of the row maxima of z and t (batched);
  one SUM all-reduce of, per row, sum e^z, sum e^z z, z_target, sum e^t and, for the KL rows,
      sum e^t (t - z) and sum e^z (z - t), from which
      log q_y = z_y - lse_z, H = lse_z - sum e^z z / sum e^z,
      FKL = sum e^t (t - z) / sum e^t - lse_t + lse_z, RKL = sum e^z (z - t) / sum e^z - lse_z + lse_t
      (all z, t shifted by their maxima). Only per-token scalars are kept.
  With a per-entry clip (upper / abs) the KL needs the normalised terms, so the KL rows take a
  second SUM all-reduce (`vocab_parallel.divergence_from_logsoftmax`); in grad mode the values are
  unclipped and the second round only counts the clipped gradient entries (a metric).
Backward recomputes each chunk's logits, forms dL/dz with the same formulas as the unfused path
(`vocab_parallel.logprob_entropy_grad` / `divergence_grad`), and turns it into
  dhidden_c = dz @ W (a partial sum over the vocabulary: all-reduced over TP at the end, or left
  to the caller, e.g. Megatron's reduce-scatter under sequence parallelism) and
  dW += dz^T @ hidden_c (local: this rank's rows), accumulated in place in the weight's dtype.
  With bf16 weights that rounds the running sum once per chunk (one GEMM over all tokens rounds
  once): the price of not holding an fp32 [V/tp, H] buffer; fp32 and fp64 weights are exact.
With `token_loss` (the per-token loss, a sum of per-row terms: what the routed loss is) the
gradient is formed in the forward instead: as soon as a chunk's values exist, autograd on the
small per-row loss gives each row's upstream gradients, and the chunk's logits, still in memory,
give dz, dhidden and dW at once. Logits are computed once (no recompute), and the backward only
scales the kept dhidden and dW by the incoming gradient of the scalar loss.
The teacher gets no gradient. Memory beyond the inputs and outputs: a few `[c, V]` fp32 buffers,
the per-token statistics and dhidden.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .vocab_parallel import (
    CLIP_MODES,
    _all_reduce,
    _compute_dtype,
    _Shard,
    _unclipped_grad,
    divergence_from_logsoftmax,
    divergence_grad,
    logprob_entropy_grad,
)

__all__ = ["DEFAULT_CHUNK_BYTES", "FusedHeadOutput", "auto_chunk_tokens", "fused_head"]

# Memory target of one chunk's temporaries: about six [c, V] fp32 buffers live at once.
DEFAULT_CHUNK_BYTES = 2**27
_BUFFERS_PER_CHUNK = 6


def auto_chunk_tokens(shard_width: int, target_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that its fp32 temporaries stay near `target_bytes`."""
    return max(1, target_bytes // (4 * _BUFFERS_PER_CHUNK * max(shard_width, 1)))


class FusedHeadOutput(NamedTuple):
    logprob: torch.Tensor  # [T]
    entropy: torch.Tensor  # [T]
    fkl: torch.Tensor | None  # [K], KL(teacher || student) of the kl_index rows
    rkl: torch.Tensor | None  # [K], KL(student || teacher)
    fkl_clipped: torch.Tensor | None  # [K] clipped entries (terms, or gradient entries in grad mode)
    rkl_clipped: torch.Tensor | None
    loss: torch.Tensor | None = None  # with `token_loss`: the scalar loss (the only differentiable output)


class _Opts(NamedTuple):
    group: object
    temperature: float
    vocab_size: int | None
    chunk: int
    entropy_grad: bool
    kinds: tuple[str, ...]
    entry_clip: float | None
    mode: str
    reduce_hidden_grad: bool


def _scaled_logits(h: torch.Tensor, w: torch.Tensor, opts: _Opts, shard: _Shard, cdt: torch.dtype) -> torch.Tensor:
    """This rank's `[c, V]` logits / temperature in `cdt`, padding columns at -inf."""
    return shard.scaled(h @ w.t(), opts.temperature, cdt, copy=False)


def _chunk_bounds(T: int, chunk: int, kl_index: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(a, b, ka, kb): student rows [a, b) and the KL rows [ka, kb) whose index falls there."""
    out = []
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        ka, kb = torch.searchsorted(kl_index, torch.tensor([a, b], device=kl_index.device)).tolist()
        out.append((a, b, ka, kb))
    return out


class _Chunk(NamedTuple):
    """One chunk's forward: its log-softmaxes (buffers the caller may consume) and per-row values."""

    logq: torch.Tensor  # [c, V] log q of the student rows (padding -inf)
    logp: torch.Tensor  # [k, V] log p of the teacher at the KL rows
    li: torch.Tensor  # [k] the KL rows' positions within the chunk
    m_z: torch.Tensor  # [c] global row maxima (for the recompute)
    lse_z: torch.Tensor
    m_t: torch.Tensor  # [k]
    lse_t: torch.Tensor
    logprob: torch.Tensor  # [c]
    entropy: torch.Tensor
    q: torch.Tensor | None  # [c, V] exp(logq), kept when asked for (the eager gradient reuses it)
    p: torch.Tensor | None  # [k, V] exp(logp)
    kl: dict  # kind -> [k]
    aux: dict  # kind -> [k] P_U (FKL) or B (RKL)
    clipped: dict  # kind -> [k]


def _chunk_forward(hidden, weight, teacher_hidden, teacher_weight, targets, kl_index, bound, opts: _Opts,
                   shard: _Shard, cdt: torch.dtype, keep_probs: bool = False) -> _Chunk:
    """Values of student rows [a, b) and KL rows [ka, kb): one MAX and one SUM all-reduce (plus
    one SUM round on the KL rows for an upper/abs clip, see the module doc). keep_probs: also
    return the probabilities (from the exponentials already taken, no second exp pass)."""
    a, b, ka, kb = bound
    c, k = b - a, kb - ka
    li = kl_index[ka:kb] - a
    z = _scaled_logits(hidden[a:b], weight, opts, shard, cdt)
    t = _scaled_logits(teacher_hidden[ka:kb], teacher_weight, opts, shard, cdt) if k else z[:0]
    m = _all_reduce(torch.cat([z.amax(-1), t.amax(-1)]), dist.ReduceOp.MAX, opts.group)
    z.sub_(m[:c, None])
    t.sub_(m[c:, None])
    width = weight.shape[0]
    local = targets[a:b] - shard.start
    owned = (local >= 0) & (local < width)
    zt = torch.where(owned, z.gather(1, local.clamp(0, width - 1)[:, None])[:, 0], 0.0)
    ez, et = torch.exp(z), torch.exp(t)
    clip_values = opts.entry_clip is not None and opts.mode in ("upper", "abs")
    # 0 * -inf (padding) is NaN in the products; nansum drops exactly those terms.
    parts = [ez.sum(-1), torch.nansum(ez * z, -1), zt, et.sum(-1)]
    if k and not clip_values:
        zk = z[li]
        parts += [torch.nansum(et * (t - zk), -1), torch.nansum(ez[li] * (zk - t), -1)]
    sums = _all_reduce(torch.cat(parts), dist.ReduceOp.SUM, opts.group)
    s_z, ezz, zt = sums[:c], sums[c:2 * c], sums[2 * c:3 * c]
    s_t = sums[3 * c:3 * c + k]
    lse_z, lse_t = s_z.log(), s_t.log()
    logq, logp = z.sub_(lse_z[:, None]), t.sub_(lse_t[:, None])  # in place: z and t are not needed again
    q = ez.div_(s_z[:, None]) if keep_probs else None
    p = et.div_(s_t[:, None]) if keep_probs and k else None
    del ez, et
    kl, aux, clipped = {}, {}, {}
    if k and clip_values:
        for kind in opts.kinds:
            kl[kind], aux[kind], clipped[kind] = divergence_from_logsoftmax(logq[li], logp, kind, opts.entry_clip,
                                                                            opts.mode, opts.group)
    elif k:
        f_num, r_num = sums[3 * c + k:3 * c + 2 * k], sums[3 * c + 2 * k:]
        values = {"forward": f_num / s_t - lse_t + lse_z[li], "reverse": r_num / s_z[li] - lse_z[li] + lse_t}
        for kind in opts.kinds:
            kl[kind] = values[kind]
            aux[kind] = torch.ones_like(values[kind]) if kind == "forward" else values[kind] + 1.0
            clipped[kind] = torch.zeros_like(values[kind])
            if opts.entry_clip is not None:  # grad mode: count the gradient entries past the clip
                g = _unclipped_grad(logq[li], logp, kind, aux[kind][:, None])
                clipped[kind] = _all_reduce((g.abs() > opts.entry_clip).sum(-1).to(cdt), dist.ReduceOp.SUM, opts.group)
    return _Chunk(logq, logp, li, m[:c], lse_z, m[c:], lse_t, zt - lse_z, lse_z - ezz / s_z, q, p, kl, aux, clipped)


def _chunk_grad(logq, logp, li, targets_c, shard: _Shard, g_lp, g_h, entropy, g_kl: dict, aux: dict,
                opts: _Opts, q=None, p=None) -> torch.Tensor:
    """dL/dz of one chunk `[c, V]` from the per-row upstream gradients (consumes logq, and q =
    exp(logq) when given; p = exp(logp) when given, read only)."""
    kinds = [kind for kind in opts.kinds if li.numel() and g_kl.get(kind) is not None]
    logq_k = logq[li] if kinds else None  # copies: logq and q are consumed below
    probs_k = q[li] if kinds and q is not None else None
    gz = logprob_entropy_grad(logq, targets_c, shard.start, g_lp, g_h, entropy, q)
    for i, kind in enumerate(kinds):
        last = i == len(kinds) - 1  # divergence_grad consumes logq_k and q_k
        lq_k = logq_k if last else logq_k.clone()
        q_k = probs_k if last or probs_k is None else probs_k.clone()
        gk = divergence_grad(lq_k, logp, kind, aux[kind][:, None], opts.entry_clip, opts.mode, q_k, p)
        gz.index_add_(0, li, gk.mul_(g_kl[kind][:, None].to(gz.dtype)))
    if opts.temperature != 1.0:
        gz.div_(opts.temperature)
    return gz


def _accumulate(gz, hidden_c, weight, d_hidden_c, d_weight) -> None:
    """d(hidden) rows = dz @ W and d(weight) += dz^T @ hidden, in the weight's dtype, in place."""
    gw = gz.to(weight.dtype)
    if d_hidden_c is not None:
        d_hidden_c.copy_(gw @ weight)
    if d_weight is not None:
        d_weight.addmm_(gw.t(), hidden_c.to(weight.dtype))


def _new_outputs(T: int, K: int, opts: _Opts, cdt, dev):
    vec = lambda n: torch.zeros(n, dtype=cdt, device=dev)  # noqa: E731
    return vec(T), vec(T), {k: vec(K) for k in opts.kinds}, {k: vec(K) for k in opts.kinds}, \
        {k: vec(K) for k in opts.kinds}


def _store(ch: _Chunk, bound, logprob, entropy, kl: dict, aux: dict, clipped: dict) -> None:
    """A chunk's per-row values into the whole-batch outputs."""
    a, b, ka, kb = bound
    logprob[a:b], entropy[a:b] = ch.logprob, ch.entropy
    for kind in ch.kl:
        kl[kind][ka:kb], aux[kind][ka:kb], clipped[kind][ka:kb] = ch.kl[kind], ch.aux[kind], ch.clipped[kind]


class _FusedHead(torch.autograd.Function):
    """Per-token values out; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, kl_index, opts: _Opts):
        shard = _Shard(weight.t(), opts.group, opts.vocab_size)  # the weight's rows are the shard's columns
        cdt = _compute_dtype(hidden)
        T, K, dev = hidden.shape[0], kl_index.numel(), hidden.device
        logprob, entropy, kl, aux, clipped = _new_outputs(T, K, opts, cdt, dev)
        zstats, tstats = torch.empty(T, 2, dtype=cdt, device=dev), torch.empty(K, 2, dtype=cdt, device=dev)
        bounds = _chunk_bounds(T, opts.chunk, kl_index)
        for bound in bounds:
            a, b, ka, kb = bound
            ch = _chunk_forward(hidden, weight, teacher_hidden, teacher_weight, targets, kl_index, bound, opts, shard,
                                cdt)
            _store(ch, bound, logprob, entropy, kl, aux, clipped)
            zstats[a:b] = torch.stack([ch.m_z, ch.lse_z], -1)
            tstats[ka:kb] = torch.stack([ch.m_t, ch.lse_t], -1)
        ctx.save_for_backward(hidden, weight, teacher_hidden, teacher_weight, targets, kl_index, zstats, tstats,
                              entropy, *[aux[k] for k in opts.kinds])
        ctx.opts, ctx.shard, ctx.bounds = opts, shard, bounds
        ctx.mark_non_differentiable(*clipped.values())
        if not opts.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return (logprob, entropy, *[kl[k] for k in opts.kinds], *[clipped[k] for k in opts.kinds])

    @staticmethod
    def backward(ctx, g_lp, g_h, *g_rest):
        hidden, weight, teacher_hidden, teacher_weight, targets, kl_index, zstats, tstats, entropy, *auxes = \
            ctx.saved_tensors
        opts: _Opts = ctx.opts
        g_kl = dict(zip(opts.kinds, g_rest[:len(opts.kinds)]))
        aux = dict(zip(opts.kinds, auxes))
        shard, cdt = ctx.shard, _compute_dtype(hidden)
        d_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        g_h = g_h if opts.entropy_grad else None
        if g_lp is None:
            g_lp = torch.zeros_like(entropy)
        for a, b, ka, kb in ctx.bounds:
            li = kl_index[ka:kb] - a
            logq = _scaled_logits(hidden[a:b], weight, opts, shard, cdt)
            logq.sub_(zstats[a:b, :1]).sub_(zstats[a:b, 1:])
            logp = None
            if kb > ka and any(g is not None for g in g_kl.values()):
                logp = _scaled_logits(teacher_hidden[ka:kb], teacher_weight, opts, shard, cdt)
                logp.sub_(tstats[ka:kb, :1]).sub_(tstats[ka:kb, 1:])
            gz = _chunk_grad(logq, logp, li if logp is not None else li[:0], targets[a:b], shard, g_lp[a:b],
                             None if g_h is None else g_h[a:b], entropy[a:b],
                             {k: g[ka:kb] for k, g in g_kl.items() if g is not None},
                             {k: v[ka:kb] for k, v in aux.items()}, opts)
            _accumulate(gz, hidden[a:b], weight, None if d_hidden is None else d_hidden[a:b], d_weight)
        if d_hidden is not None and opts.reduce_hidden_grad:
            _all_reduce(d_hidden, dist.ReduceOp.SUM, opts.group)
        return d_hidden, d_weight, None, None, None, None, None


class _FusedHeadLoss(torch.autograd.Function):
    """The gradient in the forward: each chunk's upstream gradients come from `token_loss` as soon
    as its values exist, so its logits are used once (no recompute). Outputs the scalar loss (the
    only differentiable output) and the per-token values; backward scales the kept gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, kl_index, opts: _Opts, token_loss):
        shard = _Shard(weight.t(), opts.group, opts.vocab_size)
        cdt = _compute_dtype(hidden)
        T, K, dev = hidden.shape[0], kl_index.numel(), hidden.device
        logprob, entropy, kl, aux, clipped = _new_outputs(T, K, opts, cdt, dev)
        d_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        loss = torch.zeros((), dtype=cdt, device=dev)
        for bound in _chunk_bounds(T, opts.chunk, kl_index):
            a, b, ka, kb = bound
            ch = _chunk_forward(hidden, weight, teacher_hidden, teacher_weight, targets, kl_index, bound, opts, shard,
                                cdt, keep_probs=True)
            _store(ch, bound, logprob, entropy, kl, aux, clipped)
            with torch.enable_grad():
                leaves = [ch.logprob.detach().requires_grad_(), ch.entropy.detach().requires_grad_()]
                kl_leaves = {kind: v.detach().requires_grad_() for kind, v in ch.kl.items()}
                part = token_loss(bound, leaves[0], leaves[1], kl_leaves)
                grads = torch.autograd.grad(part, [*leaves, *kl_leaves.values()], allow_unused=True)
            loss += part.detach()
            g_kl = {kind: g for kind, g in zip(kl_leaves, grads[2:]) if g is not None}
            g_lp = grads[0] if grads[0] is not None else torch.zeros_like(ch.logprob)
            gz = _chunk_grad(ch.logq, ch.logp, ch.li, targets[a:b], shard, g_lp, grads[1], ch.entropy, g_kl, ch.aux,
                             opts, ch.q, ch.p)
            _accumulate(gz, hidden[a:b], weight, None if d_hidden is None else d_hidden[a:b], d_weight)
        if d_hidden is not None and opts.reduce_hidden_grad:
            _all_reduce(d_hidden, dist.ReduceOp.SUM, opts.group)
        ctx.grads = (d_hidden, d_weight)
        outs = (logprob, entropy, *[kl[k] for k in opts.kinds], *[clipped[k] for k in opts.kinds])
        ctx.mark_non_differentiable(*outs)
        return (loss, *outs)

    @staticmethod
    def backward(ctx, g_loss, *_):
        d_hidden, d_weight = ctx.grads
        ctx.grads = None
        if bool(g_loss != 1):  # Megatron passes 1 (or a loss scale): skip the pass over [V/tp, H] then
            d_hidden = None if d_hidden is None else d_hidden.mul_(g_loss.to(d_hidden.dtype))
            d_weight = None if d_weight is None else d_weight.mul_(g_loss.to(d_weight.dtype))
        return d_hidden, d_weight, None, None, None, None, None, None


def fused_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    *,
    vocab_size: int | None = None,
    kl_index: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    kinds: tuple[str, ...] = ("forward", "reverse"),
    entry_clip: float | None = None,
    clip_mode: str = "upper",
    chunk_tokens: int | None = None,
    entropy_grad: bool = False,
    reduce_hidden_grad: bool = True,
    token_loss=None,
) -> FusedHeadOutput:
    """Per-token statistics of softmax(hidden @ weight^T / temperature) without its logits.

    hidden: `[T, H]` the student's final hidden states (the same on every TP rank). weight:
    `[V/tp, H]` this rank's output-layer shard (the parameter itself, so its gradient reaches it,
    tied embeddings included). targets: `[T]` global ids. vocab_size: the real vocabulary
    (columns past it are padding). kl_index: `[K]` ascending rows of `hidden` that also get a KL
    to the teacher, whose final hidden states `teacher_hidden` `[K, H]` and weight shard
    `teacher_weight` (the actor's own for a live teacher) get no gradient. kinds: which of
    "forward" (KL(p||q)) and "reverse" (KL(q||p)) to compute. entry_clip/clip_mode: as in
    `vocab_parallel.token_divergence`. reduce_hidden_grad: all-reduce d(hidden) over `tp_group`
    (turn off when the caller reduces it, e.g. Megatron's sequence-parallel gather).
    token_loss: `token_loss(bound, logprob, entropy, kl) -> scalar`, the loss of the student rows
    [a, b) and KL rows [ka, kb) of `bound = (a, b, ka, kb)` as a differentiable function of their
    values (kl: kind -> `[kb - ka]`), summed over chunks into the output's `loss`. The loss must be
    a sum of per-row terms. Its gradient is then formed in the forward, chunk by chunk (logits
    computed once, no recompute in backward); the per-token values come back detached.
    Returns `FusedHeadOutput` in fp32 (fp64 for fp64 hidden states).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [T, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [T] = {hidden.shape[0]}, got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
    if entry_clip is not None and entry_clip <= 0:
        raise ValueError(f"entry_clip must be positive or None, got {entry_clip}")
    if clip_mode == "none":
        entry_clip = None
    bad = set(kinds) - {"forward", "reverse"}
    if bad or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct entries of ('forward', 'reverse'), got {kinds}")
    dev = hidden.device
    if kl_index is None or kl_index.numel() == 0:
        kl_index = torch.zeros(0, dtype=torch.long, device=dev)
        teacher_hidden = hidden.new_zeros((0, hidden.shape[1]))
        teacher_weight = weight if teacher_weight is None else teacher_weight
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("kl_index needs teacher_hidden and teacher_weight")
        if teacher_hidden.shape != (kl_index.numel(), hidden.shape[1]) or teacher_weight.shape != weight.shape:
            raise ValueError(f"teacher_hidden must be [K={kl_index.numel()}, {hidden.shape[1]}] and teacher_weight "
                             f"{tuple(weight.shape)}, got {tuple(teacher_hidden.shape)} and {tuple(teacher_weight.shape)}")
        kl_index = kl_index.to(device=dev, dtype=torch.long)
        if kl_index.numel() > 1 and bool((kl_index[1:] <= kl_index[:-1]).any()):
            raise ValueError("kl_index must be strictly ascending")
        if int(kl_index[0]) < 0 or int(kl_index[-1]) >= hidden.shape[0]:
            raise ValueError(f"kl_index must lie in [0, {hidden.shape[0]})")
    opts = _Opts(tp_group, float(temperature), vocab_size, chunk_tokens or auto_chunk_tokens(weight.shape[0]),
                 entropy_grad, tuple(kinds), entry_clip, clip_mode, reduce_hidden_grad)
    args = (hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), targets, kl_index, opts)
    loss = None
    if token_loss is None:
        out = _FusedHead.apply(*args)
    else:
        loss, *out = _FusedHeadLoss.apply(*args, token_loss)
    n = len(kinds)
    kl = dict(zip(kinds, out[2:2 + n]))
    cl = dict(zip(kinds, out[2 + n:]))
    return FusedHeadOutput(out[0], out[1], kl.get("forward"), kl.get("reverse"), cl.get("forward"), cl.get("reverse"),
                           loss)

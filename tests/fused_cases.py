"""Shared cases for the fused LM head (`loss/fused_head.py`), run at TP=1 in-process and at
TP=2/3 on gloo, against the unfused path: logits materialised from the same hidden states and
weight in float64, then `vocab_parallel.py`'s primitives (themselves checked against dense
float64 autograd in vp_cases.py), with the same upstream gradients through autograd.
"""

from __future__ import annotations

import zlib

import torch

V, H, T = 103, 12, 11  # V prime: TP=2 and TP=3 both pad the vocabulary
KL_ROWS = [0, 2, 3, 7, 10]
BOTH = ("forward", "reverse")

# name, temperature, entry_clip, clip mode, kinds, teacher weight, entropy_grad
CASES = [
    ("plain", 1.0, None, "upper", BOTH, "snapshot", True),
    ("temp", 0.7, None, "upper", BOTH, "live", False),
    ("clip_upper", 1.0, 0.05, "upper", BOTH, "snapshot", True),
    ("clip_abs", 0.8, 0.02, "abs", BOTH, "snapshot", False),
    ("clip_grad", 1.3, 0.05, "grad", BOTH, "live", True),
    ("clip_none", 1.0, 0.05, "none", ("forward",), "snapshot", False),
    ("rkl_only", 1.0, None, "upper", ("reverse",), "live", True),
    ("no_kl", 1.0, None, "upper", (), "live", True),
    ("empty", 1.0, 0.05, "upper", BOTH, "snapshot", True),
]


def inputs(name: str):
    """Hidden states, the full weight (real rows only), targets, teacher hidden states and weight."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    n = 0 if name == "empty" else T
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.6
    targets = torch.randint(0, V, (n,), generator=g)
    rows = [r for r in KL_ROWS if r < n]
    teacher_hidden = hidden[rows] + 0.5 * torch.randn(len(rows), H, generator=g, dtype=torch.float64)
    snapshot = weight + 0.2 * torch.randn(V, H, generator=g, dtype=torch.float64)
    return hidden, weight, targets, rows, teacher_hidden, snapshot


def upstream(n: int, k: int):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(m, generator=g, dtype=torch.float64) for m in (n, n, k, k)]


def _loss(lp, ent, fkl, rkl, entropy_grad, ups):
    g_lp, g_h, g_f, g_r = ups
    loss = (lp * g_lp.to(lp.dtype)).sum()
    if entropy_grad:
        loss = loss + (ent * g_h.to(ent.dtype)).sum()
    if fkl is not None:
        loss = loss + (fkl * g_f.to(fkl.dtype)).sum()
    if rkl is not None:
        loss = loss + (rkl * g_r.to(rkl.dtype)).sum()
    return loss


def reference(case) -> dict:
    """The unfused path at TP=1 in float64."""
    from megatron_trace.loss import token_divergence, token_logprob_and_entropy

    name, temp, clip, mode, kinds, teacher, entropy_grad = case
    hidden, weight, targets, rows, t_hidden, snapshot = inputs(name)
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    t_weight = weight.detach() if teacher == "live" else snapshot
    logits = hidden @ weight.t()
    lp, ent = token_logprob_and_entropy(logits, targets, None, temp, entropy_grad=entropy_grad)
    out = {"lp": lp, "ent": ent, "fkl": None, "rkl": None, "fkl_clipped": None, "rkl_clipped": None}
    t_logits = t_hidden @ t_weight.t()
    for kind, key in (("forward", "fkl"), ("reverse", "rkl")):
        if kind in kinds:
            out[key], out[key + "_clipped"] = token_divergence(logits[rows], t_logits, kind, None, temp, clip,
                                                               return_clip_counts=True, clip_mode=mode)
    loss = _loss(out["lp"], out["ent"], out["fkl"], out["rkl"], entropy_grad, upstream(hidden.shape[0], len(rows)))
    if hidden.shape[0]:
        out["d_hidden"], out["d_weight"] = torch.autograd.grad(loss, (hidden, weight))
    else:
        out["d_hidden"], out["d_weight"] = torch.zeros_like(hidden), torch.zeros_like(weight)
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def run_fused(case, tp_group, tp_rank: int, tp_size: int, dtype: torch.dtype, chunk_tokens: int | None) -> dict:
    """This rank's fused results: per-token values, d(hidden) (already reduced) and its weight rows."""
    from megatron_trace.loss.fused_head import fused_head

    name, temp, clip, mode, kinds, teacher, entropy_grad = case
    hidden, weight, targets, rows, t_hidden, snapshot = inputs(name)
    shard = -(-V // tp_size)
    pad = torch.full((shard * tp_size - V, H), 3.0, dtype=torch.float64)  # junk rows: masked as padding
    lo, hi = tp_rank * shard, (tp_rank + 1) * shard
    w = torch.cat([weight, pad])[lo:hi].to(dtype).requires_grad_()
    t_w = w.detach() if teacher == "live" else torch.cat([snapshot, pad])[lo:hi].to(dtype)
    h = hidden.to(dtype).requires_grad_()
    res = fused_head(h, w, targets, tp_group, temp, vocab_size=V,
                     kl_index=torch.tensor(rows, dtype=torch.long) if kinds else None,
                     teacher_hidden=t_hidden.to(dtype) if kinds else None, teacher_weight=t_w if kinds else None,
                     kinds=kinds, entry_clip=clip, clip_mode=mode, chunk_tokens=chunk_tokens,
                     entropy_grad=entropy_grad)
    loss = _loss(res.logprob, res.entropy, res.fkl, res.rkl, entropy_grad, upstream(h.shape[0], len(rows)))
    if h.shape[0]:
        d_hidden, d_weight = torch.autograd.grad(loss, (h, w))
    else:
        d_hidden, d_weight = torch.zeros_like(h), torch.zeros_like(w)
    out = {k: (None if v is None else v.detach()) for k, v in res._asdict().items()}
    out.update(d_hidden=d_hidden, d_weight=d_weight, lo=lo, hi=hi)
    return out


def compare(got: dict, want: dict, dtype: torch.dtype, label) -> None:
    tol = 1e-9 if dtype == torch.float64 else 2e-4

    def close(a, b, what):
        assert (a is None) == (b is None), (label, what)
        if a is None:
            return
        a, b = a.double(), b.double()
        assert a.shape == b.shape, (label, what, a.shape, b.shape)
        if b.numel():
            err = (a - b).abs().max().item()
            assert err <= tol * (1 + b.abs().max().item()), (label, what, err)

    close(got["logprob"], want["lp"], "logprob")
    close(got["entropy"], want["ent"], "entropy")
    close(got["fkl"], want["fkl"], "fkl")
    close(got["rkl"], want["rkl"], "rkl")
    if dtype == torch.float64:  # clip decisions at float32 rounding may flip a borderline entry
        close(got["fkl_clipped"], want["fkl_clipped"], "fkl_clipped")
        close(got["rkl_clipped"], want["rkl_clipped"], "rkl_clipped")
    close(got["d_hidden"], want["d_hidden"], "d_hidden")
    lo, hi = got["lo"], got["hi"]
    real = max(0, min(hi, V) - lo)
    close(got["d_weight"][:real], want["d_weight"][lo:lo + real], "d_weight")
    assert not got["d_weight"][real:].any(), (label, "padding rows got a gradient")


# The key-token lift's under-allocated token through `Head.underallocated`: name, temperature,
# student given as hidden states (fused head) or as logits (the unfused path's key read).
GAP_CASES = [("plain", 1.0, "hidden"), ("temp", 0.7, "logits"), ("clip_upper", 1.3, "hidden")]


def _gap_inputs(name: str):
    """Student and teacher hidden states `[T, H]` and weights (the teacher's a snapshot)."""
    hidden, weight, _, _, _, snapshot = inputs(name)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
    return hidden, weight, hidden + 0.8 * torch.randn(hidden.shape, generator=g, dtype=torch.float64), snapshot


def run_underallocated(tp_group, tp_rank: int, tp_size: int, dtype: torch.dtype) -> list:
    """This rank's (v*, gap) of each GAP_CASES case, from its weight shards (padding rows hold junk
    that would win if it counted), chunks of 3 rows."""
    from types import SimpleNamespace

    from megatron_trace.loss import LossConfig
    from megatron_trace.train.head import Head

    shard = -(-V // tp_size)
    lo, hi = tp_rank * shard, (tp_rank + 1) * shard
    out = []
    for name, temp, student in GAP_CASES:
        hidden, weight, t_hidden, snapshot = _gap_inputs(name)
        pad = shard * tp_size - V
        w = torch.cat([weight, torch.full((pad, H), -0.5, dtype=torch.float64)])[lo:hi].to(dtype)
        t_w = torch.cat([snapshot, torch.full((pad, H), 0.5, dtype=torch.float64)])[lo:hi].to(dtype)
        head = Head(SimpleNamespace(tp=tp_group), LossConfig(fused_head=student == "hidden", temperature=temp,
                                                             head_chunk_tokens=3), V)
        h = hidden.to(dtype)
        if student == "logits":
            out.append(head.underallocated(h @ w.t(), None, t_hidden.to(dtype), t_w))
        else:
            out.append(head.underallocated(h, w, t_hidden.to(dtype), t_w))
    return out


def check_underallocated(got: list, dtype: torch.dtype, label) -> None:
    """Against softmaxes of the full float64 logits: argmax of p_teacher - p_student (ties to the
    smallest id) and the gap; somewhere v* is not the teacher's top-1."""
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    not_top1 = 0
    for (name, temp, _), (ids, gap) in zip(GAP_CASES, got):
        hidden, weight, t_hidden, snapshot = _gap_inputs(name)
        t_logits = t_hidden @ snapshot.t()
        d = torch.softmax(t_logits / temp, -1) - torch.softmax(hidden @ weight.t() / temp, -1)
        assert torch.equal(ids, d.argmax(-1)), (label, name, ids, d.argmax(-1))
        assert torch.allclose(gap.double(), d.max(-1).values, rtol=0, atol=tol), (label, name)
        not_top1 += int((ids != t_logits.argmax(-1)).sum())
    assert not_top1 > 0, label

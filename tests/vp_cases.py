"""Shared cases for the vocab-parallel primitives, run at TP=1 in-process and TP=2/3 on gloo.

Every case builds full-vocabulary logits deterministically, shards them along the vocabulary
(padding the last shard like Megatron, with the padding masked through `vocab_size`), runs our
primitive with random upstream gradients, and returns values and the rank's gradient shard.
`check_results` compares them with the dense float64 autograd reference.
"""

from __future__ import annotations

import zlib

import dense_reference as ref
import torch

V = 103  # prime: TP=2 and TP=3 both need padding


def _case_inputs(name: str):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # str hash() differs per process
    T = 0 if name == "empty" else 9
    student = torch.randn(T, V, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(T, V, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (T,), generator=g)
    if name == "extreme":
        student[:, ::7] = 1e4
        student[:, 3::11] = -1e4
        teacher[:, 1::5] = -1e4
        teacher[:, 2::9] = 1e4
    if name == "neginf":
        # -inf in both (like a shared mask) and in only one side where that side's term vanishes:
        # teacher-only -inf for FKL (p = 0), student-only -inf for RKL (q = 0).
        student[:, 10:14] = float("-inf")
        teacher[:, 10:14] = float("-inf")
        teacher[:, 20:25] = float("-inf")
        targets = torch.where((targets >= 10) & (targets < 14), torch.zeros_like(targets), targets)
    return student, teacher, targets


CASES = [
    # name, temperature, entry_clip, clip mode
    ("plain", 1.0, None, "upper"),
    ("plain", 1.0, 0.05, "upper"),
    ("temp", 0.7, None, "upper"),
    ("temp", 1.6, 0.05, "upper"),
    ("extreme", 1.0, None, "upper"),
    ("extreme", 1.0, 0.05, "upper"),
    ("neginf", 1.0, None, "upper"),
    ("neginf", 0.8, 0.05, "upper"),
    ("empty", 1.0, 0.05, "upper"),
    ("plain", 1.0, 0.05, "abs"),
    ("temp", 0.7, 0.02, "abs"),
    ("neginf", 0.8, 0.05, "abs"),
    ("extreme", 1.0, 0.05, "abs"),
    ("plain", 1.0, 0.05, "grad"),
    ("temp", 1.6, 0.02, "grad"),
    ("neginf", 0.8, 0.05, "grad"),
    ("extreme", 1.0, 0.05, "grad"),
    ("plain", 1.0, 0.05, "none"),
]


def run_cases(tp_group, tp_rank: int, tp_size: int, dtype: torch.dtype, chunk_size: int | None = 4):
    from megatron_trace.loss import (
        token_argmax,
        token_argmax_prob_gap,
        token_divergence,
        token_logprob_and_entropy,
    )

    shard = -(-V // tp_size)
    lo, hi = tp_rank * shard, (tp_rank + 1) * shard
    out = []
    for name, temp, clip, mode in CASES:
        s_full, t_full, y = _case_inputs(name)
        pad = shard * tp_size - V
        s_pad = torch.cat([s_full, torch.full((s_full.shape[0], pad), 5.0, dtype=s_full.dtype)], 1)  # junk: masked
        t_pad = torch.cat([t_full, torch.full((t_full.shape[0], pad), 5.0, dtype=t_full.dtype)], 1)
        s = s_pad[:, lo:hi].to(dtype).requires_grad_()
        t = t_pad[:, lo:hi].to(dtype)
        g = torch.Generator().manual_seed(11)
        g_lp, g_h, g_f, g_r = (torch.randn(s.shape[0], generator=g, dtype=torch.float64) for _ in range(4))
        lp, ent = token_logprob_and_entropy(s, y, tp_group, temp, vocab_size=V, chunk_size=chunk_size,
                                            entropy_grad=True)
        fkl, n_clip = token_divergence(s, t, "forward", tp_group, temp, clip, vocab_size=V, chunk_size=chunk_size,
                                       return_clip_counts=True, clip_mode=mode)
        if name == "neginf":  # RKL with student-only -inf: swap roles of the one-sided mask
            s_r = torch.cat([t_full, torch.full((t_full.shape[0], pad), 5.0, dtype=t_full.dtype)], 1)[:, lo:hi]
            s_r = s_r.to(dtype).requires_grad_()
            t_r = s_pad[:, lo:hi].to(dtype)
        else:
            s_r, t_r = s, t
        rkl = token_divergence(s_r, t_r, "reverse", tp_group, temp, clip, vocab_size=V, chunk_size=chunk_size,
                               clip_mode=mode)
        loss = (lp * g_lp.to(lp.dtype)).sum() + (ent * g_h.to(ent.dtype)).sum() + (fkl * g_f.to(fkl.dtype)).sum()
        grads = torch.autograd.grad(loss, s, allow_unused=True)[0] if s.shape[0] else torch.zeros_like(s)
        grad_r = (torch.autograd.grad((rkl * g_r.to(rkl.dtype)).sum(), s_r)[0] if s.shape[0]
                  else torch.zeros_like(s_r))
        # the teacher's padding at 9.0 against the student's 5.0: would dominate p - q if it counted
        t_junk = torch.cat([t_full, torch.full((t_full.shape[0], pad), 9.0, dtype=t_full.dtype)], 1)[:, lo:hi]
        gap_kw = dict(temperature=temp, vocab_size=V, chunk_size=chunk_size)
        out.append(dict(case=(name, temp, clip, mode), lp=lp.detach(), ent=ent.detach(), fkl=fkl.detach(),
                        rkl=rkl.detach(), n_clip=n_clip, grad=grads, grad_r=grad_r, lo=lo, hi=hi,
                        argmax=token_argmax(s.detach(), tp_group, vocab_size=V),
                        gap=token_argmax_prob_gap(s.detach(), t_junk.to(dtype), tp_group, **gap_kw),
                        gap_same=token_argmax_prob_gap(s.detach(), s.detach(), tp_group, **gap_kw)))
    return out


def _reference(name, temp, clip, mode):
    s_full, t_full, y = _case_inputs(name)
    clip = None if mode == "none" else clip
    g = torch.Generator().manual_seed(11)
    g_lp, g_h, g_f, g_r = (torch.randn(s_full.shape[0], generator=g, dtype=torch.float64) for _ in range(4))
    s = s_full.clone().requires_grad_()
    lp, ent = ref.logprob_entropy(s, y, temp)
    if name == "neginf":
        s_r, t_r = t_full.clone().requires_grad_(), s_full
    else:
        s_r, t_r = s_full.clone().requires_grad_(), t_full
    if mode == "grad" and clip is not None:
        loss = (lp * g_lp).sum() + (ent * g_h).sum()
        grad = torch.autograd.grad(loss, s)[0] if s.shape[0] else torch.zeros_like(s)
        fkl, grad_f, n_clip, scale_f = ref.divergence_grad_clipped(s_full, t_full, "forward", temp, clip, g_f)
        rkl, grad_r, _, scale_r = ref.divergence_grad_clipped(s_r, t_r, "reverse", temp, clip, g_r)
        # fp32 rounding scales with the unclipped gradient (|log q - log p| reaches 1e4 in `extreme`)
        return dict(lp=lp.detach(), ent=ent.detach(), fkl=fkl, rkl=rkl, n_clip=n_clip, grad=grad + grad_f,
                    grad_r=grad_r, grad_scale=max(scale_f, scale_r, grad.abs().max().item() if grad.numel() else 0))
    fkl = ref.divergence(s, t_full, "forward", temp, clip, mode)
    loss = (lp * g_lp).sum() + (ent * g_h).sum() + (fkl * g_f).sum()
    grad = torch.autograd.grad(loss, s)[0] if s.shape[0] else torch.zeros_like(s)
    rkl = ref.divergence(s_r, t_r, "reverse", temp, clip, mode)
    grad_r = torch.autograd.grad((rkl * g_r).sum(), s_r)[0] if s.shape[0] else torch.zeros_like(s_r)
    with torch.no_grad():
        terms = torch.log_softmax(t_full / temp, -1).exp() * (
            ref._safe(torch.log_softmax(t_full / temp, -1)) - ref._safe(torch.log_softmax(s_full / temp, -1)))
        if clip is None:
            n_clip = torch.zeros(s_full.shape[0], dtype=torch.float64)
        else:
            n_clip = ((terms > clip) if mode == "upper" else (terms.abs() > clip)).sum(-1).double()
    return dict(lp=lp.detach(), ent=ent.detach(), fkl=fkl.detach(), rkl=rkl.detach(), n_clip=n_clip,
                grad=grad, grad_r=grad_r)


def _dense_argmax(name: str) -> torch.Tensor:
    # torch.argmax returns the first maximum: the smallest id among ties (`extreme` has many).
    return _case_inputs(name)[0].argmax(-1) if _case_inputs(name)[0].shape[0] else torch.zeros(0, dtype=torch.long)


def dense_prob_gap(student: torch.Tensor, teacher: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """v* = argmax_v softmax(teacher / temp) - softmax(student / temp) over the real vocabulary
    (full float64 logits, no padding), ties to the smallest id, and that gap."""
    d = torch.softmax(teacher.double() / temp, -1) - torch.softmax(student.double() / temp, -1)
    if not d.shape[0]:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    gap = d.max(-1).values
    ids = (d == gap[:, None]).int().argmax(-1)  # the first maximum
    return ids, gap


def check_results(per_rank: list | dict, dtype: torch.dtype) -> None:
    """per_rank: run_cases output, or a list of them (one per TP rank)."""
    if isinstance(per_rank, list) and per_rank and isinstance(per_rank[0], dict):
        per_rank = [per_rank]
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    not_top1 = 0  # positions where v* is not the teacher's top-1: the student's softmax mattered
    for i, (name, temp, clip, mode) in enumerate(CASES):
        want = _reference(name, temp, clip, mode)
        ranks = [r[i] for r in per_rank]
        for key in ("lp", "ent", "fkl", "rkl", "n_clip"):
            for rank, r in enumerate(ranks):
                got = r[key].double()
                assert got.shape == want[key].shape, (name, key)
                err = (got - want[key]).abs().max().item() if got.numel() else 0.0
                scale = 1.0 if dtype == torch.float64 else max(1.0, want[key].abs().max().item() if got.numel() else 1.0)
                assert err <= tol * scale, f"{(name, temp, clip, mode)} {key} rank {rank}: err {err}"
        for rank, r in enumerate(ranks):  # the padding columns hold 5.0, above most real logits
            assert torch.equal(r["argmax"], _dense_argmax(name)), f"{(name, temp, clip, mode)} argmax rank {rank}"
        s_full, t_full, _ = _case_inputs(name)
        want_ids, want_gap = dense_prob_gap(s_full, t_full, temp)
        not_top1 += int((want_ids != t_full.argmax(-1)).sum()) if want_ids.numel() else 0
        for rank, r in enumerate(ranks):
            ids, gap = r["gap"]
            assert torch.equal(ids, want_ids), f"{(name, temp)} prob-gap argmax rank {rank}: {ids} vs {want_ids}"
            assert torch.allclose(gap.double(), want_gap, rtol=0, atol=tol), f"{(name, temp)} prob gap rank {rank}"
            ids, gap = r["gap_same"]  # p = q: every gap is 0 and id 0 wins the tie
            assert not ids.any() and not gap.any(), f"{(name, temp)} prob gap of identical logits rank {rank}"
        for key in ("grad", "grad_r"):
            full = torch.cat([r[key].double() for r in ranks], dim=1)
            assert torch.all(full[:, V:] == 0), f"{name}: gradient on padded vocab"
            err = (full[:, :V] - want[key]).abs().max().item() if full.numel() else 0.0
            # fp32: 1e-5 relative to the largest magnitude (extreme logits give O(1e4) gradients)
            scale = 1.0 if dtype == torch.float64 or not full.numel() else max(
                1.0, want.get("grad_scale", want[key].abs().max().item()))
            assert err <= tol * scale, f"{(name, temp, clip, mode)} {key}: err {err}"
    assert not_top1 > 0

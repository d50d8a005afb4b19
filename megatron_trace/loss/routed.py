"""TRACE routing and the routed objective: GRPO everywhere, full-vocabulary KL on routed spans.

Token layout: one micro-batch of T response tokens from B rollouts, packed. `seq_ids[t]` is the
rollout (0..B-1) of token t and `seq_lens[b]` its full response length |y|. Rollouts are never
split across micro-batches. Logits are `[T, V/tp]` vocab shards; teacher logits are `[R, V/tp]`
for the R routed tokens only, in token order.

Objective per rollout y (DESIGN section 2):
  GRPO on every token: l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A),
  weighted 1 off-span and w_span on routed tokens, where w_span = 1 - lambda/lambda0 ("anneal",
  TRACE), 1 ("full", all-token distillation with GRPO) or 0 ("none", pure distillation);
  KL term lambda * (1/|y|) * sum over routed t of D_t, D_t = FKL or RKL over the full vocabulary.

Normalisation (the one place it is decided). Every token carries a weight computed from
*global* counts (all DP ranks, all micro-batches of the step), so the loss is a plain sum of
per-token terms and the step's loss/gradient is the sum over micro-batches and ranks,
independent of DP size and micro-batching:
  token-mean               GRPO weight 1 / N_tokens
  seq-mean-token-mean      GRPO weight 1 / (|y| * N_seqs)
  seq-mean-token-sum-norm  GRPO weight 1 / (L_norm * N_seqs)   (Dr. GRPO; L_norm = max response length)
  KL term (every mode)     lambda / (|y| * N_seqs)               (mean over rollouts of the
                                                                  length-normalised span sum)
The trainer must therefore *sum* (not average) gradients over DP ranks.

How this differs from the paper's equations: the paper does not state how the GRPO part is
aggregated over the batch (we default to token-mean, the DAPO recipe default), nor how its
per-entry KL clip at 0.05 applies. `loss.entry_clip_mode` offers upper (each entry capped from
above, the schema default), abs, grad and none (vocab_parallel); the Qwen3 recipes use none,
measured to be the only mode that keeps the key-token lift (docs/concepts.md, "Entry clip"). The optional
k3 KL to a reference policy and the entropy bonus are off by default, as in the paper's recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from .metrics import Stats
from .vocab_parallel import CLIP_MODES, _world, token_divergence, token_logprob_and_entropy

__all__ = [
    "AGG_MODES",
    "GlobalCounts",
    "LossConfig",
    "LossInputs",
    "ROUTE_VARIANTS",
    "Route",
    "RouteVariant",
    "build_routes",
    "routed_loss",
    "routed_loss_fused",
]


class Route(IntEnum):
    GRPO = 0
    FKL = 1
    RKL = 2


@dataclass(frozen=True)
class RouteVariant:
    # annotator (annotated spans) | all (every token) | failed (every token of incorrect
    # rollouts) | random | inverted (the localisation ablation) | None (no routing)
    mask: str | None
    action: str | None  # fkl | rkl | both
    routed_grpo: str  # anneal | full | none: GRPO weight on routed tokens

    @property
    def uses_spans(self) -> bool:
        """Whether the routes come from annotated spans (so lambda > 0 calls the annotator):
        TRACE and the random/inverted ablations, which keep each rollout's annotated coverage."""
        return self.mask in ("annotator", "inverted", "random")


ROUTE_VARIANTS: dict[str, RouteVariant] = {
    "grpo": RouteVariant(None, None, "full"),
    "trace_fkl": RouteVariant("annotator", "fkl", "anneal"),
    "trace_rkl": RouteVariant("annotator", "rkl", "anneal"),
    "trace_both": RouteVariant("annotator", "both", "anneal"),
    # The all-token self-OPD family (the paper's baselines; recipes run them at constant lambda):
    # KL on every token with GRPO kept on all of them (all_token_*); distillation alone on every
    # token, no GRPO (opsd, the OPSD/SDPO objective); GRPO on correct rollouts and distillation
    # alone on every token of incorrect ones, routed per sample (srpo_like: SRPO's routing, without
    # its entropy-aware weights; reverse KL, the SDPO direction).
    "all_token_fkl": RouteVariant("all", "fkl", "full"),
    "all_token_rkl": RouteVariant("all", "rkl", "full"),
    "opsd": RouteVariant("all", "fkl", "none"),
    "srpo_like": RouteVariant("failed", "rkl", "none"),
    # The localisation ablation: TRACE's schedule and spans' count, other tokens (loss.mask_coverage).
    "random_mask": RouteVariant("random", "fkl", "anneal"),
    "inverted_mask": RouteVariant("inverted", "fkl", "anneal"),
}

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _variant(name: str) -> RouteVariant:
    if name not in ROUTE_VARIANTS:
        raise ValueError(f"loss.variant: unknown {name!r}; choose one of {sorted(ROUTE_VARIANTS)}")
    return ROUTE_VARIANTS[name]


def _random_subset(candidates: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k of the candidate positions, chosen by a generator seeded from `seed` only."""
    if k >= candidates.numel():
        return candidates
    gen = torch.Generator().manual_seed(seed)
    return candidates[torch.randperm(candidates.numel(), generator=gen)[:k]]


def build_routes(
    variant: str,
    correct: torch.Tensor,
    key_mask: torch.Tensor,
    error_mask: torch.Tensor,
    seq_ids: torch.Tensor,
    *,
    action: str | None = None,
    seed: int = 0,
    step: int = 0,
    rollout_uids: torch.Tensor | None = None,
    coverage: float | None = None,
) -> torch.Tensor:
    """Per-token routes `[T]` (int8 `Route`) from rollout correctness and annotated span masks.

    correct: `[B]` bool. key_mask / error_mask: `[T]` bool, the annotator's key spans (meaningful
    on correct rollouts) and error spans (on incorrect ones), already under the coverage cap.
    action overrides the variant's (fkl: key spans of correct rollouts; rkl: error spans of
    incorrect ones; both). `all` routes every token (both: FKL on correct rollouts, RKL on
    incorrect ones); `failed` every token of incorrect rollouts (fkl or rkl, not both).

    The ablation masks change only *which* tokens of an eligible rollout are routed. coverage
    None (`loss.mask_coverage: matched`) keeps each rollout's annotated coverage: `random`
    routes as many random tokens of the rollout as its span has, `inverted` as many tokens from
    outside its span (all of them when fewer remain), and a rollout without a span routes
    nothing. A fraction f routes round(f |y|) tokens (at least one) of every eligible rollout:
    `random` anywhere in it, annotated or not; `inverted` from outside its span, only on
    rollouts that have one (without a span nothing marks which tokens are "not key").
    Random choices depend only on (seed, step, rollout uid), never on the DP layout.
    """
    v = _variant(variant)
    act = action or v.action
    if act not in (None, "fkl", "rkl", "both"):
        raise ValueError(f"loss.action must be fkl, rkl or both, got {act!r}")
    if coverage is not None and not 0 < coverage <= 1:
        raise ValueError(f"loss.mask_coverage must be matched or a fraction in (0, 1], got {coverage!r}")
    T = seq_ids.numel()
    routes = torch.zeros(T, dtype=torch.int8)
    if v.mask is None or T == 0:
        return routes
    tok_correct = correct.bool()[seq_ids]
    route_of = torch.where(tok_correct, int(Route.FKL), int(Route.RKL)).to(torch.int8)
    if v.mask == "all":
        routes[:] = Route.FKL if act == "fkl" else Route.RKL
        if act == "both":
            routes[:] = route_of
        return routes
    if v.mask == "failed":
        if act == "both":
            raise ValueError(f"loss.action=both is not defined for loss.variant={variant} (it distils only "
                             "incorrect rollouts): choose fkl or rkl")
        routes[~tok_correct] = Route.FKL if act == "fkl" else Route.RKL
        return routes
    want_fkl = act in ("fkl", "both")
    want_rkl = act in ("rkl", "both")
    # The span each token would be routed on, and the route it would take.
    eligible = (tok_correct & want_fkl) | (~tok_correct & want_rkl)
    span = torch.where(tok_correct, key_mask.bool(), error_mask.bool()) & eligible
    if v.mask == "annotator":
        routes[span] = route_of[span]
        return routes
    uids = rollout_uids if rollout_uids is not None else torch.arange(int(seq_ids.max()) + 1)
    for b in torch.unique(seq_ids).tolist():
        pos = torch.nonzero(seq_ids == b)[:, 0]
        spanned = int(span[pos].sum())  # the rollout's annotated coverage (0 unless eligible)
        if coverage is None:
            k = spanned
        elif not bool(eligible[pos[0]]) or (v.mask == "inverted" and spanned == 0):
            k = 0
        else:
            k = max(1, round(coverage * pos.numel()))
        if k == 0:
            continue
        rseed = ((seed * 1_000_003 + step) * 1_000_033 + int(uids[b])) % (2**31 - 1)
        pool = pos if v.mask == "random" else pos[~span[pos]]
        chosen = _random_subset(pool, k, rseed)
        routes[chosen] = route_of[chosen]
    return routes


@dataclass(frozen=True)
class LossConfig:
    variant: str = "trace_fkl"
    eps_low: float = 0.2
    eps_high: float = 0.28
    agg: str = "token-mean"
    max_response_len: int = 0  # L_norm for seq-mean-token-sum-norm
    lambda0: float = 0.5
    entry_clip: float | None = 0.05
    entry_clip_mode: str = "upper"  # upper | abs | grad | none (loss/vocab_parallel.py)
    temperature: float = 1.0
    routed_grpo: str | None = None  # None: the variant's default
    kl_ref_coef: float = 0.0  # k3 KL to a reference policy
    entropy_coef: float = 0.0
    chunk_size: int | None = None
    fused_head: bool = False  # every pass through loss/fused_head.py (no [T, V/tp] logits)
    head_chunk_tokens: int | None = None  # its chunk; None = auto_chunk_tokens

    def __post_init__(self) -> None:
        _variant(self.variant)
        if self.agg not in AGG_MODES:
            raise ValueError(f"loss.agg must be one of {AGG_MODES}, got {self.agg!r}")
        if self.agg == "seq-mean-token-sum-norm" and self.max_response_len <= 0:
            raise ValueError("loss.max_response_len must be set (> 0) for agg=seq-mean-token-sum-norm")
        if self.entry_clip_mode not in CLIP_MODES:
            raise ValueError(f"loss.entry_clip_mode must be one of {CLIP_MODES}, got {self.entry_clip_mode!r}")
        if self.routed_grpo not in (None, "anneal", "full", "none"):
            raise ValueError(f"loss.routed_grpo must be anneal, full or none, got {self.routed_grpo!r}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"loss.eps_low must be in [0, 1) and eps_high >= 0, got {self.eps_low}, {self.eps_high}")

    @property
    def span_grpo_mode(self) -> str:
        return self.routed_grpo or ROUTE_VARIANTS[self.variant].routed_grpo


@dataclass
class LossInputs:
    """One micro-batch of packed response tokens (T tokens, B rollouts)."""

    targets: torch.Tensor  # [T] long: sampled token ids
    old_logprobs: torch.Tensor  # [T] log pi_old(y_t) (rollout / behaviour policy)
    advantages: torch.Tensor  # [T] the rollout's advantage, repeated over its tokens
    routes: torch.Tensor  # [T] int8 Route
    seq_ids: torch.Tensor  # [T] long: rollout index 0..B-1 within this micro-batch
    seq_lens: torch.Tensor  # [B] long: |y|, each rollout's full response length
    ref_logprobs: torch.Tensor | None = None  # [T] reference policy, for kl_ref_coef > 0
    is_weights: torch.Tensor | None = None  # [T] importance weights (loss/mismatch.py) on the GRPO and KL terms


@dataclass(frozen=True)
class GlobalCounts:
    """Counts over the whole step (all DP ranks, all micro-batches): the normalisers."""

    num_tokens: int
    num_seqs: int

    def __post_init__(self) -> None:
        if self.num_tokens <= 0 or self.num_seqs <= 0:
            raise ValueError(f"global counts must be positive, got {self}")


def _grpo_weights(batch: LossInputs, counts: GlobalCounts, cfg: LossConfig, dtype) -> torch.Tensor:
    if cfg.agg == "token-mean":
        return torch.full(batch.targets.shape, 1.0 / counts.num_tokens, dtype=dtype)
    if cfg.agg == "seq-mean-token-mean":
        return 1.0 / (batch.seq_lens[batch.seq_ids].to(dtype) * counts.num_seqs)
    return torch.full(batch.targets.shape, 1.0 / (cfg.max_response_len * counts.num_seqs), dtype=dtype)


def routed_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    batch: LossInputs,
    counts: GlobalCounts,
    cfg: LossConfig,
    lam: float,
    tp_group=None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, Stats]:
    """This micro-batch's share of the step loss (sum over micro-batches and DP ranks = loss).

    logits: `[T, V/tp]` student shard (requires grad). teacher_logits: `[R, V/tp]` at the routed
    tokens, needed only when lam > 0 and R > 0. Returns (scalar loss, Stats).
    """
    T = batch.targets.numel()
    if logits.shape[0] != T:
        raise ValueError(f"logits have {logits.shape[0]} rows for {T} tokens")
    dev = logits.device
    routes = batch.routes.to(dev)
    idx, kl_on = _routed_index(routes, lam, teacher_logits, "teacher logits [{n}, V/tp]")
    lp, ent = token_logprob_and_entropy(logits, batch.targets.to(dev), tp_group, cfg.temperature,
                                        vocab_size=vocab_size, chunk_size=cfg.chunk_size,
                                        entropy_grad=cfg.entropy_coef > 0)
    d = n_clip = None
    if kl_on:
        student, sub_routes = logits[idx], routes[idx]
        d = torch.empty(idx.numel(), dtype=lp.dtype, device=dev)
        n_clip = torch.zeros(idx.numel(), dtype=lp.dtype, device=dev)
        for route, kind in ((Route.FKL, "forward"), (Route.RKL, "reverse")):
            sel = torch.nonzero(sub_routes == route)[:, 0]
            if sel.numel():
                d_k, c_k = token_divergence(student[sel], teacher_logits[sel], kind, tp_group, cfg.temperature,
                                            cfg.entry_clip, vocab_size=vocab_size, chunk_size=cfg.chunk_size,
                                            clip_mode=cfg.entry_clip_mode,
                                            return_clip_counts=True)
                d = d.index_put((sel,), d_k)
                n_clip[sel] = c_k
    width = vocab_size if vocab_size is not None else logits.shape[-1]
    return _objective(lp, ent, d, n_clip, idx, batch, counts, cfg, lam, width)


def routed_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    batch: LossInputs,
    counts: GlobalCounts,
    cfg: LossConfig,
    lam: float,
    tp_group=None,
    vocab_size: int | None = None,
    *,
    reduce_hidden_grad: bool = True,
    eager_grad: bool = True,
) -> tuple[torch.Tensor, Stats]:
    """`routed_loss` through the fused LM head (loss/fused_head.py): the same loss and metrics
    from the student's final hidden states `[T, H]` and output-weight shard `[V/tp, H]`, and the
    teacher's hidden states `[R, H]` at the routed tokens with its weight shard. No logits exist.
    reduce_hidden_grad: see `fused_head` (off when a sequence-parallel gather reduces it).
    eager_grad: the per-token loss goes into the fused head, which forms the gradient in its
    forward (each chunk's logits computed once); False: per-token values out, backward
    recomputes the logits (the same gradients, for tests and comparison)."""
    from .fused_head import fused_head

    T = batch.targets.numel()
    if hidden.shape[0] != T:
        raise ValueError(f"hidden states have {hidden.shape[0]} rows for {T} tokens")
    dev = hidden.device
    routes = batch.routes.to(dev)
    idx, kl_on = _routed_index(routes, lam, teacher_hidden, "teacher hidden states [{n}, H]")
    sub_routes = routes[idx]
    kinds = tuple(kind for route, kind in ((Route.FKL, "forward"), (Route.RKL, "reverse"))
                  if kl_on and bool((sub_routes == route).any()))
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    terms = _Terms(batch, counts, cfg, lam, idx if kl_on else None, cdt, dev)
    token_loss = None
    if eager_grad:
        def token_loss(bound, lp, ent, kl):
            a, b, ka, kb = bound
            return terms.loss(lp, ent, _pick_kl(kl, sub_routes[ka:kb]), slice(a, b), slice(ka, kb))[0]

    out = fused_head(hidden, weight, batch.targets.to(dev), tp_group, cfg.temperature, vocab_size=vocab_size,
                     kl_index=idx if kl_on else None, teacher_hidden=teacher_hidden if kl_on else None,
                     teacher_weight=teacher_weight if kl_on else None, kinds=kinds or ("forward",),
                     entry_clip=cfg.entry_clip, clip_mode=cfg.entry_clip_mode, chunk_tokens=cfg.head_chunk_tokens,
                     entropy_grad=cfg.entropy_coef > 0, reduce_hidden_grad=reduce_hidden_grad, token_loss=token_loss)
    d = n_clip = None
    if kl_on:
        d = _pick_kl({"forward": out.fkl, "reverse": out.rkl}, sub_routes)
        n_clip = _pick_kl({"forward": out.fkl_clipped, "reverse": out.rkl_clipped}, sub_routes)
    width = vocab_size if vocab_size is not None else weight.shape[0] * _world(tp_group)[1]
    loss, stats = _objective(out.logprob, out.entropy, d, n_clip, idx, batch, counts, cfg, lam, width, terms)
    return (out.loss if eager_grad else loss), stats


def _pick_kl(values: dict, routes: torch.Tensor) -> torch.Tensor:
    """Each routed row's divergence: FKL on FKL routes, RKL on RKL routes (kinds absent are None)."""
    f, r = values.get("forward"), values.get("reverse")
    if f is not None and r is not None:
        return torch.where(routes == Route.FKL, f, r)
    return f if f is not None else r


def _routed_index(routes: torch.Tensor, lam: float, teacher: torch.Tensor | None, what: str):
    """The routed rows (ascending) and whether the KL term is on; checks the teacher's rows."""
    idx = torch.nonzero(routes != Route.GRPO)[:, 0]
    kl_on = lam > 0 and idx.numel() > 0
    if kl_on and (teacher is None or teacher.shape[0] != idx.numel()):
        got = None if teacher is None else tuple(teacher.shape)
        raise ValueError(f"lambda={lam} with {idx.numel()} routed tokens needs {what.format(n=idx.numel())}, got {got}")
    return idx, kl_on


class _Terms:
    """The objective's per-token weights and inputs, so that any slice of tokens (the fused
    head's chunks, or all of them) gets its share of the loss: the loss is a sum over tokens."""

    def __init__(self, batch: LossInputs, counts: GlobalCounts, cfg: LossConfig, lam: float,
                 idx: torch.Tensor | None, cdt, dev):
        self.cfg, self.lam = cfg, lam
        routed = batch.routes.to(dev) != Route.GRPO
        w_span = {"anneal": 1.0 - lam / cfg.lambda0 if cfg.lambda0 > 0 else 1.0, "full": 1.0,
                  "none": 0.0}[cfg.span_grpo_mode]
        self.w = _grpo_weights(batch, counts, cfg, cdt).to(dev)
        self.w_pg = torch.where(routed, self.w * w_span, self.w)
        self.adv = batch.advantages.to(dev, cdt)
        self.old = batch.old_logprobs.to(dev, cdt).detach()
        self.isw = None if batch.is_weights is None else batch.is_weights.to(dev, cdt).detach()
        self.ref = None if batch.ref_logprobs is None else batch.ref_logprobs.to(dev, cdt)
        if cfg.kl_ref_coef > 0 and self.ref is None:
            raise ValueError("loss.kl_ref_coef > 0 needs ref_logprobs in the batch")
        seq_len_t = batch.seq_lens.to(dev)[batch.seq_ids.to(dev)].to(cdt)
        self.kl_w = None if idx is None else lam / (seq_len_t[idx] * counts.num_seqs)  # [R]
        if self.kl_w is not None and self.isw is not None:  # the importance weight corrects the KL term too
            self.kl_w = self.kl_w * self.isw[idx]

    def loss(self, lp, ent, d, rows: slice, kl_rows: slice):
        """(loss, GRPO part, KL part, ratio, log-ratio, k3) of the tokens `rows` and routed rows
        `kl_rows` (d: their divergences, None without a KL term)."""
        cfg = self.cfg
        adv, w = self.adv[rows], self.w[rows]
        log_ratio = lp - self.old[rows]
        ratio = torch.exp(log_ratio)
        clipped_ratio = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
        pg = -torch.minimum(ratio * adv, clipped_ratio * adv)
        if self.isw is not None:
            pg = pg * self.isw[rows]
        loss_pg = (self.w_pg[rows] * pg).sum()
        loss_kl = (self.kl_w[kl_rows] * d).sum() if d is not None else torch.zeros((), dtype=lp.dtype,
                                                                                   device=lp.device)
        loss = loss_pg + loss_kl
        k3 = None
        if cfg.kl_ref_coef > 0:
            delta = (self.ref[rows] - lp).clamp(-20.0, 20.0)
            k3 = torch.exp(delta) - delta - 1.0
            loss = loss + cfg.kl_ref_coef * (w * k3).sum()
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * (w * ent).sum()
        return loss, loss_pg, loss_kl, ratio, log_ratio, k3


def _objective(lp: torch.Tensor, ent: torch.Tensor, d: torch.Tensor | None, n_clip: torch.Tensor | None,
               idx: torch.Tensor, batch: LossInputs, counts: GlobalCounts, cfg: LossConfig, lam: float,
               width: int, terms: _Terms | None = None) -> tuple[torch.Tensor, Stats]:
    """The routed objective from per-token values: log-probs and entropies `[T]`, and at the routed
    rows `idx` the divergences `d` and clipped-entry counts `n_clip` `[R]` (None: no KL term)."""
    T = batch.targets.numel()
    dev = lp.device
    routes = batch.routes.to(dev)
    routed = routes != Route.GRPO
    num_routed = idx.numel()
    kl_on = d is not None
    cdt = lp.dtype
    terms = terms or _Terms(batch, counts, cfg, lam, idx if kl_on else None, cdt, dev)
    everything = slice(None)
    loss, loss_pg, loss_kl, ratio, log_ratio, k3 = terms.loss(lp, ent, d, everything, everything)
    adv = terms.adv

    stats = Stats()
    if kl_on:
        sub_routes = routes[idx]
        for route, kind in ((Route.FKL, "forward"), (Route.RKL, "reverse")):
            stats.mean(f"kl/{kind[0]}kl_mean", d.detach()[sub_routes == route])
        stats.mean_of("kl/entry_clip_frac", n_clip.sum(), num_routed * width)
    else:
        stats.mean("kl/fkl_mean", lp.detach()[:0])
        stats.mean("kl/rkl_mean", lp.detach()[:0])
        stats.mean_of("kl/entry_clip_frac", 0.0, 0.0)
    if k3 is not None:
        stats.mean("kl/ref_k3", k3.detach())

    # ---- metrics (declared reductions; see metrics.Stats)
    with torch.no_grad():
        stats.sum("loss/total", loss.detach())
        stats.sum("loss/grpo", loss_pg.detach())
        stats.sum("loss/kl", loss_kl.detach())
        for r in Route:
            stats.mean(f"route/{r.name.lower()}_frac", (routes == r).to(cdt))
        stats.mean("entropy/all", ent)
        stats.mean("entropy/span", ent, routed)
        stats.mean("entropy/off_span", ent, ~routed)
        stats.mean("ppo/clip_frac_low", ((ratio < 1.0 - cfg.eps_low) & (adv < 0)).to(cdt))
        stats.mean("ppo/clip_frac_high", ((ratio > 1.0 + cfg.eps_high) & (adv > 0)).to(cdt))
        stats.mean("ppo/ratio_mean", ratio)
        stats.max("ppo/ratio_max", ratio.max() if T else float("-inf"))
        stats.min("ppo/ratio_min", ratio.min() if T else float("inf"))
        stats.mean("ppo/logprob_diff_abs", log_ratio.abs())  # train vs behaviour policy mismatch
        stats.max("kl/lambda", lam)
        if batch.is_weights is not None:
            stats.mean("ppo/tis_weight_mean", batch.is_weights.to(dev, cdt))
            stats.mean("ppo/tis_dropped_frac", (batch.is_weights == 0).to(cdt))  # tis_mode=mask
        # Span coverage: mean over rollouts of |S_y| / |y|.
        num_b = batch.seq_lens.numel()
        per_seq = torch.zeros(num_b, dtype=cdt, device=dev).index_add_(0, batch.seq_ids.to(dev), routed.to(cdt))
        stats.mean("route/span_coverage", per_seq / batch.seq_lens.to(dev, cdt).clamp(min=1))
        stats.mean("route/rollouts_with_span", (per_seq > 0).to(cdt))
    return loss, stats

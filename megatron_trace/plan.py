"""Per-GPU memory plan of a training config, from the config alone (`megatron-trace plan`).

No model is built and no process group is started. Two phases of a colocated step peak
separately (README "Scaling out"): *rollout* (the engine's weights + KV cache next to what the
trainer keeps resident) and *train* (weights, gradients, optimizer, teacher, activations).
Everything is per GPU, for the pipeline stage that needs most.

Notation: h hidden, L layers, a query heads, g KV heads, d head_dim, q = a*d, kv = g*d, f the
SwiGLU intermediate size, V the vocabulary padded as Megatron pads it (`models/builder.py`),
tp / pp / dp the layout (dp = cluster GPUs / (tp*pp), or `parallel.dp`), B bytes per weight and
activation element (2 bf16, 4 fp32).

**Parameters** of one TP rank of a stage (exact; `tests/unit/test_plan.py` checks them against
the tensors Megatron allocates):
    per layer    (h(q + 2kv) + q h + 3 h f) / tp + 2h + 2d     QKV, proj, fc1 [gate; up], fc2; two
                                                               RMSNorms; q/k norms (replicated)
    first stage  + V h / tp                                    embedding
    last stage   + h, + V h / tp                               final norm; LM head, unless tied at
                                                               pp = 1 (tied at pp > 1: a copy)
The local spec's RMSNorm weights (2h + 2d per layer, h final) are fp32 whatever the model
dtype, so they have no master copy; TE's follow the model dtype.
Per parameter N: weights B, gradients 4 (Megatron DDP `main_grad` buffer, grad_reduce_in_fp32),
Adam 12 (fp32 master copy + m + v; 8 without the copy when the weights are fp32), SGD 8 / 4
(Megatron's momentum 0.9). The distributed optimizer keeps 1/dp of the optimizer bytes of the
DDP buffer (padded as Megatron pads it: each parameter to 64 elements, the buffer to
lcm(dp, 128)); gradients stay whole. Snapshot teacher: another N*B, except with
`teacher.offload`, where it is on the GPU only during the teacher pass.

**Activations** after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models": 34sbh + 5as^2b bytes per layer, fp16, GPT), re-derived for Qwen3 (RMSNorm,
GQA, q/k norm, SwiGLU, no dropout). Elements kept for backward, per token and layer:
    r = 4h                     the two norm inputs, the QKV input, the fc1 input   (/tp under SP)
    t = (q + kv) + c + q + 4f  q/k-norm inputs, core-attention inputs c, proj input, SwiGLU (fc1
                               output 2f, silu output f, fc2 input f)              (/tp)
    c = 3q                     unfused attention without recompute (the local spec repeats K and V
                               to the query heads); q + 2kv otherwise (fused attention keeps q, k, v;
                               selective recompute checkpoints them)
    scores = (a/tp) s (4 + B)  bytes, unfused attention without recompute: the fp32 softmax output
                               and the probabilities in B (4 only in fp32); s the attention row
    per layer = T (B (r + t) + scores)   for a micro-batch of T tokens
recompute: none keeps every layer; selective drops the scores (c = q + 2kv); full uniform k keeps
the input of each chunk of k layers (T h B, /tp under SP) plus one chunk's full activations while
it is recomputed; full block n keeps n layer inputs, the other layers whole, and one layer for the
recompute. Attention is *fused* with TransformerEngine (`model.use_te` true, or null on
`parallel.device` cuda/auto, where the TE spec is picked when installed); `train` passes what it
actually built. 1F1B: stage i holds min(pp - i, M) micro-batches in flight (M per mini-batch and
rank). The last stage adds the final norm (2h per token) and the LM head at the response
positions only (the span-sparse head): T_resp V/tp elements, twice (logits and their gradient).

**Micro-batches.** Every sequence is assumed to reach the longest: s = prompt + max_new_tokens,
with the prompt `PROMPT_TOKENS` (a math problem under the chat template; `plan --prompt-tokens`).
T = optim.max_tokens_per_micro_batch when set (at least one sequence), else micro_batch_size
rows of s. Packed rows on the unfused (local) spec attend over the whole row (s = T).

**Teacher** (lambda0 > 0 and a routed variant): privileged sequences `TEACHER_SEQ_FACTOR` x
longer; forward only, so one layer's working set at the teacher micro-batch, plus its logits at
the routed and probe positions of the update chunk that reads them (train/step.py runs the
teacher right before each chunk of micro-batches whose positions fit
teacher.max_resident_tokens, at least one micro-batch): min(this rank's mini-batch, max(that
budget, one micro-batch)) positions x V/tp x B on the last stage, with (max_new_tokens x routed
share + probe_tokens) positions per rollout; the routed share is annotate.coverage_cap for
annotated and random masks, 1 for all-token and inverted masks.

**Passes.** The train phase peaks in the largest of its passes, each next to what stays
resident: the teacher pass (its logits), the update (the chunk's teacher logits stay next to
it) and, with optim.mini_batches > 1, the old-log-prob pass (forward only, one micro-batch's
response logits at a time).

**Rollout engine** (colocated and rank0 placements, on stage 0's GPUs). SGLang 0.5.6 sizes its
static pool (weights + KV cache) once, when it starts during setup: rollout.mem_fraction_static
of the memory free *then*, i.e. after the trainer's weights, gradient buffers, fp32 master copy
and snapshot teacher (Adam's moments come at the first step). Its weights are B per HF
parameter / engine TP (parallel.tp when colocated, 1 for rank0); the KV cache is the rest of
the pool. Meanwhile the trainer keeps its weights, the snapshot teacher (unless
teacher.offload), and gradients and optimizer state (unless train.offload_during_rollout). The
`hf` engine's weights are counted, its dynamic KV cache is not.

Both phases add `OVERHEAD_GB` for the CUDA context, NCCL and allocator slack.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .models.qwen3 import Qwen3Arch, arch_from_hf_config, get_arch

__all__ = [
    "OVERHEAD_GB",
    "PROMPT_TOKENS",
    "TEACHER_SEQ_FACTOR",
    "MemoryPlan",
    "check_fits",
    "param_numels",
    "plan_memory",
    "static_bytes",
]

PROMPT_TOKENS = 1024  # a math problem with Qwen3's chat template and instruction, rounded up
TEACHER_SEQ_FACTOR = 2  # privileged sequence (problem + reference solution + response) / student's
OVERHEAD_GB = 2.0  # CUDA context, NCCL buffers, allocator fragmentation
GB = 1e9


def _padded_vocab(vocab: int, tp: int) -> int:
    from .models.builder import padded_vocab

    return padded_vocab(vocab, tp)


def _kv_per_rank(arch: Qwen3Arch, tp: int) -> int:
    """KV width on one TP rank (Megatron needs the KV heads to divide over TP)."""
    g = arch.num_key_value_heads
    if g % tp:
        raise ValueError(f"config key 'parallel.tp': value {tp} does not divide num_key_value_heads={g}; "
                         f"Megatron shards the KV heads over TP")
    return g // tp * arch.head_dim


def param_numels(arch: Qwen3Arch, tp: int, pp: int) -> list[dict[str, int]]:
    """Per pipeline stage, the parameter elements one TP rank holds, by part."""
    L, h, d, f = arch.num_hidden_layers, arch.hidden_size, arch.head_dim, arch.intermediate_size
    if L % pp:
        raise ValueError(f"config key 'parallel.pp': value {pp} does not divide the model's {L} layers")
    if arch.num_attention_heads % tp or f % tp:
        raise ValueError(f"config key 'parallel.tp': value {tp} does not divide the attention heads "
                         f"({arch.num_attention_heads}) and the FFN size ({f})")
    q, kv = arch.num_attention_heads * d // tp, _kv_per_rank(arch, tp)
    vocab = _padded_vocab(arch.vocab_size, tp) // tp * h
    out = []
    for i in range(pp):
        parts = {"linear": (h * (q + 2 * kv) + q * h + 3 * h * f // tp) * (L // pp),
                 "norms": (2 * h + 2 * d) * (L // pp)}
        if i == 0:
            parts["embedding"] = vocab
        if i == pp - 1:
            parts["norms"] += h
            if not arch.tie_word_embeddings or pp > 1:
                parts["lm_head"] = vocab
        out.append(parts)
    return out


def _ddp_buffer_numel(numel: int, num_params: int, dp: int, distributed: bool) -> int:
    """Megatron DDP buffer elements: padded only under the distributed optimizer (each parameter
    starts on a multiple of 64, the buffer ends on a multiple of lcm(dp, 128)); the per-parameter
    padding is bounded by 63 elements each."""
    if not distributed:
        return numel
    m = math.lcm(dp, 128)
    return -(-(numel + 63 * num_params) // m) * m


@dataclass
class Phase:
    """One phase's peak on one GPU: bytes per component, for the stage where it peaks."""

    stage: int  # the pipeline stage this phase peaks on
    components: dict[str, float]  # bytes
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def peak(self) -> float:
        return sum(self.components.values())


@dataclass
class MemoryPlan:
    """`plan_memory`'s answer: both phases, the layout and assumptions behind them, the verdict."""

    config: str  # where the config came from (for the table)
    layout: dict
    assumptions: dict
    rollout: Phase
    train: Phase
    gpu_memory_gb: float
    params_per_gpu: int  # parameter elements of the stage that holds most
    kv_cache_tokens: int  # what the engine's KV cache holds (0 without a colocated engine)
    engine_fits: bool = True  # the engine's weights fit its mem_fraction_static share

    @property
    def peak_gb(self) -> float:
        return max(self.rollout.peak, self.train.peak) / GB

    @property
    def fits(self) -> bool:
        return self.engine_fits and self.peak_gb <= self.gpu_memory_gb

    @property
    def worst(self) -> tuple[str, Phase]:
        return ("train", self.train) if self.train.peak >= self.rollout.peak else ("rollout", self.rollout)

    def to_dict(self) -> dict:
        def phase(p: Phase) -> dict:
            return {"stage": p.stage, "peak_gb": round(p.peak / GB, 2),
                    "components_gb": {k: round(v / GB, 3) for k, v in p.components.items()}, "notes": p.notes}

        return {"config": self.config, "layout": self.layout, "assumptions": self.assumptions,
                "gpu_memory_gb": self.gpu_memory_gb, "rollout": phase(self.rollout), "train": phase(self.train),
                "peak_gb": round(self.peak_gb, 2), "fits": self.fits, "params_per_gpu": self.params_per_gpu,
                "kv_cache_tokens": self.kv_cache_tokens, "suggestions": suggestions(self)}

    def table(self) -> str:
        lay = self.layout
        names = list(dict.fromkeys([*self.train.components, *self.rollout.components]))
        width = max(len(n) for n in names) + 2
        head = (f"{'component':<{width}}{'rollout GB':>12}{'train GB':>10}   "
                f"(rollout: stage {self.rollout.stage}, train: stage {self.train.stage})")
        lines = [
            f"megatron-trace plan: {self.config}",
            f"model {lay['model']} ({_count(lay['params_b'] * 1e9)} params, {lay['dtype']}); tp={lay['tp']} pp={lay['pp']} "
            f"dp={lay['dp']} ({lay['gpus']} GPUs); sequence_parallel={lay['sequence_parallel']}; "
            f"recompute={lay['recompute']}; attention {lay['attention']}",
            f"micro-batch {self.assumptions['micro_batch_tokens']} tokens (sequences of "
            f"{self.assumptions['sequence_tokens']} = prompt {self.assumptions['prompt_tokens']} + response "
            f"{self.assumptions['response_tokens']}), {self.assumptions['micro_batches']} micro-batches per "
            f"mini-batch and rank; teacher micro-batch {self.assumptions['teacher_micro_batch_tokens']} tokens",
            "",
            head,
            "-" * len(head),
        ]
        for n in names:
            r, t = self.rollout.components.get(n), self.train.components.get(n)
            lines.append(f"{n:<{width}}{_cell(r, 12)}{_cell(t, 10)}")
        lines.append("-" * len(head))
        lines.append(f"{'peak':<{width}}{self.rollout.peak / GB:>12.1f}{self.train.peak / GB:>10.1f}")
        for p in (self.rollout, self.train):
            for k, v in p.notes.items():
                lines.append(f"  {k}: {v}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"GPU {self.gpu_memory_gb:g} GB (cluster.gpu_memory_gb): peak {self.peak_gb:.1f} GB, {verdict}")
        if not self.fits:
            lines += [f"  - {s}" for s in suggestions(self)]
        return "\n".join(lines) + "\n"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _cell(v: float | None, width: int) -> str:
    return f"{v / GB:>{width}.1f}" if v is not None else f"{'-':>{width}}"


def _arch_of(cfg) -> Qwen3Arch:
    m = cfg.model
    if m.hf_dir and os.path.exists(os.path.join(m.hf_dir, "config.json")):
        return arch_from_hf_config(m.hf_dir)
    if m.ckpt and os.path.exists(m.ckpt):
        from .models.checkpoint import read_meta

        return arch_from_hf_config(read_meta(m.ckpt)["hf_config"])
    return get_arch(m.size)


def _fused_attention(cfg) -> bool:
    if cfg.model.use_te is not None:
        return bool(cfg.model.use_te)
    return cfg.parallel.device != "cpu"


def _routed_share(cfg) -> float:
    """The share of response tokens routed to the teacher (0: no teacher pass at all)."""
    from .loss.routed import ROUTE_VARIANTS

    if cfg.schedule.lambda0 <= 0:
        return 0.0
    mask = ROUTE_VARIANTS[cfg.loss.variant].mask
    return {None: 0.0, "annotator": cfg.annotate.coverage_cap, "random": cfg.annotate.coverage_cap}.get(mask, 1.0)


def _optimizer_bytes(cfg) -> tuple[int, int]:
    """Bytes per parameter of the fp32 master copy (made with the optimizer; only for bf16 weights)
    and of the moments (Adam m + v, SGD momentum; made at the first step)."""
    return (4 if cfg.model.dtype == "bfloat16" else 0), (8 if cfg.optim.optimizer == "adam" else 4)


def static_bytes(cfg, arch: Qwen3Arch, dp: int, te_spec: bool) -> list[dict[str, float]]:
    """Per pipeline stage, bytes one GPU holds in weights, gradient buffer and optimizer state.

    The local spec's RMSNorm weights are fp32 whatever the model dtype (so no master copy); TE's
    norms follow the model dtype."""
    o, B = cfg.optim, 2 if cfg.model.dtype == "bfloat16" else 4
    master, moments = _optimizer_bytes(cfg)
    out = []
    for parts in param_numels(arch, cfg.parallel.tp, cfg.parallel.pp):
        n = sum(parts.values())
        fp32_norms = 0 if te_spec or B == 4 else parts["norms"]
        n_tensors = 9 * (arch.num_hidden_layers // cfg.parallel.pp) + len(parts)  # 9 parameter tensors per layer
        buf = _ddp_buffer_numel(n, n_tensors, dp, o.distributed_optimizer)
        weights = (buf if o.distributed_optimizer else n) * B + fp32_norms * (4 - B)
        opt = (buf / dp if o.distributed_optimizer else n) * (master + moments) - fp32_norms * master
        out.append({"weights": weights, "grads": buf * 4.0, "optimizer": opt})
    return out


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
        """Bytes one layer keeps for backward over `tokens` tokens (module docstring)."""
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


def plan_memory(cfg, *, dp: int | None = None, prompt_tokens: int = PROMPT_TOKENS,
                fused_attention: bool | None = None, arch: Qwen3Arch | None = None,
                source: str = "config") -> MemoryPlan:
    """The memory plan of `cfg` (see the module docstring). `dp`, `fused_attention` and `arch`
    override what the config implies (`train` passes the values of the run it builds)."""
    arch = arch or _arch_of(cfg)
    p, o, r = cfg.parallel, cfg.optim, cfg.rollout
    tp, pp = p.tp, p.pp
    if dp is None:  # as the launchers derive it; CPU runs spawn tp * pp * (parallel.dp or 1) ranks
        gpus = cfg.cluster.nodes * cfg.cluster.gpus_per_node
        dp = p.dp or (1 if p.device == "cpu" else max(gpus // (tp * pp), 1))
    fused = _fused_attention(cfg) if fused_attention is None else fused_attention
    sp = p.sequence_parallel and tp > 1
    B = 2 if cfg.model.dtype == "bfloat16" else 4
    stages = param_numels(arch, tp, pp)
    sh = _Shape(arch.hidden_size, arch.num_attention_heads * arch.head_dim // tp, _kv_per_rank(arch, tp),
                arch.intermediate_size // tp, arch.num_attention_heads // tp, B, tp if sp else 1)
    vocab_rank = _padded_vocab(arch.vocab_size, tp) // tp

    # micro-batches (worst case: every sequence at its longest)
    s = prompt_tokens + r.max_new_tokens
    s_t = TEACHER_SEQ_FACTOR * s
    rollouts_rank = -(-r.prompts_per_step * r.n // dp)
    rollouts_mini = -(-rollouts_rank // o.mini_batches)
    if o.max_tokens_per_micro_batch > 0:
        T, T_t = max(o.max_tokens_per_micro_batch, s), max(o.max_tokens_per_micro_batch, s_t)
        num_mb = -(-rollouts_mini * s // T)
    else:
        rows = min(o.micro_batch_size, rollouts_mini)
        T, T_t = rows * s, rows * s_t
        num_mb = -(-rollouts_mini // o.micro_batch_size)
    packed_unfused = o.pack_sequences and not fused  # the local spec attends over the whole packed row
    row, row_t = (T, T_t) if packed_unfused else (s, s_t)
    T_resp = T * r.max_new_tokens // s
    per_mb, recompute_label = _stage_activations(cfg, sh, arch.num_hidden_layers // pp, T, row, fused)

    # what stays resident
    share = _routed_share(cfg)
    teacher_used = share > 0
    snapshot = teacher_used and cfg.teacher.mode == "snapshot"
    per_rollout = r.max_new_tokens * share + cfg.teacher.probe_tokens  # teacher positions
    mb_rollouts = max(T // s, 1)
    teacher_positions = min(rollouts_mini * per_rollout,
                            max(cfg.teacher.max_resident_tokens or rollouts_mini * per_rollout, mb_rollouts * per_rollout))
    teacher_logits = teacher_positions * vocab_rank * B
    # forward-only passes reduce each micro-batch's logits as it comes (train/step.py)
    old_logits = T_resp * vocab_rank * B
    master, moments = _optimizer_bytes(cfg)
    opt_key = f"optimizer ({o.optimizer}{', distributed /' + str(dp) if o.distributed_optimizer else ''})"
    engine_here = r.placement in ("colocated", "rank0")
    engine_tp = tp if r.placement == "colocated" else 1
    engine_weights = arch.num_params * B / engine_tp if engine_here else 0.0
    engine_pool = kv_bytes = 0.0
    overhead = OVERHEAD_GB * GB

    rollout_phases, train_phases = [], []
    for i, (n, st) in enumerate(zip([sum(x.values()) for x in stages], static_bytes(cfg, arch, dp, fused))):
        first, last = i == 0, i == pp - 1
        base = {f"actor weights ({cfg.model.dtype})": st["weights"], "gradients (fp32 main_grad)": st["grads"],
                opt_key: st["optimizer"]}
        opt_moments = st["optimizer"] * moments / (master + moments)
        teacher_w = n * B if snapshot else 0.0
        if snapshot:
            base["snapshot teacher weights"] = 0.0 if cfg.teacher.offload else teacher_w

        # rollout: SGLang sizes its pool when it starts (setup), from the memory free then
        ro = dict(base)
        if cfg.train.offload_during_rollout:
            ro["gradients (fp32 main_grad)"] = ro[opt_key] = 0.0
        if engine_here and first:
            if r.engine == "sglang":
                at_start = sum(base.values()) - opt_moments + overhead
                engine_pool = r.mem_fraction_static * (cfg.cluster.gpu_memory_gb * GB - at_start)
                kv_bytes = engine_pool - engine_weights
                ro["rollout engine weights"] = engine_weights
                ro["rollout engine KV cache"] = max(kv_bytes, 0.0)
            else:
                ro["rollout engine weights (hf; KV cache not estimated)"] = engine_weights
        ro["runtime overhead"] = overhead
        rollout_phases.append(Phase(i, ro))

        # train: the largest of its passes
        resident = {**base, "teacher logits (one update chunk)": teacher_logits if last and teacher_used else 0.0}
        passes = {}
        if teacher_used:
            passes["teacher"] = {**resident, "snapshot teacher weights": teacher_w,
                                 "activations (teacher pass, one layer)": sh.layer_bytes(T_t, row_t, not fused)}
        if o.mini_batches > 1:
            passes["old log-prob"] = {**base, "old log-prob logits (one micro-batch)": old_logits if last else 0}
        passes["update"] = {**resident,
                            "activations (update)": min(pp - i, num_mb) * per_mb + (T * 2 * sh.h * B if last else 0),
                            "LM head logits (update)": T_resp * vocab_rank * 2 * B if last else 0.0}
        name, tr = max(passes.items(), key=lambda kv: sum(kv[1].values()))
        tr["runtime overhead"] = overhead
        train_phases.append(Phase(i, tr, {"train peak": f"the {name} pass"}))

    ro_worst = max(rollout_phases, key=lambda ph: ph.peak)
    tr_worst = max(train_phases, key=lambda ph: ph.peak)
    for ph in (ro_worst, tr_worst):
        ph.components = {k: v for k, v in ph.components.items() if v or k.startswith(("actor", "gradients", "optim"))}
    kv_tokens = 0
    if engine_here and r.engine == "sglang":
        kv_tokens = int(max(kv_bytes, 0) // (2 * arch.num_hidden_layers * _kv_per_rank(arch, engine_tp) * B))
        ro_worst.notes["engine"] = (f"SGLang tp_size={engine_tp} on stage 0: rollout.mem_fraction_static="
                                    f"{r.mem_fraction_static} of the memory free at its start = "
                                    f"{engine_pool / GB:.1f} GB, KV cache for {kv_tokens} tokens")
    if teacher_used:
        tr_worst.notes["teacher logits"] = (f"{int(teacher_positions)} positions (teacher.max_resident_tokens="
                                            f"{cfg.teacher.max_resident_tokens}; {per_rollout:g} per rollout) x "
                                            f"V/tp={vocab_rank}")
    layout = {"model": cfg.model.size if not cfg.model.ckpt else cfg.model.ckpt, "params_b": arch.num_params / 1e9,
              "dtype": cfg.model.dtype, "tp": tp, "pp": pp, "dp": dp, "gpus": tp * pp * dp,
              "sequence_parallel": "on" if sp else "off", "recompute": recompute_label,
              "attention": "fused (TE)" if fused else "unfused (local spec)", "placement": r.placement}
    assumptions = {"prompt_tokens": prompt_tokens, "response_tokens": r.max_new_tokens, "sequence_tokens": s,
                   "micro_batch_tokens": T, "micro_batches": num_mb,
                   "teacher_micro_batch_tokens": T_t if teacher_used else 0, "rollouts_per_rank": rollouts_rank,
                   "overhead_gb": OVERHEAD_GB}
    return MemoryPlan(source, layout, assumptions, ro_worst, tr_worst, cfg.cluster.gpu_memory_gb,
                      max(sum(st.values()) for st in stages), kv_tokens, not engine_here or kv_bytes > 0
                      or r.engine != "sglang")


def suggestions(plan: MemoryPlan) -> list[str]:
    """What to change, for the components that dominate the phase over budget."""
    if plan.fits:
        return []
    phase_name, phase = plan.worst
    out: list[str] = []
    if not plan.engine_fits:
        out.append("the rollout engine's weights do not fit its rollout.mem_fraction_static share: raise it, or "
                   "raise parallel.tp (engine TP)")
    lay = plan.layout
    ranked = sorted(phase.components.items(), key=lambda kv: -kv[1])
    for name, _ in ranked[:3]:
        if name.startswith("activations") or name.startswith("LM head"):
            if not lay["recompute"].startswith("full"):
                out.append("turn on activation recompute: optim.recompute=selective (drops the attention scores) "
                           "or full")
            out.append(f"lower optim.max_tokens_per_micro_batch (micro-batches of "
                       f"{plan.assumptions['micro_batch_tokens']} tokens now) or optim.micro_batch_size")
            if lay["tp"] > 1 and lay["sequence_parallel"] == "off":
                out.append("parallel.sequence_parallel=true (layer inputs and norms / tp)")
            out.append("raise parallel.tp or parallel.pp")
        elif name.startswith("optimizer"):
            if "distributed" not in name:
                out.append("optim.distributed_optimizer=true (optimizer state / dp)")
            out.append("raise parallel.tp or parallel.pp, or cluster.nodes (more DP shards the optimizer further)")
        elif name.startswith(("actor weights", "gradients")):
            out.append("raise parallel.tp or parallel.pp")
        elif name.startswith("snapshot teacher"):
            out.append("teacher.offload=true (the snapshot waits in host memory) or teacher.mode=live")
        elif name.startswith("teacher logits"):
            out.append("lower teacher.max_resident_tokens (the teacher runs in smaller chunks of the update), "
                       "optim.micro_batch_size or optim.max_tokens_per_micro_batch (one micro-batch's teacher "
                       "logits are the floor), or raise parallel.tp")
        elif name.startswith("rollout engine"):
            out.append("lower rollout.mem_fraction_static, or train.offload_during_rollout=true / teacher.offload=true "
                       "(more room next to the engine)")
    if phase_name == "rollout" and "train.offload_during_rollout=true" not in " ".join(out):
        out.append("train.offload_during_rollout=true (optimizer state and gradients leave the GPU while it generates)")
    return list(dict.fromkeys(out))


def check_fits(cfg, **kwargs) -> MemoryPlan:
    """`plan_memory`, raising a ValueError that names what to change when it does not fit."""
    plan = plan_memory(cfg, **kwargs)
    if plan.fits:
        return plan
    phase_name, phase = plan.worst
    top = sorted(phase.components.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{k} {v / GB:.1f} GB" for k, v in top)
    raise ValueError(
        f"memory plan: the {phase_name} phase needs {phase.peak / GB:.1f} GB per GPU (pipeline stage "
        f"{phase.stage}), over cluster.gpu_memory_gb={plan.gpu_memory_gb:g}; largest parts: {parts}. To fit: "
        + "; ".join(suggestions(plan))
        + ". `megatron-trace plan --config C` prints the whole table; train.memory_check=false runs anyway")


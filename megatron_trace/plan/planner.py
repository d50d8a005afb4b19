"""`plan_memory`: both phases of a colocated step on every kind of GPU of a replica (package
docstring), and `check_fits`, the refusal `train` runs on CUDA."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

from ..loss.fused_head import _BUFFERS_PER_CHUNK, auto_chunk_tokens
from ..models.qwen3 import Qwen3Arch, arch_from_hf_config, get_arch
from .activations import _fused_attention, _Shape, _stage_activations
from .engine import (
    MEMORY_SAVER_CUDA_GRAPH_ENV,
    SGLANG_VERSION,
    EngineMemory,
    engine_memory,
    requests_per_engine,
)
from .fleet import fleet_memory, fleet_note
from .params import GB, MIB, _kv_per_rank, _optimizer_bytes, _padded_vocab, param_numels, static_bytes
from .report import EST, MemoryPlan, Phase, suggestions
from .runtime import (
    CUDA_CONTEXT_GB,
    NCCL_CHANNELS,
    NCCL_COMM_BYTES,
    NCCL_RING_PEERS,
    context_bytes,
    nccl_bytes,
    trainer_nccl_groups,
)

PROMPT_TOKENS = 1024  # a math problem with Qwen3's chat template and instruction, rounded up
TEACHER_SEQ_FACTOR = 2  # privileged sequence (problem + reference solution + response) / student's

GRAPHS = f"engine CUDA graphs {EST}"
BUFFERS = "engine graph input buffers"
ENGINE_ACT = f"engine activations {EST}"
CUSTOM_AR = "engine custom all-reduce"
CONTEXTS = f"CUDA contexts {EST}"
NCCL = f"NCCL buffers {EST}"


@dataclass(frozen=True)
class _Gpu:
    """One kind of GPU of a pipeline stage, by what runs on it besides the trainer."""

    label: str
    scheduler: bool = False  # an SGLang scheduler process (one engine TP rank)
    hf_engine: bool = False  # the hf engine's model (in the trainer's process)
    extra_comms: tuple[str, ...] = ()

    def contexts(self) -> int:
        return 1 + self.scheduler


def _gpus_of_stage(cfg, stage: int) -> list[_Gpu]:
    r, tp = cfg.rollout, cfg.parallel.tp
    others = "TP rank 1" if tp == 2 else f"TP ranks 1..{tp - 1}"
    if stage > 0:
        return [_Gpu("")]
    sglang = r.engine == "sglang"
    if r.placement == "colocated":
        owner = _Gpu("TP rank 0, engine owner", scheduler=sglang, hf_engine=not sglang)
        return [owner] + ([_Gpu(others, scheduler=sglang)] if tp > 1 else [])
    if r.placement == "rank0":
        return [_Gpu("global rank 0, engine owner", scheduler=sglang, hf_engine=not sglang), _Gpu("other GPUs")]
    rem = r.remote
    if rem.weight_sync == "distributed" and rem.backend != "gloo":
        return [_Gpu("global rank 0, weight broadcaster", extra_comms=("remote weight broadcast",)), _Gpu("other GPUs")]
    return [_Gpu("")]


def _arch_of(cfg) -> Qwen3Arch:
    m = cfg.model
    if m.hf_dir and os.path.exists(os.path.join(m.hf_dir, "config.json")):
        return arch_from_hf_config(m.hf_dir)
    if m.ckpt and os.path.exists(m.ckpt):
        from ..models.checkpoint import read_meta

        return arch_from_hf_config(read_meta(m.ckpt)["hf_config"])
    return get_arch(m.size)


def _routed_share(cfg) -> float:
    """The share of response tokens routed to the teacher (0: no teacher pass at all)."""
    from ..loss.routed import ROUTE_VARIANTS

    if cfg.schedule.lambda0 <= 0:
        return 0.0
    mask = ROUTE_VARIANTS[cfg.loss.variant].mask
    if mask in ("random", "inverted") and cfg.loss.coverage_fraction is not None:
        return cfg.loss.coverage_fraction
    # "all" and "failed" (every token of a rollout) are planned as every token
    return {None: 0.0, "annotator": cfg.annotate.coverage_cap, "random": cfg.annotate.coverage_cap,
            "inverted": cfg.annotate.coverage_cap}.get(mask, 1.0)


def _runtime_note(g: _Gpu, trainer_groups: list[str], em: EngineMemory | None) -> str:
    who = ["trainer"] + (["SGLang scheduler"] if g.scheduler else [])
    comms = trainer_groups + (["SGLang TP pynccl", "SGLang TP torch"] if g.scheduler and em and em.nccl_comms else []) \
        + list(g.extra_comms)
    return (f"{g.contexts()} x {CUDA_CONTEXT_GB:g} GB ({', '.join(who)}); NCCL {len(comms)} communicators "
            f"({', '.join(comms) or 'none'}) x {NCCL_CHANNELS} channels x {NCCL_RING_PEERS} peers x "
            f"{NCCL_COMM_BYTES / NCCL_CHANNELS / NCCL_RING_PEERS / MIB:.2f} MiB")


def plan_memory(cfg, *, dp: int | None = None, prompt_tokens: int = PROMPT_TOKENS,
                fused_attention: bool | None = None, arch: Qwen3Arch | None = None,
                source: str = "config") -> MemoryPlan:
    """The memory plan of `cfg` (see the package docstring). `dp`, `fused_attention` and `arch`
    override what the config implies (`train` passes the values of the run it builds).
    SGLANG_MEMORY_SAVER_CUDA_GRAPH is read from this process's environment. The config is planned
    a second time with loss.fused_head flipped, for the train peak with and without the fused LM
    head (`MemoryPlan.lm_head` and the train phase's "LM head" note)."""
    kwargs = dict(dp=dp, prompt_tokens=prompt_tokens, fused_attention=fused_attention,
                  arch=arch or _arch_of(cfg), source=source)
    plan = _plan_one(cfg, **kwargs)
    other = _plan_one(_with_fused_head(cfg, not cfg.loss.fused_head), **kwargs)
    on = bool(cfg.loss.fused_head)
    fused, unfused = (plan, other) if on else (other, plan)
    plan.lm_head = {"fused_head": on, "fused_train_peak_gb": fused.train.peak / GB,
                    "unfused_train_peak_gb": unfused.train.peak / GB}
    saving = (unfused.train.peak - fused.train.peak) / GB
    plan.train.notes["LM head"] = (
        f"fused (loss.fused_head=true) {fused.train.peak / GB:.1f} GB train peak / unfused "
        f"{unfused.train.peak / GB:.1f} GB (" + (f"fusing saves {saving:.1f} GB" if saving >= 0 else
                                                 f"fusing costs {-saving:.1f} GB more")
        + f"); the flag is {'on' if on else 'off'}"
        + ("" if fused.peak_gb == unfused.peak_gb else
           f"; peak of the step {fused.peak_gb:.1f} GB fused / {unfused.peak_gb:.1f} GB unfused"))
    if cfg.cluster.rollout_nodes and cfg.cluster.gpus_per_node:  # both sides of a job with its own fleet
        plan.fleet = fleet_memory(cfg, kwargs["arch"])
        plan.notes["rollout fleet (cluster.rollout_nodes)"] = fleet_note(plan.fleet, cfg.cluster.gpu_memory_gb)
    return plan


def _with_fused_head(cfg, on: bool):
    """A copy of `cfg` whose loss.fused_head is `on` (the other sections are shared, not copied)."""
    out = copy.copy(cfg)
    out.loss = copy.copy(cfg.loss)
    out.loss.fused_head = on
    return out


def _head_chunk_bytes(cfg, tokens: int, vocab_rank: int) -> float:
    """One fused-head chunk's fp32 temporaries (loss/fused_head.py), chunks of at most `tokens`."""
    chunk = cfg.loss.head_chunk_tokens or auto_chunk_tokens(vocab_rank)
    return _BUFFERS_PER_CHUNK * 4 * min(chunk, tokens) * vocab_rank


@dataclass
class _Step:
    """What `_plan_one` derives from the config before it looks at any GPU: the layout, the
    worst-case micro-batches, the head's and the teacher's terms, and the engine."""

    dp: int
    fused: bool
    sp: bool
    B: int  # bytes per weight / activation element
    stages: list
    sh: _Shape
    vocab_rank: int
    s: int  # prompt + response tokens
    T: int  # tokens of the update's micro-batch
    T_t: int  # tokens of the teacher pass's micro-batch
    row_t: int
    num_mb: int
    rollouts_rank: int
    T_resp: int
    per_mb: float
    recompute_label: str
    teacher_used: bool
    snapshot: bool
    per_rollout: float
    teacher_positions: float
    head_fused: bool
    teacher_key: str
    teacher_resident: float
    old_key: str
    old_bytes: float
    head_update: dict
    master: float
    moments: float
    opt_key: str
    em: EngineMemory | None
    engine_tp: int
    engines: int
    engine_weights: float
    trainer_groups: list


def _step_terms(cfg, dp: int | None, prompt_tokens: int, fused_attention: bool | None, arch: Qwen3Arch) -> _Step:
    p, o, r = cfg.parallel, cfg.optim, cfg.rollout
    tp, pp = p.tp, p.pp
    if dp is None:  # as the launchers derive it; CPU runs spawn tp * pp * (parallel.dp or 1) ranks
        gpus = (cfg.cluster.nodes - cfg.cluster.rollout_nodes) * cfg.cluster.gpus_per_node  # the trainer's
        dp = p.dp or (1 if p.device == "cpu" else max(gpus // (tp * pp), 1))
    fused = _fused_attention(cfg) if fused_attention is None else fused_attention
    sp = p.sequence_parallel and tp > 1
    B = 2 if cfg.model.dtype == "bfloat16" else 4
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
    per_rollout = r.max_new_tokens * share + cfg.teacher.probe_tokens  # teacher positions
    mb_rollouts = max(T // s, 1)
    teacher_positions = min(rollouts_mini * per_rollout,
                            max(cfg.teacher.max_resident_tokens or rollouts_mini * per_rollout, mb_rollouts * per_rollout))
    # forward-only passes reduce each micro-batch's logits as it comes (train/step.py); the fused
    # head (loss.fused_head) keeps the teacher's final hidden states instead of its logits, and no
    # pass holds more of the head than one chunk's temporaries (and, in the update, the response
    # positions' hidden states and their gradient, and the weight's gradient)
    head_fused = bool(cfg.loss.fused_head)
    if head_fused:
        teacher_key, teacher_resident = "teacher hidden states (one update chunk)", teacher_positions * arch.hidden_size * B
        old_key, old_bytes = "fused LM head chunk buffers", _head_chunk_bytes(cfg, T_resp, vocab_rank)
        # the update forms d(weight) in its forward and holds it, in the weight's dtype, until
        # the micro-batch's backward (loss/fused_head.py, token_loss)
        head_update = {"fused LM head chunk buffers": old_bytes,
                       "LM head hidden states + grad (update)": T_resp * arch.hidden_size * B * 2,
                       "fused LM head d(weight) (forward to backward)": vocab_rank * arch.hidden_size * B}
    else:
        teacher_key, teacher_resident = "teacher logits (one update chunk)", teacher_positions * vocab_rank * B
        old_key, old_bytes = "old log-prob logits (one micro-batch)", T_resp * vocab_rank * B
        head_update = {"LM head logits (update)": T_resp * vocab_rank * 2 * B}
    master, moments = _optimizer_bytes(cfg)
    opt_key = f"optimizer ({o.optimizer}{', distributed /' + str(dp) if o.distributed_optimizer else ''})"

    # the engine (package docstring "Rollout engine"; engine.py, runtime.py)
    sglang = r.placement in ("colocated", "rank0") and r.engine == "sglang"
    engine_tp = tp if r.placement == "colocated" else 1
    engines = dp if r.placement == "colocated" else 1
    em = (engine_memory(arch, engine_tp, B, cfg.cluster.gpu_memory_gb,
                        requests_per_engine(r.prompts_per_step * r.n, engines)) if sglang else None)
    return _Step(dp, fused, sp, B, param_numels(arch, tp, pp), sh, vocab_rank, s, T, T_t, row_t, num_mb,
                 rollouts_rank, T_resp, per_mb, recompute_label, teacher_used,
                 teacher_used and cfg.teacher.mode == "snapshot", per_rollout, teacher_positions, head_fused,
                 teacher_key, teacher_resident, old_key, old_bytes, head_update, master, moments, opt_key, em,
                 engine_tp, engines, arch.num_params * B / engine_tp, trainer_nccl_groups(tp, pp, dp))


def _engine_pool(cfg, st: _Step, base: dict, opt_moments: float) -> float:
    """SGLang sizes its pool when it starts (setup), from the memory free then: the trainer's and
    its own scheduler's contexts, its pynccl communicator and custom all-reduce exist; the
    trainer's other communicators come later."""
    em = st.em
    at_start = (sum(base.values()) - opt_moments + context_bytes(2) + nccl_bytes(min(em.nccl_comms, 1))
                + em.custom_all_reduce)
    return cfg.rollout.mem_fraction_static * (cfg.cluster.gpu_memory_gb * GB - at_start)


def _gpu_phases(cfg, arch: Qwen3Arch, st: _Step, i: int, ro_base: dict, tr_trainer: dict, kv_bytes: float):
    """Each GPU of stage i: its rollout and train components (the engine's parts, contexts, NCCL)."""
    em = st.em
    for g in _gpus_of_stage(cfg, i):
        ro, tr = dict(ro_base), dict(tr_trainer)
        if g.scheduler and em is not None:
            ro["rollout engine weights"] = st.engine_weights
            ro["rollout engine KV cache"] = max(kv_bytes, 0.0)
            ro[GRAPHS] = em.cuda_graphs
            ro[BUFFERS] = em.graph_buffers
            ro[ENGINE_ACT] = em.activations
            ro[CUSTOM_AR] = em.custom_all_reduce
            tr[GRAPHS] = 0.0 if em.graphs_released else em.cuda_graphs  # asleep: the rest stays
            tr[BUFFERS] = em.graph_buffers
            tr[CUSTOM_AR] = em.custom_all_reduce
        if g.hf_engine:  # one HF model in the owner's process
            ro["rollout engine weights (hf; KV cache not estimated)"] = arch.num_params * st.B
        comms = len(st.trainer_groups) + (em.nccl_comms if g.scheduler and em else 0) + len(g.extra_comms)
        for ph in (ro, tr):
            ph[CONTEXTS] = context_bytes(g.contexts())
            ph[NCCL] = nccl_bytes(comms)
        yield g, ro, tr


def _phases(cfg, arch: Qwen3Arch, st: _Step):
    """Every GPU's rollout and train phase; the engine's pool and KV cache (0 without SGLang)."""
    o, pp = cfg.optim, cfg.parallel.pp
    engine_pool = kv_bytes = 0.0
    rollout_phases, train_phases, runtime_notes = [], [], {}
    for i, (n, stat) in enumerate(zip([sum(x.values()) for x in st.stages], static_bytes(cfg, arch, st.dp, st.fused))):
        last = i == pp - 1
        base = {f"actor weights ({cfg.model.dtype})": stat["weights"], "gradients (fp32 main_grad)": stat["grads"],
                st.opt_key: stat["optimizer"]}
        opt_moments = stat["optimizer"] * st.moments / (st.master + st.moments)
        teacher_w = n * st.B if st.snapshot else 0.0
        if st.snapshot:
            base["snapshot teacher weights"] = 0.0 if cfg.teacher.offload else teacher_w
        ro_base = dict(base)
        if cfg.train.offload_during_rollout:
            ro_base["gradients (fp32 main_grad)"] = ro_base[st.opt_key] = 0.0
        if st.em is not None and i == 0:
            engine_pool = _engine_pool(cfg, st, base, opt_moments)
            kv_bytes = engine_pool - st.engine_weights

        # train: the largest of its passes
        resident = {**base, st.teacher_key: st.teacher_resident if last and st.teacher_used else 0.0}
        passes = {}
        if st.teacher_used:
            passes["teacher"] = {**resident, "snapshot teacher weights": teacher_w,
                                 "activations (teacher pass, one layer)": st.sh.layer_bytes(st.T_t, st.row_t,
                                                                                            not st.fused)}
        if o.mini_batches > 1:
            passes["old log-prob"] = {**base, st.old_key: st.old_bytes if last else 0}
        passes["update"] = {**resident,
                            "activations (update)": (min(pp - i, st.num_mb) * st.per_mb
                                                     + (st.T * 2 * st.sh.h * st.B if last else 0)),
                            **{k: v if last else 0.0 for k, v in st.head_update.items()}}
        pass_name, tr_trainer = max(passes.items(), key=lambda kv: sum(kv[1].values()))
        for g, ro, tr in _gpu_phases(cfg, arch, st, i, ro_base, tr_trainer, kv_bytes):
            rollout_phases.append(Phase(i, ro, gpu=g.label))
            train_phases.append(Phase(i, tr, {"train peak": f"the {pass_name} pass"}, gpu=g.label))
            runtime_notes[rollout_phases[-1].where] = _runtime_note(g, st.trainer_groups, st.em)
    return rollout_phases, train_phases, runtime_notes, engine_pool, kv_bytes


def _notes(cfg, arch: Qwen3Arch, st: _Step, ro_worst: Phase, tr_worst: Phase, per_gpu: dict, runtime_notes: dict,
           engine_pool: float, kv_tokens: int) -> dict:
    """The plan's notes (and the notes of its worst rollout and train phases, set in place)."""
    em, r = st.em, cfg.rollout
    notes = {}
    if em is not None:
        ro_worst.notes["engine"] = (
            f"SGLang {SGLANG_VERSION} tp_size={st.engine_tp} on stage 0 "
            f"({'each replica' if st.engines > 1 else 'one'}): "
            f"rollout.mem_fraction_static={r.mem_fraction_static} of the memory free at its start = "
            f"{engine_pool / GB:.1f} GB, KV cache for {kv_tokens} tokens; outside it SGLang's defaults for a "
            f"{cfg.cluster.gpu_memory_gb:g} GB GPU: chunked_prefill_size {em.chunked_prefill_size}, "
            f"cuda_graph_max_bs {em.cuda_graph_max_bs}; {em.requests} requests per engine")
        notes[MEMORY_SAVER_CUDA_GRAPH_ENV] = (
            "=1 in this environment: the sleeping engine releases its CUDA graphs, the train phase does not count them"
            if em.graphs_released else
            "not set to 1 in this environment: SGLang 0.5.6 keeps the engine's CUDA graphs on the GPU while it "
            f"sleeps ({em.cuda_graphs / GB:.2f} GB in the train phase); export it where the trainer runs to "
            "release them")
    if st.teacher_used:
        tr_worst.notes["teacher hidden states" if st.head_fused else "teacher logits"] = (
            f"{int(st.teacher_positions)} positions (teacher.max_resident_tokens={cfg.teacher.max_resident_tokens}; "
            f"{st.per_rollout:g} per rollout) x " + (f"H={arch.hidden_size}" if st.head_fused else f"V/tp={st.vocab_rank}"))
    if st.head_fused:
        chunk = cfg.loss.head_chunk_tokens
        tr_worst.notes["fused LM head chunk"] = (
            f"{min(chunk or auto_chunk_tokens(st.vocab_rank), st.T_resp)} tokens (loss.head_chunk_tokens={chunk}"
            f"{'' if chunk else ', automatic'}) x {_BUFFERS_PER_CHUNK} fp32 buffers x V/tp={st.vocab_rank}")
    if len(per_gpu["rollout"]) > 1:
        notes["GPUs of a replica (rollout / train peak GB)"] = "; ".join(
            f"{w} {per_gpu['rollout'][w] / GB:.1f} / {per_gpu['train'][w] / GB:.1f}" for w in per_gpu["rollout"])
    for where in dict.fromkeys([ro_worst.where, tr_worst.where]):
        notes[f"CUDA contexts and NCCL on {where}"] = runtime_notes[where]
    notes["estimates"] = (f"lines marked {EST} are estimates, not byte counts: SGLang's own heuristics, a "
                          "commonly measured CUDA context size, NCCL's default buffers at an assumed channel count "
                          "(megatron_trace/plan/engine.py, runtime.py); activations and logits follow the "
                          "formulas of megatron_trace/plan/__init__.py")
    return notes


def _plan_one(cfg, *, dp: int | None, prompt_tokens: int, fused_attention: bool | None, arch: Qwen3Arch,
              source: str) -> MemoryPlan:
    """`plan_memory` for the config as it is (loss.fused_head included)."""
    p, r = cfg.parallel, cfg.rollout
    st = _step_terms(cfg, dp, prompt_tokens, fused_attention, arch)
    rollout_phases, train_phases, runtime_notes, engine_pool, kv_bytes = _phases(cfg, arch, st)
    ro_worst = max(rollout_phases, key=lambda ph: ph.peak)
    tr_worst = max(train_phases, key=lambda ph: ph.peak)
    per_gpu = {"rollout": {ph.where: ph.peak for ph in rollout_phases},
               "train": {ph.where: ph.peak for ph in train_phases}}
    for ph in (ro_worst, tr_worst):
        ph.components = {k: v for k, v in ph.components.items() if v or k.startswith(("actor", "gradients", "optim"))}
    em = st.em
    kv_tokens = 0
    if em is not None:
        kv_tokens = int(max(kv_bytes, 0) // (2 * arch.num_hidden_layers * _kv_per_rank(arch, st.engine_tp) * st.B))
    notes = _notes(cfg, arch, st, ro_worst, tr_worst, per_gpu, runtime_notes, engine_pool, kv_tokens)
    layout = {"model": cfg.model.size if not cfg.model.ckpt else cfg.model.ckpt, "params_b": arch.num_params / 1e9,
              "dtype": cfg.model.dtype, "tp": p.tp, "pp": p.pp, "dp": st.dp, "gpus": p.tp * p.pp * st.dp,
              "sequence_parallel": "on" if st.sp else "off", "recompute": st.recompute_label,
              "attention": "fused (TE)" if st.fused else "unfused (local spec)", "placement": r.placement}
    assumptions = {"prompt_tokens": prompt_tokens, "response_tokens": r.max_new_tokens, "sequence_tokens": st.s,
                   "micro_batch_tokens": st.T, "micro_batches": st.num_mb,
                   "teacher_micro_batch_tokens": st.T_t if st.teacher_used else 0, "rollouts_per_rank": st.rollouts_rank,
                   "cuda_context_gb": CUDA_CONTEXT_GB, "nccl_communicator_gb": round(NCCL_COMM_BYTES / GB, 3)}
    if em is not None:
        assumptions.update(sglang_chunked_prefill_size=em.chunked_prefill_size,
                           sglang_cuda_graph_max_bs=em.cuda_graph_max_bs, requests_per_engine=em.requests,
                           sglang_memory_saver_cuda_graph=em.graphs_released)
    return MemoryPlan(source, layout, assumptions, ro_worst, tr_worst, cfg.cluster.gpu_memory_gb,
                      max(sum(x.values()) for x in st.stages), kv_tokens,
                      em is None or kv_bytes > 0, per_gpu, notes)


def check_fits(cfg, **kwargs) -> MemoryPlan:
    """`plan_memory`, raising a ValueError that names what to change when it does not fit."""
    plan = plan_memory(cfg, **kwargs)
    if plan.fits:
        return plan
    phase_name, phase = plan.worst
    top = sorted(phase.components.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{k} {v / GB:.1f} GB" for k, v in top)
    raise ValueError(
        f"memory plan: the {phase_name} phase needs {phase.peak / GB:.1f} GB per GPU (pipeline {phase.where}), over "
        f"cluster.gpu_memory_gb={plan.gpu_memory_gb:g}; largest parts: {parts}. To fit: "
        + "; ".join(suggestions(plan))
        + ". `megatron-trace plan --config C` prints the whole table; train.memory_check=false runs anyway")

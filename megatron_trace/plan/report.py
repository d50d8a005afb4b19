"""The plan's answer (`MemoryPlan`): its table, its JSON form and what to change when it does not fit."""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine import MEMORY_SAVER_CUDA_GRAPH_ENV
from .params import GB

EST = "(est.)"  # suffix of the lines that are estimates rather than byte counts


@dataclass
class Phase:
    """One phase's peak on one GPU: bytes per component, for the GPU where it peaks."""

    stage: int  # the pipeline stage this phase peaks on
    components: dict[str, float]  # bytes
    notes: dict[str, str] = field(default_factory=dict)
    gpu: str = ""  # which GPU of the stage (engine owner, other TP ranks)

    @property
    def peak(self) -> float:
        return sum(self.components.values())

    @property
    def where(self) -> str:
        return f"stage {self.stage}" + (f", {self.gpu}" if self.gpu else "")


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
    gpus: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> GPU of a replica -> peak bytes
    notes: dict[str, str] = field(default_factory=dict)  # about the whole plan
    # the train peak with and without the fused LM head (loss.fused_head), whatever the flag:
    # {"fused_head": the flag, "fused_train_peak_gb": ..., "unfused_train_peak_gb": ...}
    lm_head: dict = field(default_factory=dict)
    fleet: dict = field(default_factory=dict)  # a fleet in the job (cluster.rollout_nodes): one server GPU

    @property
    def peak_gb(self) -> float:
        return max(self.rollout.peak, self.train.peak) / GB

    @property
    def fits(self) -> bool:
        return self.engine_fits and self.peak_gb <= self.gpu_memory_gb and self.fleet.get("fits", True)

    @property
    def worst(self) -> tuple[str, Phase]:
        return ("train", self.train) if self.train.peak >= self.rollout.peak else ("rollout", self.rollout)

    def to_dict(self) -> dict:
        def phase(p: Phase) -> dict:
            return {"stage": p.stage, "gpu": p.gpu, "peak_gb": round(p.peak / GB, 2),
                    "components_gb": {k: round(v / GB, 3) for k, v in p.components.items()}, "notes": p.notes}

        return {"config": self.config, "layout": self.layout, "assumptions": self.assumptions,
                "gpu_memory_gb": self.gpu_memory_gb, "rollout": phase(self.rollout), "train": phase(self.train),
                "peak_gb": round(self.peak_gb, 2), "fits": self.fits, "params_per_gpu": self.params_per_gpu,
                "kv_cache_tokens": self.kv_cache_tokens,
                "gpus_peak_gb": {ph: {g: round(v / GB, 2) for g, v in d.items()} for ph, d in self.gpus.items()},
                "notes": self.notes, "suggestions": suggestions(self),
                "lm_head": {k: round(v, 2) if isinstance(v, float) else v for k, v in self.lm_head.items()},
                "fleet": self.fleet}

    def table(self) -> str:
        lay = self.layout
        names = _row_order(self.train.components, self.rollout.components)
        width = max(len(n) for n in names) + 2
        where = (f"both on {self.rollout.where}" if self.rollout.where == self.train.where
                 else f"rollout: {self.rollout.where}; train: {self.train.where}")
        head = f"{'component':<{width}}{'rollout GB':>12}{'train GB':>10}   ({where})"
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
        for k, v in self.notes.items():
            lines.append(f"  {k}: {v}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"GPU {self.gpu_memory_gb:g} GB (cluster.gpu_memory_gb): peak {self.peak_gb:.1f} GB, {verdict}")
        if not self.fits:
            lines += [f"  - {s}" for s in suggestions(self)]
        return "\n".join(lines) + "\n"


def _row_order(train: dict[str, float], rollout: dict[str, float]) -> list[str]:
    """The trainer's lines (train phase first), then the engine's (in rollout order), then the
    runtime's (CUDA contexts, NCCL)."""
    names = list(dict.fromkeys([*train, *rollout]))
    ro = {n: i for i, n in enumerate(rollout)}

    def group(n: str) -> int:
        return 2 if n.startswith(("CUDA contexts", "NCCL")) else 1 if n.startswith(("rollout engine", "engine ")) else 0

    return sorted(names, key=lambda n: (group(n), ro.get(n, 0) if group(n) else names.index(n)))


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _cell(v: float | None, width: int) -> str:
    if v is None:
        return f"{'-':>{width}}"
    return f"{v / GB:>{width}.{2 if 0 < v < 0.05 * GB else 1}f}"


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
    if phase_name == "train" and phase.components.get(f"engine CUDA graphs {EST}"):
        out.append(f"export {MEMORY_SAVER_CUDA_GRAPH_ENV}=1 where the trainer runs (the sleeping engine then "
                   f"releases its CUDA graphs)")
    if phase_name == "rollout" and "train.offload_during_rollout=true" not in " ".join(out):
        out.append("train.offload_during_rollout=true (optimizer state and gradients leave the GPU while it generates)")
    return list(dict.fromkeys(out))

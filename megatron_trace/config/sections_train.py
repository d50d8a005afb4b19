"""Config sections of the training side of a step: teacher, loss, KL schedule, optimizer, the
loop, SFT and checkpoints (see `schema.py` for the rules every section follows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..loss.routed import AGG_MODES, ROUTE_VARIANTS
from ..teacher.context import TEACHER_CONTEXTS
from .checks import check as _check
from .checks import one_of as _one_of

__all__ = ["CheckpointConfig", "LossSection", "OptimConfig", "SFTConfig", "ScheduleConfig", "TeacherConfig",
           "TrainConfig"]


@dataclass
class TeacherConfig:
    # snapshot (the paper's): a copy of the actor, re-synced every sync_every steps; live: the
    # actor itself (no extra memory; the teacher moves with every update)
    mode: str = "snapshot"
    sync_every: int = 10  # snapshot refresh period (steps)
    offload: bool = False  # snapshot only: keep the copy in CPU memory between teacher passes
    probe_tokens: int = 4  # off-span tokens per routed rollout for the leakage proxy (0 = off)
    # Teacher logits (V/tp wide) held at once, in positions: the update runs the teacher pass
    # right before each chunk of micro-batches whose routed + probe positions fit. 0 = a whole
    # mini-batch's at once.
    max_resident_tokens: int = 16384
    # What the privileged prompt shows (teacher/context.py): solution_and_type (the reference
    # solution and the annotator's coarse diagnostic type; the default, docs/concepts.md),
    # type_only (the type alone: the abstract's "only a coarse diagnostic type"; needs no
    # solutions in the data), answer_and_type (the gold answer and the type) or solution (no type).
    # The span text is never shown, and the annotator's inputs do not depend on this.
    context: str = "solution_and_type"
    # Qwen3 thinking mode of the teacher's prompt; null = the student's (data.thinking). The
    # paper's asymmetric ablation (student NoThink, teacher Think) is data.thinking=false with
    # teacher.thinking=true.
    thinking: bool | None = None

    def __post_init__(self) -> None:
        _one_of("teacher.mode", self.mode, {"live", "snapshot"})
        _one_of("teacher.context", self.context, set(TEACHER_CONTEXTS))
        _check(self.sync_every >= 1, "teacher.sync_every", self.sync_every, "an integer >= 1")
        _check(self.probe_tokens >= 0, "teacher.probe_tokens", self.probe_tokens, "an integer >= 0")
        _check(self.max_resident_tokens >= 0, "teacher.max_resident_tokens", self.max_resident_tokens,
               "an integer >= 0 (0 = a whole mini-batch)")


@dataclass
class LossSection:
    variant: str = "trace_fkl"  # the routing: which tokens get GRPO and which the KL (concepts page)
    eps_low: float = 0.2  # PPO clip below 1 (ratio >= 1 - eps_low)
    eps_high: float = 0.28  # PPO clip above 1, clip-higher (ratio <= 1 + eps_high)
    agg: str = "token-mean"  # how token losses are averaged over a batch
    max_response_len: int = 0  # only for agg=seq-mean-token-sum-norm; 0 = rollout.max_new_tokens
    entry_clip: float | None = 0.05  # per-vocabulary-entry clip of the KL (see entry_clip_mode); null = off
    # How entry_clip applies per vocabulary entry: upper (each KL term capped from above, the
    # OPSD-style clamp), abs (each term clamped to +-clip), grad (value unclipped, each entry of
    # the gradient clamped to +-clip), none (no clip)
    entry_clip_mode: str = "upper"
    temperature: float | None = None  # softmax temperature of every log-prob and KL; null = rollout.temperature
    routed_grpo: str | None = None  # GRPO weight on routed tokens: anneal (1 - lam/lambda0) | full | none; null = the variant's
    # Which spans are distilled (null = the variant's): fkl (key spans of correct rollouts), rkl
    # (error spans of incorrect ones) or both. With random_mask / inverted_mask it picks the
    # ablation's spans, e.g. loss.variant=random_mask loss.action=rkl for the 1.7B RKL ablation.
    action: str | None = None
    # random_mask / inverted_mask only: how many tokens they route. matched: as many as the
    # rollout's annotated span (a control at TRACE's own coverage); a fraction f in (0, 1]:
    # round(f |y|) tokens of every eligible rollout (the paper's localisation ablation uses 0.25).
    mask_coverage: Any = "matched"
    kl_ref_coef: float = 0.0  # must be 0: the trainer keeps no reference policy (the loss function accepts one)
    entropy_coef: float = 0.0  # entropy bonus on every trained token (0 = off)
    # Importance weights pi_old / pi_behaviour (the engine's per-token log-probs) on the GRPO and
    # KL terms, capped at tis_cap (null = off); tis_mode: truncate (min(rho, C)), mask (tokens
    # with rho outside [1/C, C] dropped) or sequence (the rollout's geometric mean, capped)
    tis_cap: float | None = None
    tis_mode: str = "truncate"  # how tis_cap applies: truncate | mask | sequence (see tis_cap)
    chunk_size: int | None = None  # tokens per chunk of the vocab-parallel softmax in backward; null = automatic
    # The LM head fused with the loss (loss/fused_head.py): every pass computes log-probs,
    # entropies and KLs from final hidden states and the vocab-sharded output weight, chunk by
    # chunk, so no [tokens, V/tp] logits exist. Off by default: on CPU it costs time (docs/performance.md).
    fused_head: bool = False
    head_chunk_tokens: int = 0  # tokens per fused-head chunk; 0 = from a 128 MiB target per chunk

    @property
    def coverage_fraction(self) -> float | None:
        """loss.mask_coverage as `build_routes` takes it: None for matched, else the fraction."""
        return None if self.mask_coverage == "matched" else float(self.mask_coverage)

    def __post_init__(self) -> None:
        _one_of("loss.variant", self.variant, set(ROUTE_VARIANTS))
        _one_of("loss.agg", self.agg, set(AGG_MODES))
        _check(0 <= self.eps_low < 1, "loss.eps_low", self.eps_low, "a float in [0, 1)")
        _check(self.eps_high >= 0, "loss.eps_high", self.eps_high, "a float >= 0")
        _check(self.entry_clip is None or self.entry_clip > 0, "loss.entry_clip", self.entry_clip, "null or a float > 0")
        _one_of("loss.entry_clip_mode", self.entry_clip_mode, {"upper", "abs", "grad", "none"})
        _check(self.temperature is None or self.temperature > 0, "loss.temperature", self.temperature,
               "null (= rollout.temperature) or a float > 0")
        _check(self.routed_grpo in (None, "anneal", "full", "none"), "loss.routed_grpo", self.routed_grpo,
               "null, anneal, full or none")
        _check(self.action in (None, "fkl", "rkl", "both"), "loss.action", self.action, "null, fkl, rkl or both")
        mc = self.mask_coverage
        _check(mc == "matched" or (isinstance(mc, (int, float)) and not isinstance(mc, bool) and 0 < mc <= 1),
               "loss.mask_coverage", mc, "matched or a fraction in (0, 1]")
        _check(mc == "matched" or self.variant in ("random_mask", "inverted_mask"), "loss.mask_coverage", mc,
               f"matched with loss.variant={self.variant} (a fraction applies to random_mask and inverted_mask)")
        _check(not (self.variant == "srpo_like" and self.action == "both"), "loss.action", self.action,
               "fkl or rkl with loss.variant=srpo_like (it distils incorrect rollouts only)")
        _check(self.kl_ref_coef == 0, "loss.kl_ref_coef", self.kl_ref_coef,
               "0: the trainer keeps no reference policy to take a KL to")
        _check(self.entropy_coef >= 0, "loss.entropy_coef", self.entropy_coef, "a float >= 0")
        _check(self.tis_cap is None or self.tis_cap > 0, "loss.tis_cap", self.tis_cap, "null or a float > 0")
        _one_of("loss.tis_mode", self.tis_mode, {"truncate", "mask", "sequence"})
        _check(isinstance(self.fused_head, bool), "loss.fused_head", self.fused_head, "true or false")
        _check(self.head_chunk_tokens >= 0, "loss.head_chunk_tokens", self.head_chunk_tokens,
               "an integer >= 0 (0 = automatic)")


@dataclass
class ScheduleConfig:
    # anneal: lambda0 for warmup_steps, then `decay` to 0 over decay_steps (TRACE); constant:
    # lambda0 at every step, warm-up and decay unused (the all-token SDPO/OPSD-family baselines)
    kind: str = "anneal"
    lambda0: float = 0.5  # the KL weight during the warm-up (and throughout when kind=constant)
    warmup_steps: int = 10  # steps at lambda0 before the decay
    decay_steps: int = 30  # steps over which lambda falls to 0
    decay: str = "linear"  # the shape of the decay

    def __post_init__(self) -> None:
        _one_of("schedule.kind", self.kind, {"anneal", "constant"})
        _check(self.lambda0 >= 0, "schedule.lambda0", self.lambda0, "a float >= 0")
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(self.decay_steps >= 0, "schedule.decay_steps", self.decay_steps, "an integer >= 0")
        _one_of("schedule.decay", self.decay, {"linear", "cosine", "exponential"})


@dataclass
class OptimConfig:
    optimizer: str = "adam"  # Megatron's optimizer
    lr: float = 1e-6  # peak learning rate
    min_lr: float = 0.0  # the learning rate at the end of a decay
    lr_warmup_steps: int = 0  # linear warm-up steps from 0 to lr
    lr_decay: str = "constant"  # constant | linear | cosine
    weight_decay: float = 0.0  # decoupled weight decay
    clip_grad: float = 1.0  # global gradient-norm clip (0 = off)
    mini_batches: int = 1  # PPO updates per rollout batch
    distributed_optimizer: bool = False  # shard optimizer state (fp32 masters, moments) over DP
    micro_batch_size: int = 4  # rollouts per micro-batch (when max_tokens_per_micro_batch = 0)
    # Token budget per micro-batch (padded rows count rows x longest, packed rows their tokens);
    # 0 = micro_batch_size whole rollouts. The teacher pass counts the privileged sequences.
    max_tokens_per_micro_batch: int = 0
    pack_sequences: bool = False  # several rollouts per row (block-diagonal attention on CPU, THD with TE)
    # Activation recompute of the actor (megatron_trace/plan/ estimates each): none | selective
    # (core attention: the [heads, s, s] scores are recomputed) | full (only layer inputs are kept;
    # recompute_method uniform: chunks of recompute_num_layers layers, block: the first
    # recompute_num_layers layers of each pipeline stage)
    recompute: str = "none"
    recompute_method: str = "uniform"  # full recompute only: uniform | block (see recompute)
    recompute_num_layers: int = 1  # full recompute only: layers per chunk (uniform) or per stage (block)

    def __post_init__(self) -> None:
        _one_of("optim.optimizer", self.optimizer, {"adam", "sgd"})
        _check(self.lr > 0, "optim.lr", self.lr, "a float > 0")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, f"a float in [0, optim.lr={self.lr}]")
        _check(self.lr_warmup_steps >= 0, "optim.lr_warmup_steps", self.lr_warmup_steps, "an integer >= 0")
        _one_of("optim.lr_decay", self.lr_decay, {"constant", "linear", "cosine"})
        _check(self.clip_grad >= 0, "optim.clip_grad", self.clip_grad, "a float >= 0 (0 = off)")
        _check(self.mini_batches >= 1, "optim.mini_batches", self.mini_batches, "an integer >= 1")
        _check(self.micro_batch_size >= 1, "optim.micro_batch_size", self.micro_batch_size, "an integer >= 1")
        _check(not self.distributed_optimizer or self.optimizer == "adam", "optim.distributed_optimizer",
               self.distributed_optimizer, "false with optim.optimizer=sgd (Megatron's distributed optimizer is Adam only)")
        _one_of("optim.recompute", self.recompute, {"none", "selective", "full"})
        _one_of("optim.recompute_method", self.recompute_method, {"uniform", "block"})
        _check(self.recompute_num_layers >= 1, "optim.recompute_num_layers", self.recompute_num_layers,
               "an integer >= 1")
        _check(self.max_tokens_per_micro_batch >= 0, "optim.max_tokens_per_micro_batch",
               self.max_tokens_per_micro_batch, "an integer >= 0 (0 = optim.micro_batch_size rollouts)")


@dataclass
class TrainConfig:
    steps: int = 50  # total RL steps
    dynamic_sampling: bool = False  # drop zero-variance groups; off for TRACE (all-correct groups carry FKL)
    dynamic_max_rounds: int = 4  # rollout rounds per step when refilling dropped groups
    mode: str = "full"  # full | rollout_only | train_only (debug modes, docs/training.md)
    save_records: bool = False  # write each step's stage records to <run.dir>/records/
    records_dir: str | None = None  # train_only: the records to train on
    # Key-token lift: the change of the actor's log-prob, across the step's updates, at the key
    # spans of this many correct rollouts, picked across prompts (of the token the teacher supports
    # most beyond the actor, argmax p_teacher - p_actor; of the teacher's top-1; of the sampled
    # token); 0 = off. Measured at every step while lambda > 0, and every key_token_lift_every
    # steps otherwise (0 = never). It needs key spans: where the loss does not annotate (GRPO,
    # all-token variants, lambda = 0) they come from the annotator only with lift_annotate,
    # which annotates 2 x key_token_lift correct rollouts of those steps.
    key_token_lift: int = 4
    key_token_lift_every: int = 10  # once lambda = 0, measure the lift every N steps (0 = never)
    lift_annotate: bool = False  # annotate correct rollouts for the lift alone where the loss does not
    # Colocated rollout: move the optimizer state to host memory and free the gradient buffers
    # while the engine generates; both come back before the train step.
    offload_during_rollout: bool = False
    # CUDA runs: refuse a config that `megatron-trace plan` puts over cluster.gpu_memory_gb
    memory_check: bool = True

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", self.steps, "an integer >= 1")
        _check(self.dynamic_max_rounds >= 1, "train.dynamic_max_rounds", self.dynamic_max_rounds, "an integer >= 1")
        _one_of("train.mode", self.mode, {"full", "rollout_only", "train_only"})
        _check(self.key_token_lift >= 0, "train.key_token_lift", self.key_token_lift, "an integer >= 0 (0 = off)")
        _check(self.key_token_lift_every >= 0, "train.key_token_lift_every", self.key_token_lift_every,
               "an integer >= 0 (0 = only while lambda > 0)")
        _check(self.mode != "train_only" or bool(self.records_dir), "train.records_dir", self.records_dir,
               "a directory of saved records when train.mode=train_only")


@dataclass
class SFTConfig:
    steps: int = 300  # optimizer steps of cross-entropy on reference solutions
    batch_size: int = 32  # sequences per step
    lr: float = 1.0e-3  # SFT peak learning rate
    min_lr: float = 1.0e-4  # SFT learning rate at the end of its cosine decay
    warmup_steps: int = 20  # SFT linear warm-up steps
    privileged_frac: float = 0.3  # share of examples in the teacher (privileged-context) format
    heldout: int = 200  # held-out problems scored (greedy) at the end
    export_hf: bool = True  # write <run.dir>/hf (config.json, safetensors, tokenizer)

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "sft.steps", self.steps, "an integer >= 1")
        _check(self.batch_size >= 1, "sft.batch_size", self.batch_size, "an integer >= 1")
        _check(self.lr > 0, "sft.lr", self.lr, "a float > 0")
        _check(0 <= self.min_lr <= self.lr, "sft.min_lr", self.min_lr, f"a float in [0, sft.lr={self.lr}]")
        _check(self.warmup_steps >= 0, "sft.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(0 <= self.privileged_frac <= 1, "sft.privileged_frac", self.privileged_frac, "a float in [0, 1]")
        _check(self.heldout >= 0, "sft.heldout", self.heldout, "an integer >= 0")


@dataclass
class CheckpointConfig:
    every: int = 10  # steps between checkpoints
    keep_last: int = 3  # periodic checkpoints kept (older ones deleted; best and latest stay)
    # Keep the best checkpoint on the in-loop evaluation outside the keep_last rotation: an eval
    # that improves `best_metric` (strictly; NaN never) saves that step's checkpoint if the cadence
    # does not, and `checkpoints/best` (+ best.json) names it. Needs eval.every > 0.
    keep_best: bool = False
    # The flat in-loop eval metric to maximise: eval/average or eval/<benchmark>/avg@k (or
    # .../ci95_low). null = eval/val/avg@k when eval.in_loop_source is set, else eval/average.
    best_metric: str | None = None

    def __post_init__(self) -> None:
        _check(self.every >= 1, "checkpoint.every", self.every, "an integer >= 1")
        _check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "an integer >= 1")

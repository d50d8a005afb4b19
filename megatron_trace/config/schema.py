"""The typed configuration schema. Values live in YAML (`configs/`); this file holds types,
defaults (from the paper where it gives them) and the cross-field rules.

Every section validates itself in `__post_init__` and names the key to change. Loading goes
through `OmegaConf.structured`, so unknown keys and wrong types fail at load time too
(see `config.load`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..loss.routed import AGG_MODES, ROUTE_VARIANTS
from ..models.qwen3 import QWEN3_SIZES

__all__ = [
    "AnnotateConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "LogConfig",
    "LossSection",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RemoteRolloutSection",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "ScheduleConfig",
    "TeacherConfig",
    "TrainConfig",
]


def _check(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ValueError(f"config key '{key}': value {value!r} is not allowed; expected {allowed}")


def _one_of(key: str, value, choices) -> None:
    _check(value in choices, key, value, f"one of {sorted(choices)}")


@dataclass
class RunConfig:
    dir: str = "runs/trace"  # the run directory; rerunning into it resumes
    name: str = "trace"


@dataclass
class ModelConfig:
    size: str = "tiny"  # a QWEN3_SIZES key, used when hf_dir and ckpt are unset
    hf_dir: str | None = None  # start from an HF directory
    ckpt: str | None = None  # or from a megatron-trace checkpoint
    dtype: str = "float32"  # float32 | bfloat16
    use_te: bool | None = None  # None: TE spec when TE and CUDA are available

    def __post_init__(self) -> None:
        _one_of("model.size", self.size.lower(), set(QWEN3_SIZES))
        _one_of("model.dtype", self.dtype, {"float32", "bfloat16"})


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # Data-parallel replicas. null: WORLD_SIZE / (tp * pp) under torchrun, 1 when the CLI spawns
    # its own gloo ranks on CPU (there it spawns tp * pp * dp ranks).
    dp: int | None = None
    device: str = "auto"  # auto | cpu | cuda
    # Megatron sequence parallelism: norms, dropout and layer inputs sharded along the sequence
    # over the TP group (activation memory / tp). Only takes effect when tp > 1.
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        _check(self.tp >= 1, "parallel.tp", self.tp, "an integer >= 1")
        _check(self.pp >= 1, "parallel.pp", self.pp, "an integer >= 1")
        _check(self.dp is None or self.dp >= 1, "parallel.dp", self.dp, "null or an integer >= 1")
        _one_of("parallel.device", self.device, {"auto", "cpu", "cuda"})


@dataclass
class ArithTaskConfig:
    num_ops: int = 3
    digits: int = 2
    num_train: int = 2000
    ops: str = "+-*"  # operators to draw from

    def __post_init__(self) -> None:
        _check(bool(self.ops) and not set(self.ops) - set("+-*"), "data.arith.ops", self.ops,
               "a non-empty subset of '+-*'")
        _check(self.num_ops >= 1, "data.arith.num_ops", self.num_ops, "an integer >= 1")
        _check(self.digits >= 1, "data.arith.digits", self.digits, "an integer >= 1")


@dataclass
class DataConfig:
    source: str = "arith"  # arith | a .jsonl/.parquet path | a hub dataset name
    max_problems: int | None = None
    shuffle: bool = True
    arith: ArithTaskConfig = field(default_factory=ArithTaskConfig)
    # Qwen3 thinking mode for the policy and teacher prompts (the paper's; `enable_thinking` of the
    # chat template). Chat templates without that switch ignore it, and the synthetic task's
    # prompts (data.source=arith) use no chat template at all.
    thinking: bool = True
    # A teacher-using loss.variant (with schedule.lambda0 > 0) needs reference solutions in the
    # data (`solution`; tools/prepare_data.py makes them); `megatron-trace train` refuses data
    # without any (config.load.check_teacher_data). true: train anyway, and give the teacher the
    # gold answer where a row has no solution.
    answer_only_teacher: bool = False

    def __post_init__(self) -> None:
        _check(self.max_problems is None or self.max_problems >= 1, "data.max_problems", self.max_problems,
               "null or an integer >= 1")


@dataclass
class RemoteRolloutSection:
    """rollout.placement=remote: SGLang servers that the trainer only sends requests to."""

    urls: list[str] = field(default_factory=list)  # http://host:port of each `sglang.launch_server`
    router_url: str | None = None  # or one sglang-router in front of them (then urls are optional)
    weight_sync: str = "distributed"  # distributed (NCCL/gloo broadcast from rank 0) | none
    master_address: str | None = None  # rank 0's address as the servers reach it (default: its hostname)
    master_port: int = 0  # 0 = a free port
    backend: str = "auto"  # nccl | gloo | auto (nccl on CUDA)
    health_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for i, u in enumerate(self.urls):
            _check(u.startswith(("http://", "https://")), f"rollout.remote.urls[{i}]", u, "an http(s):// URL")
        _check(self.router_url is None or self.router_url.startswith(("http://", "https://")),
               "rollout.remote.router_url", self.router_url, "null or an http(s):// URL")
        _one_of("rollout.remote.weight_sync", self.weight_sync, {"distributed", "none"})
        _one_of("rollout.remote.backend", self.backend, {"auto", "nccl", "gloo"})
        _check(0 <= self.master_port < 65536, "rollout.remote.master_port", self.master_port, "0 or a TCP port")


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | sglang
    # colocated: one engine per DP replica on that replica's GPUs (its first TP group);
    # remote: SGLang servers (rollout.remote.*), the trainer ranks do not generate;
    # rank0: one engine on global rank 0 (debugging)
    placement: str = "colocated"
    mem_fraction_static: float = 0.5  # colocated SGLang: share of each GPU for its weights + KV cache
    max_retries: int = 2  # a failed request is retried on another engine this many times, then counted
    request_timeout_s: float = 1800.0  # one generate request (remote); a slower one counts as failed
    chunk_prompts: int = 0  # remote: prompts per request (0 = split evenly over the live servers)
    # hf engine: prompts per forward batch. 1 = a prompt's samples are bit-identical on any number
    # of engines; more is faster on CPU (tokens still identical, log-probs to ~1e-6)
    hf_batch_prompts: int = 1
    verify_sync: bool = False  # after every weight sync, probe every engine against the actor (raises on a gap)
    remote: RemoteRolloutSection = field(default_factory=RemoteRolloutSection)
    prompts_per_step: int = 8
    n: int = 8  # samples per prompt (GRPO group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        _one_of("rollout.engine", self.engine, {"hf", "sglang"})
        _one_of("rollout.placement", self.placement, {"colocated", "remote", "rank0"})
        _check(0 < self.mem_fraction_static < 1, "rollout.mem_fraction_static", self.mem_fraction_static,
               "a float in (0, 1)")
        _check(self.max_retries >= 0, "rollout.max_retries", self.max_retries, "an integer >= 0")
        _check(self.request_timeout_s > 0, "rollout.request_timeout_s", self.request_timeout_s, "a float > 0")
        _check(self.chunk_prompts >= 0, "rollout.chunk_prompts", self.chunk_prompts, "an integer >= 0")
        _check(self.hf_batch_prompts >= 1, "rollout.hf_batch_prompts", self.hf_batch_prompts, "an integer >= 1")
        _check(self.placement != "remote" or bool(self.remote.urls or self.remote.router_url),
               "rollout.remote.urls", list(self.remote.urls),
               "at least one server URL (or rollout.remote.router_url) when rollout.placement=remote")
        _check(self.prompts_per_step >= 1, "rollout.prompts_per_step", self.prompts_per_step, "an integer >= 1")
        _check(self.n >= 2, "rollout.n", self.n, "an integer >= 2 (GRPO needs a group)")
        _check(self.temperature > 0, "rollout.temperature", self.temperature, "a float > 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "a float in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "rollout.top_k", self.top_k, "-1 (off) or an integer >= 1")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "an integer >= 1")


@dataclass
class RewardConfig:
    timeout_s: float = 5.0
    workers: int = 2
    advantage_std: bool = True  # False: Dr. GRPO (no std normalisation)

    def __post_init__(self) -> None:
        _check(self.timeout_s > 0, "reward.timeout_s", self.timeout_s, "a float > 0")
        _check(self.workers >= 1, "reward.workers", self.workers, "an integer >= 1")


@dataclass
class ApiAnnotatorSection:
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable; keys never go in configs
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 3


@dataclass
class AnnotateConfig:
    kind: str = "oracle"  # oracle | api | self
    coverage_cap: float = 0.25
    segment_mode: str = "line"
    max_segment_chars: int = 300
    cache_dir: str | None = None  # default: <run.dir>/annotator_cache
    api: ApiAnnotatorSection = field(default_factory=ApiAnnotatorSection)

    def __post_init__(self) -> None:
        _one_of("annotate.kind", self.kind, {"oracle", "api", "self"})
        _check(0 < self.coverage_cap <= 1, "annotate.coverage_cap", self.coverage_cap, "a float in (0, 1]")
        _one_of("annotate.segment_mode", self.segment_mode, {"line", "paragraph"})
        _check(self.max_segment_chars >= 1, "annotate.max_segment_chars", self.max_segment_chars, "an integer >= 1")


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

    def __post_init__(self) -> None:
        _one_of("teacher.mode", self.mode, {"live", "snapshot"})
        _check(self.sync_every >= 1, "teacher.sync_every", self.sync_every, "an integer >= 1")
        _check(self.probe_tokens >= 0, "teacher.probe_tokens", self.probe_tokens, "an integer >= 0")
        _check(self.max_resident_tokens >= 0, "teacher.max_resident_tokens", self.max_resident_tokens,
               "an integer >= 0 (0 = a whole mini-batch)")


@dataclass
class LossSection:
    variant: str = "trace_fkl"
    eps_low: float = 0.2
    eps_high: float = 0.28
    agg: str = "token-mean"
    max_response_len: int = 0  # only for agg=seq-mean-token-sum-norm; 0 = rollout.max_new_tokens
    entry_clip: float | None = 0.05
    # How entry_clip applies per vocabulary entry: upper (each KL term capped from above, the
    # OPSD-style clamp), abs (each term clamped to +-clip), grad (value unclipped, each entry of
    # the gradient clamped to +-clip), none (no clip)
    entry_clip_mode: str = "upper"
    temperature: float | None = None  # softmax temperature of every log-prob and KL; null = rollout.temperature
    routed_grpo: str | None = None
    # Which spans are distilled (null = the variant's): fkl (key spans of correct rollouts), rkl
    # (error spans of incorrect ones) or both. With random_mask / inverted_mask it picks the
    # ablation's spans, e.g. loss.variant=random_mask loss.action=rkl for the 1.7B RKL ablation.
    action: str | None = None
    kl_ref_coef: float = 0.0
    entropy_coef: float = 0.0
    tis_cap: float | None = None  # truncated importance sampling on the GRPO term; null = off
    chunk_size: int | None = None

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
        _check(self.kl_ref_coef >= 0, "loss.kl_ref_coef", self.kl_ref_coef, "a float >= 0")
        _check(self.entropy_coef >= 0, "loss.entropy_coef", self.entropy_coef, "a float >= 0")
        _check(self.tis_cap is None or self.tis_cap > 0, "loss.tis_cap", self.tis_cap, "null or a float > 0")


@dataclass
class ScheduleConfig:
    # anneal: lambda0 for warmup_steps, then `decay` to 0 over decay_steps (TRACE); constant:
    # lambda0 at every step, warm-up and decay unused (the all-token SDPO/OPSD-family baselines)
    kind: str = "anneal"
    lambda0: float = 0.5
    warmup_steps: int = 10
    decay_steps: int = 30
    decay: str = "linear"

    def __post_init__(self) -> None:
        _one_of("schedule.kind", self.kind, {"anneal", "constant"})
        _check(self.lambda0 >= 0, "schedule.lambda0", self.lambda0, "a float >= 0")
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(self.decay_steps >= 0, "schedule.decay_steps", self.decay_steps, "an integer >= 0")
        _one_of("schedule.decay", self.decay, {"linear", "cosine", "exponential"})


@dataclass
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay: str = "constant"  # constant | linear | cosine
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    mini_batches: int = 1  # PPO updates per rollout batch
    distributed_optimizer: bool = False  # shard optimizer state (fp32 masters, moments) over DP
    micro_batch_size: int = 4  # rollouts per micro-batch (when max_tokens_per_micro_batch = 0)
    # Token budget per micro-batch (padded rows count rows x longest, packed rows their tokens);
    # 0 = micro_batch_size whole rollouts. The teacher pass counts the privileged sequences.
    max_tokens_per_micro_batch: int = 0
    pack_sequences: bool = False  # several rollouts per row (block-diagonal attention on CPU, THD with TE)
    # Activation recompute of the actor (megatron_trace/plan.py estimates each): none | selective
    # (core attention: the [heads, s, s] scores are recomputed) | full (only layer inputs are kept;
    # recompute_method uniform: chunks of recompute_num_layers layers, block: the first
    # recompute_num_layers layers of each pipeline stage)
    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1

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
    mode: str = "full"  # full | rollout_only | train_only (debug modes, see README)
    save_records: bool = False  # write each step's stage records to <run.dir>/records/
    records_dir: str | None = None  # train_only: the records to train on
    # Key-token lift: the change of the actor's log-prob, across the step's updates, at the key
    # spans of this many correct rollouts (of the teacher's top-1 token there and of the sampled
    # token); 0 = off. Measured at every step while lambda > 0, and every key_token_lift_every
    # steps otherwise (0 = never). It needs key spans: where the loss does not annotate (GRPO,
    # all-token variants, lambda = 0) they come from the annotator only with lift_annotate,
    # which annotates 2 x key_token_lift correct rollouts of those steps.
    key_token_lift: int = 4
    key_token_lift_every: int = 10
    lift_annotate: bool = False
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
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4
    warmup_steps: int = 20
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
    keep_last: int = 3

    def __post_init__(self) -> None:
        _check(self.every >= 1, "checkpoint.every", self.every, "an integer >= 1")
        _check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "an integer >= 1")


@dataclass
class EvalConfig:
    every: int = 0  # in-loop evaluation every N steps; 0 = off
    benchmarks: list[str] = field(default_factory=lambda: ["math500", "aime24", "aime25", "amc23", "gpqa_diamond"])
    k: int = 8  # samples per problem (avg@k)
    temperature: float = 0.6  # the paper's decoding
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 32768
    thinking: bool = True  # Qwen3 thinking mode
    limit: int | None = None  # first N problems per benchmark (in-loop subsets); null = all
    arith_n: int = 200  # size of the synthetic held-out set
    bootstrap_samples: int = 2000
    batch_prompts: int = 16
    gpqa_csv: str | None = None  # the official GPQA-Diamond CSV (never bundled), or env MT_GPQA_CSV
    # A .jsonl/.parquet of problem/answer rows (the validation split of tools/prepare_data.py) that
    # the in-loop evaluation runs as the benchmark "val" instead of eval.benchmarks (first
    # eval.limit problems); `megatron-trace eval` keeps eval.benchmarks, where "val" may then be
    # listed to reproduce the in-loop numbers. null = the in-loop evaluation uses the benchmarks.
    in_loop_source: str | None = None

    def __post_init__(self) -> None:
        from ..data.problems import BENCHMARKS

        _check(self.every >= 0, "eval.every", self.every, "an integer >= 0 (0 = off)")
        _check(self.k >= 1, "eval.k", self.k, "an integer >= 1")
        _check(self.temperature >= 0, "eval.temperature", self.temperature, "a float >= 0 (0 = greedy)")
        _check(0 < self.top_p <= 1, "eval.top_p", self.top_p, "a float in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "eval.top_k", self.top_k, "-1 (off) or an integer >= 1")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(self.limit is None or self.limit >= 1, "eval.limit", self.limit, "null or an integer >= 1")
        _check(self.arith_n >= 1, "eval.arith_n", self.arith_n, "an integer >= 1")
        _check(self.bootstrap_samples >= 100, "eval.bootstrap_samples", self.bootstrap_samples, "an integer >= 100")
        _check(self.batch_prompts >= 1, "eval.batch_prompts", self.batch_prompts, "an integer >= 1")
        _check(len(self.benchmarks) > 0, "eval.benchmarks", self.benchmarks, "a non-empty list")
        for i, b in enumerate(self.benchmarks):  # "val": the in-loop split, for `megatron-trace eval` too
            _one_of(f"eval.benchmarks[{i}]", b, set(BENCHMARKS) | ({"val"} if self.in_loop_source else set()))


@dataclass
class ClusterConfig:
    """Job shape and site profile for the Slurm launchers (launch/slurm.py, launch/sweep.py);
    TP x PP must divide nodes x gpus_per_node. The launchers' flags override these keys."""

    nodes: int = 1
    # 0 = a CPU partition: no GPU request (no gres line); the job runs `megatron-trace train`,
    # which spawns tp x pp x dp gloo ranks on the one node, one core each
    gpus_per_node: int = 8
    # CPU jobs: the cores asked for, one rank each (dp = cpus / (tp x pp)); null = tp x pp x
    # (parallel.dp or 1). Ignored by GPU jobs.
    cpus_per_node: int | None = None
    time: str = "04:00:00"
    gpu_memory_gb: float = 80.0  # per GPU; `megatron-trace plan` and CUDA runs check the estimate against it
    account: str | None = None  # null: no --account line (clusters without accounts)
    partition: str | None = None
    # pyxis/enroot image the job runs in; null = no container (then `venv` / `setup` set up the job)
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)  # SRC:DST, with a container only
    # No container: the environment the job activates, a venv folder or its bin/activate; null =
    # the launcher's own interpreter's venv (the project's .venv when it exists)
    venv: str | None = None
    setup: list[str] = field(default_factory=list)  # shell lines run before the task (`module load ...`)
    exclusive: bool = False  # #SBATCH --exclusive
    sbatch: list[str] = field(default_factory=list)  # extra #SBATCH flags, e.g. "--qos=high", "--constraint=h100"

    def __post_init__(self) -> None:
        _check(self.nodes >= 1, "cluster.nodes", self.nodes, "an integer >= 1")
        _check(self.gpus_per_node >= 0, "cluster.gpus_per_node", self.gpus_per_node,
               "an integer >= 0 (0 = a CPU partition)")
        _check(self.cpus_per_node is None or self.cpus_per_node >= 1, "cluster.cpus_per_node", self.cpus_per_node,
               "null or an integer >= 1")
        _check(self.gpu_memory_gb > 0, "cluster.gpu_memory_gb", self.gpu_memory_gb, "a float > 0")
        for flag in self.sbatch:
            _check(flag.startswith("--"), "cluster.sbatch", flag, "sbatch flags such as '--qos=high'")


@dataclass
class LogConfig:
    tensorboard: bool = True
    wandb: bool = False  # needs `pip install wandb`; fails at setup if missing
    wandb_project: str = "megatron-trace"
    wandb_entity: str | None = None
    progress: bool = True


@dataclass
class Config:
    seed: int = 1234
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossSection = field(default_factory=LossSection)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if self.loss.agg == "seq-mean-token-sum-norm" and self.loss.max_response_len == 0:
            self.loss.max_response_len = self.rollout.max_new_tokens
        if self.annotate.kind == "self" and self.rollout.engine == "sglang" and self.parallel.device == "cpu":
            raise ValueError("config keys 'rollout.engine'=sglang and 'parallel.device'=cpu do not go together: "
                             "SGLang needs CUDA")
        if self.rollout.engine == "sglang" and not self.model.hf_dir:
            raise ValueError("config key 'rollout.engine': value 'sglang' needs model.hf_dir (the engine loads "
                             "the HF directory; convert a checkpoint with tools/convert_megatron_to_hf.py)")
        world = self.cluster.nodes * self.cluster.gpus_per_node
        if self.parallel.device == "cuda" and world % (self.parallel.tp * self.parallel.pp):
            raise ValueError(f"config keys 'parallel.tp'={self.parallel.tp} x 'parallel.pp'={self.parallel.pp} must "
                             f"divide cluster.nodes x cluster.gpus_per_node = {world}")
        p = self.parallel
        if p.dp is not None and self.parallel.device == "cuda" and p.tp * p.pp * p.dp != world:
            raise ValueError(f"config key 'parallel.dp'={p.dp}: tp*pp*dp = {p.tp * p.pp * p.dp} ranks, but the "
                             f"cluster section gives {world} GPUs; set parallel.dp=null to derive it")
        if self.model.hf_dir and self.model.ckpt:
            raise ValueError("config keys 'model.hf_dir' and 'model.ckpt' are exclusive: set one of them")

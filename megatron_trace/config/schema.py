"""The typed configuration schema. Values live in YAML (`configs/`); this file holds the root
`Config`, the sections of the run itself (run, model, parallel layout, data, cluster, logging)
and the cross-field rules; `sections_rollout.py` and `sections_train.py` hold the others. Types
and defaults come from the paper where it gives them.

Every section validates itself in `__post_init__` and names the key to change. Loading goes
through `OmegaConf.structured`, so unknown keys and wrong types fail at load time too
(see `config.load`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..loss.routed import ROUTE_VARIANTS
from ..models.qwen3 import QWEN3_SIZES
from ..tasks import TASKS
from .checks import check as _check
from .checks import one_of as _one_of
from .sections_rollout import (
    AnnotateConfig,
    ApiAnnotatorSection,
    AsyncRolloutSection,
    EvalConfig,
    RemoteRolloutSection,
    RewardConfig,
    RolloutConfig,
)
from .sections_train import (
    CheckpointConfig,
    LossSection,
    OptimConfig,
    ScheduleConfig,
    SFTConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "AnnotateConfig",
    "ApiAnnotatorSection",
    "AsyncRolloutSection",
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


@dataclass
class RunConfig:
    dir: str = "runs/trace"  # the run directory; rerunning into it resumes
    name: str = "trace"  # the run's name in logs, W&B and Slurm job names


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
    tp: int = 1  # tensor-parallel size (Megatron TP; the colocated SGLang engine's tp_size too)
    pp: int = 1  # pipeline-parallel size
    # Data-parallel replicas. null: WORLD_SIZE / (tp * pp) under torchrun, 1 when the CLI spawns
    # its own gloo ranks on CPU (there it spawns tp * pp * dp ranks).
    dp: int | None = None
    device: str = "auto"  # auto | cpu | cuda
    # Megatron sequence parallelism: norms, dropout and layer inputs sharded along the sequence
    # over the TP group (activation memory / tp). Only takes effect when tp > 1.
    sequence_parallel: bool = False
    # How long a rank waits for the others over the gloo groups that carry rollouts, records and
    # metrics (parallel/host.py): while engines generate, rank 0 annotates, or the in-loop
    # evaluation runs. Longer than the slowest of those; NCCL groups keep Megatron's 30 minutes.
    wait_timeout_minutes: float = 360.0

    def __post_init__(self) -> None:
        _check(self.tp >= 1, "parallel.tp", self.tp, "an integer >= 1")
        _check(self.pp >= 1, "parallel.pp", self.pp, "an integer >= 1")
        _check(self.dp is None or self.dp >= 1, "parallel.dp", self.dp, "null or an integer >= 1")
        _one_of("parallel.device", self.device, {"auto", "cpu", "cuda"})
        _check(self.wait_timeout_minutes > 0, "parallel.wait_timeout_minutes", self.wait_timeout_minutes, "a float > 0")


@dataclass
class ArithTaskConfig:
    num_ops: int = 3  # operations per problem (product_chain: the chain's length)
    digits: int = 2  # digits of each operand
    num_train: int = 2000  # training problems generated
    ops: str = "+-*"  # operators to draw from

    def __post_init__(self) -> None:
        _check(bool(self.ops) and not set(self.ops) - set("+-*"), "data.arith.ops", self.ops,
               "a non-empty subset of '+-*'")
        _check(self.num_ops >= 1, "data.arith.num_ops", self.num_ops, "an integer >= 1")
        _check(self.digits >= 1, "data.arith.digits", self.digits, "an integer >= 1")


@dataclass
class DataConfig:
    source: str = "arith"  # arith (an embedded synthetic task, see data.task) | a .jsonl/.parquet path | a hub name
    # The embedded task when data.source=arith: arith (short arithmetic) | product_chain (a long
    # chain of easy steps around one decisive multiplication; data.arith.num_ops is its length).
    task: str = "arith"
    max_problems: int | None = None  # use the first N training problems; null = all
    shuffle: bool = True  # shuffle the training problems once, seeded by `seed`
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
        _one_of("data.task", self.task, set(TASKS))
        _check(self.task == "arith" or self.source == "arith", "data.task", self.task,
               f"'arith' unless data.source=arith (an embedded task needs the synthetic source, got {self.source!r})")
        _check(self.task != "product_chain" or self.arith.num_ops >= 2, "data.arith.num_ops", self.arith.num_ops,
               "an integer >= 2 for data.task=product_chain (the product and at least one easy step)")


@dataclass
class ClusterConfig:
    """Job shape and site profile for the Slurm launchers (launch/slurm.py, launch/sweep.py);
    TP x PP must divide nodes x gpus_per_node. The launchers' flags override these keys."""

    nodes: int = 1  # nodes of the job
    # 0 = a CPU partition: no GPU request (no gres line); the job runs `megatron-trace train`,
    # which spawns tp x pp x dp gloo ranks on the one node, one core each
    gpus_per_node: int = 8
    # CPU jobs: the cores asked for, one rank each (dp = cpus / (tp x pp)); null = tp x pp x
    # (parallel.dp or 1). Ignored by GPU jobs.
    cpus_per_node: int | None = None
    time: str = "04:00:00"  # the job's wall-clock limit (sbatch --time)
    gpu_memory_gb: float = 80.0  # per GPU; `megatron-trace plan` and CUDA runs check the estimate against it
    account: str | None = None  # null: no --account line (clusters without accounts)
    partition: str | None = None  # Slurm partition; null = the cluster's default
    # pyxis/enroot image the job runs in; null = no container (then `venv` / `setup` set up the job)
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)  # SRC:DST, with a container only
    # No container: the environment the job activates, a venv folder or its bin/activate; null =
    # the launcher's own interpreter's venv (the project's .venv when it exists)
    venv: str | None = None
    setup: list[str] = field(default_factory=list)  # shell lines run before the task (`module load ...`)
    exclusive: bool = False  # #SBATCH --exclusive
    sbatch: list[str] = field(default_factory=list)  # extra #SBATCH flags, e.g. "--qos=high", "--constraint=h100"
    # A rollout fleet inside the job (`launch/slurm.py --rollout-nodes K`, `megatron_trace/fleet/`):
    # the first K nodes run one server per rollout.server_tp GPUs (and sglang-router on the first
    # when there are several), the others train with rollout.placement=remote. A CPU job runs K
    # servers on its one node, next to the trainer. 0 = no fleet.
    rollout_nodes: int = 0
    # One server's command. Placeholders: {model} (model.hf_dir), {host}, {port}, {tp}
    # (rollout.server_tp), {gpu} (its first GPU on the node), {mem} (cluster.rollout_mem_fraction),
    # {api_key_env} (the NAME of the
    # variable with the job's key). The default wraps sglang.launch_server so the key never
    # appears on a command line; a CPU test starts tests/sglang_fixture_server.py instead.
    rollout_server_cmd: str = ("python -m megatron_trace.fleet.serve server --api-key-env {api_key_env} -- "
                               "--model-path {model} --host {host} --port {port} --tp-size {tp} "
                               "--base-gpu-id {gpu} --mem-fraction-static {mem} --skip-server-warmup")
    # The router's command ({workers}: the servers' URLs, space-separated; {host}, {port},
    # {api_key_env} as above).
    rollout_router_cmd: str = ("python -m megatron_trace.fleet.serve router --api-key-env {api_key_env} -- "
                               "--worker-urls {workers} --host {host} --port {port} --policy cache_aware")
    rollout_mem_fraction: float = 0.85  # {mem}: a fleet server's mem_fraction_static (its GPU is its own)
    rollout_port: int = 30000  # the router's port; server j of a node listens on rollout_port + 1 + j
    rollout_start_timeout_s: float = 1800.0  # how long the trainer waits for every server's /health

    def __post_init__(self) -> None:
        _check(self.nodes >= 1, "cluster.nodes", self.nodes, "an integer >= 1")
        _check(self.gpus_per_node >= 0, "cluster.gpus_per_node", self.gpus_per_node,
               "an integer >= 0 (0 = a CPU partition)")
        _check(self.cpus_per_node is None or self.cpus_per_node >= 1, "cluster.cpus_per_node", self.cpus_per_node,
               "null or an integer >= 1")
        _check(self.gpu_memory_gb > 0, "cluster.gpu_memory_gb", self.gpu_memory_gb, "a float > 0")
        for flag in self.sbatch:
            _check(flag.startswith("--"), "cluster.sbatch", flag, "sbatch flags such as '--qos=high'")
        _check(self.rollout_nodes >= 0, "cluster.rollout_nodes", self.rollout_nodes, "an integer >= 0")
        _check(0 < self.rollout_port < 65000, "cluster.rollout_port", self.rollout_port, "a TCP port below 65000")
        _check(0 < self.rollout_mem_fraction < 1, "cluster.rollout_mem_fraction", self.rollout_mem_fraction,
               "a float in (0, 1)")
        _check(self.rollout_start_timeout_s > 0, "cluster.rollout_start_timeout_s", self.rollout_start_timeout_s,
               "a float > 0")
        for key in ("rollout_server_cmd", "rollout_router_cmd"):
            cmd = getattr(self, key)
            try:
                cmd.format(model="m", host="h", port=1, tp=1, gpu=0, mem=0.5, api_key_env="K", workers="w")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"config key 'cluster.{key}': value {cmd!r} is not allowed; expected a command "
                                 f"whose placeholders are among {{model}} {{host}} {{port}} {{tp}} {{gpu}} {{mem}} "
                                 f"{{api_key_env}} {{workers}} ({type(exc).__name__}: {exc})") from None


@dataclass
class LogConfig:
    tensorboard: bool = True  # write TensorBoard events to <run.dir>/tb (extra `tensorboard`)
    wandb: bool = False  # needs `pip install wandb`; fails at setup if missing
    wandb_project: str = "megatron-trace"  # W&B project (log.wandb)
    wandb_entity: str | None = None  # W&B entity; null = your default
    progress: bool = True  # rank 0's progress bar on the console


@dataclass
class Config:
    seed: int = 1234  # the run's seed: prompts, sampling (per prompt), initialisation, annotation order
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
        if self.rollout.async_.max_age > 0 and self.train.mode != "full":
            raise ValueError(f"config key 'rollout.async.max_age'={self.rollout.async_.max_age} needs train.mode=full "
                             f"(got {self.train.mode!r}): the debug modes run one side alone")
        c, r = self.cluster, self.rollout
        if c.rollout_nodes > 0:
            if r.placement != "remote":
                raise ValueError(f"config key 'cluster.rollout_nodes'={c.rollout_nodes} starts a rollout fleet in the "
                                 f"job: set rollout.placement=remote (got {r.placement!r})")
            if not self.model.hf_dir:
                raise ValueError(f"config key 'cluster.rollout_nodes'={c.rollout_nodes}: the servers load "
                                 "model.hf_dir before the first weight sync; set model.hf_dir")
            if c.gpus_per_node > 0 and self.parallel.device != "cpu":
                if c.rollout_nodes >= c.nodes:
                    raise ValueError(f"config key 'cluster.rollout_nodes'={c.rollout_nodes} leaves no node to train "
                                     f"on (cluster.nodes={c.nodes})")
                if c.gpus_per_node % r.server_tp:
                    raise ValueError(f"config key 'rollout.server_tp'={r.server_tp} does not divide "
                                     f"cluster.gpus_per_node={c.gpus_per_node}")
        elif r.placement == "remote" and not (r.remote.urls or r.remote.router_url):
            raise ValueError("config key 'rollout.remote.urls': value [] is not allowed; expected at least one "
                             "server URL (or rollout.remote.router_url) when rollout.placement=remote, or a fleet "
                             "started in the job (cluster.rollout_nodes)")
        v = ROUTE_VARIANTS[self.loss.variant]
        if (self.teacher.context == "type_only" and v.mask is not None and not v.uses_spans
                and self.schedule.lambda0 > 0):
            raise ValueError(f"config key 'teacher.context'=type_only with loss.variant={self.loss.variant}: that "
                             "variant annotates no spans, so its teacher would get no diagnostic type and see "
                             "nothing the student does not; use solution_and_type, answer_and_type or solution")
        if self.model.hf_dir and self.model.ckpt:
            raise ValueError("config keys 'model.hf_dir' and 'model.ckpt' are exclusive: set one of them")
        if self.checkpoint.keep_best:
            if self.eval.every == 0:
                raise ValueError("config key 'checkpoint.keep_best': value True needs the in-loop evaluation to "
                                 "select on; set eval.every > 0 (got 0) or checkpoint.keep_best=false")
            if self.checkpoint.best_metric is not None:  # one the in-loop evaluation logs
                benches = ["val"] if self.eval.in_loop_source else self.eval.benchmarks
                _one_of("checkpoint.best_metric", self.checkpoint.best_metric,
                        {"eval/average"} | {f"eval/{b}/{m}" for b in benches for m in ("avg@k", "ci95_low")})

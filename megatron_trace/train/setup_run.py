"""Build everything a run needs from a `Config`: groups, actor, optimizer, teacher, engine,
data, verifier, annotator, metric sinks.

The actor and the engine both start from the same weights: a deterministic random Qwen3 of
`model.size` seeded by `seed`, `model.hf_dir`, or a megatron-trace checkpoint `model.ckpt`
(the engine is then synced from the actor), so every TP/PP layout starts identically. For the
synthetic task the vocabulary is the character tokenizer's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import Config, config_to_dict, dump_config
from ..data.problems import math_prompt
from ..loss import ROUTE_VARIANTS, KLSchedule
from ..models.builder import build_model
from ..models.convert import load_hf_into_model
from ..models.qwen3 import Qwen3Arch, arch_from_hf_config, get_arch
from ..parallel import ParallelGroups, initialize
from .setup import OptimSettings, build_optimizer, lr_at, wrap_ddp
from .teacher import SnapshotTeacher

__all__ = ["Run", "setup_run"]


class _DictReader:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


@dataclass
class Run:
    cfg: Config
    groups: ParallelGroups
    arch: Qwen3Arch
    tokenizer: object
    ddp: object
    optimizer: object
    engine: object | None  # global rank 0's engine (eval, self-annotator); all engines live in `gen`
    annotator: object | None
    verify: object  # list of (response text, gold) -> list of "correct" | other results
    schedule: KLSchedule
    problems: list[dict]
    loss_kwargs: dict
    teacher: SnapshotTeacher | None = None  # None: live teacher
    gen: object = None  # train.generation.Generation: placement, dispatch, memory hand-off, sync
    offload: object = None  # train.offload.TrainerOffload when train.offload_during_rollout
    start_step: int = 0
    cursor: int = 0
    metrics_path: str | None = None
    _tb: object = field(default=None, repr=False)
    _wandb: object = field(default=None, repr=False)
    _closers: list = field(default_factory=list, repr=False)

    def next_prompts(self, n: int) -> tuple[list[list[int]], list[dict], list[int]]:
        """The next n prompts (token ids), their rows, and their uids (the draw index, which seeds
        their sampling). Every rank draws the same prompts."""
        ids, metas, uids = [], [], []
        for _ in range(n):
            row = self.problems[self.cursor % len(self.problems)]
            uids.append(self.cursor)
            self.cursor += 1
            text = math_prompt(row["problem"], self.tokenizer, thinking=self.cfg.data.thinking, kind=self.prompt_kind)
            ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            metas.append(row)
        return ids, metas, uids

    @property
    def prompt_kind(self) -> str:
        return "arith" if self.cfg.data.source == "arith" else "math"

    def log(self, step: int, metrics: dict) -> None:
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}, allow_nan=True) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def lr(self, step: int) -> float:
        o = self.cfg.optim
        return lr_at(step, self.cfg.train.steps, o.lr, o.min_lr, o.lr_warmup_steps, o.lr_decay)

    def close(self) -> None:
        for fn in self._closers:
            fn()
        self._closers.clear()


def _arith_verify(items):
    from ..tasks.arith import verify

    return ["correct" if verify(text, gold) else "wrong" for text, gold in items]


def _load_data(cfg: Config, tokenizer_dir: str | None):
    """(tokenizer, problems, verify, closers) for `data.source`."""
    if cfg.data.source == "arith":
        from ..tasks import task_rows
        from ..tasks.tokenizer import build_char_tokenizer

        a = cfg.data.arith
        problems = task_rows(cfg.data.task, a.num_train, split="train", seed=cfg.seed, num_ops=a.num_ops,
                             digits=a.digits, ops=a.ops)
        return build_char_tokenizer(), problems, _arith_verify, []
    from transformers import AutoTokenizer

    from ..data.problems import load_problems
    from ..reward.grade import verifier_for
    from ..reward.pool import VerifyPool

    if tokenizer_dir is None:
        raise ValueError(f"data.source={cfg.data.source!r} needs a real tokenizer: set model.hf_dir or model.ckpt")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    problems, _ = load_problems(cfg.data.source, limit=cfg.data.max_problems)
    if cfg.data.shuffle:
        import random

        random.Random(cfg.seed).shuffle(problems)
    pool = VerifyPool(verifier_for("math"), num_workers=cfg.reward.workers, timeout_s=cfg.reward.timeout_s)

    def verify(items):
        return [r if isinstance(r, str) else "error" for r in pool.map(items)]

    return tokenizer, problems, verify, [pool.close]


def _build_annotator(cfg: Config, engine, tokenizer):
    kind = cfg.annotate.kind
    if kind == "oracle":
        if cfg.data.source != "arith":
            raise ValueError("annotate.kind=oracle only knows the synthetic task (data.source=arith); use api or self")
        from ..tasks.oracle import OracleAnnotator

        return OracleAnnotator(cfg.annotate.coverage_cap, decisive_only=cfg.data.task == "product_chain")
    if kind == "api":
        from ..annotate.api import ApiAnnotator, ApiAnnotatorConfig

        a = cfg.annotate.api
        return ApiAnnotator(ApiAnnotatorConfig(
            base_url=a.base_url, model=a.model, api_key_env=a.api_key_env, max_concurrency=a.max_concurrency,
            timeout_s=a.timeout_s, max_retries=a.max_retries, coverage_cap=cfg.annotate.coverage_cap,
            cache_dir=cfg.annotate.cache_dir or os.path.join(cfg.run.dir, "annotator_cache")))
    from ..annotate.self_annotator import SelfAnnotator
    from ..rollout import SamplingParams

    return SelfAnnotator(engine, tokenizer, SamplingParams(n=1, temperature=0.0, max_new_tokens=256),
                         cfg.annotate.coverage_cap)


def _build_engine(cfg: Config, hf_model, dtype, tokenizer, groups: ParallelGroups):
    """This rank's local engine (colocated owner or rank0 placement)."""
    if cfg.rollout.engine == "sglang":
        from ..rollout.sglang import SGLangEngine

        if not cfg.model.hf_dir:
            raise ValueError("rollout.engine=sglang starts from model.hf_dir; set it (convert a checkpoint with "
                             "tools/convert_megatron_to_hf.py)")
        from ..parallel import free_port

        colocated = cfg.rollout.placement == "colocated"
        local = int(os.environ.get("LOCAL_RANK", "0"))
        # Several engines per node (one per replica): each needs its own ports (SGLang derives its
        # internal ones from `port`), spaced apart per local rank.
        return SGLangEngine.launch(
            cfg.model.hf_dir, tp_size=cfg.parallel.tp if colocated else 1, base_gpu_id=local,
            mem_fraction_static=cfg.rollout.mem_fraction_static, port=20000 + 50 * local, nccl_port=free_port(),
            dtype="bfloat16" if dtype == torch.bfloat16 else "float32", random_seed=cfg.seed)
    from ..rollout import HFEngine

    if hf_model is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        if cfg.model.hf_dir:
            hf_model = AutoModelForCausalLM.from_pretrained(cfg.model.hf_dir, dtype=dtype)
        else:  # from a checkpoint: the shape here, the weights from the actor (synced below)
            from ..models.checkpoint import read_meta

            hf_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**read_meta(cfg.model.ckpt)["hf_config"]))
    return HFEngine(hf_model, tokenizer, eos_token_ids=[tokenizer.eos_token_id], device=groups.device,
                    batch_prompts=cfg.rollout.hf_batch_prompts,
                    max_batch_tokens=cfg.rollout.hf_max_batch_tokens)


def remote_api_key(env_name: str | None) -> str | None:
    """The servers' API key from the environment variable `rollout.remote.api_key_env` names."""
    if env_name is None:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        raise ValueError(f"config key 'rollout.remote.api_key_env' names the environment variable {env_name!r}, "
                         "which is not set (or empty) in the trainer's environment")
    return key


def _build_remote(cfg: Config, groups: ParallelGroups):
    """Rank 0's clients for rollout.placement=remote: (fleet, weight-broadcast group or None)."""
    import socket

    from ..parallel import free_port
    from ..rollout.dispatch import EngineFleet
    from ..rollout.sglang import RemoteSGLangEngine, RemoteWeightGroup

    r = cfg.rollout.remote
    timeout = cfg.rollout.request_timeout_s
    key = remote_api_key(r.api_key_env)
    workers = [RemoteSGLangEngine(u, timeout_s=timeout, health_timeout_s=r.health_timeout_s, api_key=key)
               for u in r.urls]
    if r.router_url:
        gen = [RemoteSGLangEngine(r.router_url, timeout_s=timeout, health_timeout_s=r.health_timeout_s, router=True,
                                  api_key=key)]
        names = [r.router_url]
    else:
        gen, names = workers, list(r.urls)
    fleet = EngineFleet(gen, names, max_retries=cfg.rollout.max_retries, chunk_prompts=cfg.rollout.chunk_prompts)
    if r.weight_sync != "distributed":
        return fleet, None, None
    if not workers:
        raise ValueError("config key 'rollout.remote.urls' is empty: the weight broadcast needs the servers' "
                         "URLs even behind a router (or set rollout.remote.weight_sync=none)")
    backend = r.backend if r.backend != "auto" else ("nccl" if groups.device.type == "cuda" else "gloo")
    counter = [0]

    def connect(servers):  # a fresh group (name and port) each time: after a server died, say
        counter[0] += 1
        group = RemoteWeightGroup.connect(servers, r.master_address or socket.gethostname(),
                                          r.master_port + counter[0] - 1 if r.master_port else free_port(),
                                          backend=backend, group_name=f"megatron_trace_weights_{counter[0]}")
        if r.router_url:
            group.followers = list(gen)  # the router's client: its samples' version is the servers'
        return group

    return fleet, connect(workers), connect


def _build_generation(cfg: Config, groups: ParallelGroups, hf_model, dtype, tokenizer, closers: list):
    from .generation import Generation

    placement = cfg.rollout.placement
    engine = fleet = target = reconnect = None
    if cfg.train.mode != "train_only":
        if Generation.owns_engine(placement, groups):
            engine = _build_engine(cfg, hf_model, dtype, tokenizer, groups)
        elif placement == "remote" and dist.get_rank() == 0:
            fleet, target, reconnect = _build_remote(cfg, groups)
    gen = Generation(placement, groups, engine=engine, fleet=fleet, sync_target=target, reconnect=reconnect,
                     max_retries=cfg.rollout.max_retries,
                     remote_weight_sync=cfg.rollout.remote.weight_sync != "none",
                     per_rank_weights=cfg.rollout.engine == "sglang" and cfg.parallel.tp > 1,
                     wait_timeout_minutes=cfg.parallel.wait_timeout_minutes)
    closers.append(gen.shutdown)
    if fleet is not None:
        from ..rollout.dispatch import FleetEngine

        return gen, FleetEngine(fleet)
    return gen, engine


def _build_kwargs(cfg: Config) -> dict:
    """`build_model` options of the actor: TE spec, sequence parallelism, activation recompute."""
    o = cfg.optim
    return dict(use_te=cfg.model.use_te, sequence_parallel=cfg.parallel.sequence_parallel, recompute=o.recompute,
                recompute_method=o.recompute_method, recompute_num_layers=o.recompute_num_layers)


def build_actor(cfg: Config, groups: ParallelGroups, tokenizer, dtype: torch.dtype):
    """(arch, this rank's GPTModel stage, the HF model it came from or None) per `model.*`."""
    from ..models.hf_io import make_random_hf_model

    hf_model = None
    if cfg.model.ckpt:
        from ..models.checkpoint import load_checkpoint, read_meta

        arch = arch_from_hf_config(read_meta(cfg.model.ckpt)["hf_config"])
        model = load_checkpoint(cfg.model.ckpt, groups, params_dtype=dtype, **_build_kwargs(cfg))
    else:
        if cfg.model.hf_dir:
            from ..models.convert import HFCheckpointReader

            arch = arch_from_hf_config(cfg.model.hf_dir)
            reader = HFCheckpointReader(cfg.model.hf_dir)
        else:
            arch = dataclasses.replace(get_arch(cfg.model.size), vocab_size=len(tokenizer))
            hf_model = make_random_hf_model(arch, seed=cfg.seed)
            reader = _DictReader(dict(hf_model.state_dict()))
        model = build_model(arch, groups, params_dtype=dtype, perform_initialization=False, **_build_kwargs(cfg))
        load_hf_into_model(model, reader, groups)
    return arch, model, hf_model


def kl_schedule(cfg: Config) -> KLSchedule:
    """lambda_k from the schedule section (kind anneal or constant; see loss/schedule.py)."""
    s = cfg.schedule
    return KLSchedule(s.lambda0, s.warmup_steps, s.decay_steps, s.decay, kind=s.kind)


def loss_kwargs(cfg: Config) -> dict:
    """`LossConfig` fields from the config. The loss's temperature is the rollout's unless
    `loss.temperature` says otherwise: the log-probs must be those of the policy that sampled."""
    lo = cfg.loss
    return dict(variant=lo.variant, eps_low=lo.eps_low, eps_high=lo.eps_high, agg=lo.agg,
                max_response_len=lo.max_response_len, lambda0=cfg.schedule.lambda0, entry_clip=lo.entry_clip,
                entry_clip_mode=lo.entry_clip_mode, routed_grpo=lo.routed_grpo, kl_ref_coef=0.0,
                entropy_coef=lo.entropy_coef, chunk_size=lo.chunk_size,
                fused_head=lo.fused_head, head_chunk_tokens=lo.head_chunk_tokens or None,
                temperature=lo.temperature if lo.temperature is not None else cfg.rollout.temperature)


def _check_memory(cfg: Config, groups: ParallelGroups) -> None:
    """On CUDA, refuse a config the memory planner puts over cluster.gpu_memory_gb, before any
    model is built. CPU runs are not checked: host memory is not what the GPU size describes."""
    if groups.device.type != "cuda" or not cfg.train.memory_check:
        return
    from ..models.builder import have_transformer_engine
    from ..plan import check_fits

    fused = cfg.model.use_te if cfg.model.use_te is not None else have_transformer_engine()
    check_fits(cfg, dp=groups.dp_size, fused_attention=fused, source=cfg.run.name)


def setup_run(cfg: Config, *, write_run_dir: bool = True) -> Run:
    groups = initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, device=cfg.parallel.device, seed=cfg.seed)
    if cfg.parallel.dp is not None and groups.dp_size != cfg.parallel.dp:
        raise ValueError(f"config key 'parallel.dp'={cfg.parallel.dp} but {dist.get_world_size()} ranks at "
                         f"tp={cfg.parallel.tp}, pp={cfg.parallel.pp} give dp={groups.dp_size}")
    _check_memory(cfg, groups)
    if cfg.eval.every and not cfg.eval.in_loop_source:  # the in-loop eval runs eval.benchmarks
        from ..data.problems import gpqa_csv_problem

        problem = gpqa_csv_problem(cfg.eval.benchmarks, cfg.eval.gpqa_csv, where="the in-loop eval (eval.every > 0)")
        if problem:
            raise FileNotFoundError(problem)
    tok_dir = cfg.model.hf_dir or (os.path.join(cfg.model.ckpt, "tokenizer") if cfg.model.ckpt else None)
    tokenizer, problems, verify, closers = _load_data(cfg, tok_dir)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    arch, model, hf_model = build_actor(cfg, groups, tokenizer, dtype)
    ddp = wrap_ddp(model, groups, use_distributed_optimizer=cfg.optim.distributed_optimizer)
    o = cfg.optim
    optimizer = build_optimizer(ddp, groups, OptimSettings(optimizer=o.optimizer, lr=o.lr, weight_decay=o.weight_decay,
                                                           clip_grad=o.clip_grad,
                                                           use_distributed_optimizer=o.distributed_optimizer))
    s = cfg.schedule
    schedule = kl_schedule(cfg)
    teacher = None
    if cfg.teacher.mode == "snapshot" and s.lambda0 > 0 and ROUTE_VARIANTS[cfg.loss.variant].mask is not None:
        teacher = SnapshotTeacher(arch, groups, params_dtype=dtype, use_te=cfg.model.use_te,
                                  sync_every=cfg.teacher.sync_every, offload=cfg.teacher.offload)
    gen, engine = _build_generation(cfg, groups, hf_model, dtype, tokenizer, closers)
    annotator = None
    if dist.get_rank() == 0 and cfg.train.mode != "train_only":
        spans = s.lambda0 > 0 and ROUTE_VARIANTS[cfg.loss.variant].uses_spans
        lift = cfg.train.key_token_lift > 0 and cfg.train.lift_annotate  # the lift metric's spans
        if spans or lift:
            annotator = _build_annotator(cfg, engine, tokenizer)
    if cfg.train.mode != "train_only" and (cfg.model.ckpt or cfg.rollout.placement == "remote"):
        gen.sync(ddp, version=0)  # engines <- the actor (remote servers may hold anything)
    run = Run(cfg, groups, arch, tokenizer, ddp, optimizer, engine if dist.get_rank() == 0 else None, annotator,
              verify, schedule, problems,
              loss_kwargs=loss_kwargs(cfg), teacher=teacher, gen=gen)
    if cfg.train.offload_during_rollout:
        from .offload import TrainerOffload

        run.offload = TrainerOffload(ddp, optimizer)
    run._closers.extend(closers)
    if write_run_dir and dist.get_rank() == 0:
        _open_run_dir(run)
    return run


def _open_run_dir(run: Run) -> None:
    from .checkpoint import find_latest

    cfg = run.cfg
    metrics = os.path.join(cfg.run.dir, "metrics.jsonl")
    if os.path.exists(metrics) and find_latest(cfg.run.dir) is None:
        # A previous run without any checkpoint: start over, but keep its metrics aside.
        os.replace(metrics, metrics + ".prev")
    os.makedirs(cfg.run.dir, exist_ok=True)
    with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
        f.write(dump_config(cfg))
    run.metrics_path = metrics
    if cfg.log.tensorboard:
        run._tb = open_tensorboard(os.path.join(cfg.run.dir, "tb"))
        if run._tb is not None:
            run._closers.append(run._tb.close)
    if cfg.log.wandb:
        try:
            import wandb
        except ImportError:
            raise ValueError("config key 'log.wandb': value True needs the wandb package (pip install wandb)") from None
        run._wandb = wandb.init(project=cfg.log.wandb_project, entity=cfg.log.wandb_entity, name=cfg.run.name,
                                dir=cfg.run.dir, config=config_to_dict(cfg), resume="allow",
                                id=_wandb_id(cfg.run.dir))
        run._closers.append(run._wandb.finish)


_TB_WARNED = False


def open_tensorboard(log_dir: str):
    """A SummaryWriter on `log_dir`, or None (with one warning per process) when the tensorboard
    package is missing: log.tensorboard is on by default and is not worth failing a run for."""
    global _TB_WARNED
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if not _TB_WARNED:
            from ..extras import install_hint

            _TB_WARNED = True
            warnings.warn(f"log.tensorboard: the tensorboard package is not installed ({exc}); training goes on "
                          f"without TensorBoard logs (metrics.jsonl has every metric). Install it with "
                          f"{install_hint('tensorboard')}, or set log.tensorboard=false to silence this.",
                          stacklevel=2)
        return None
    return SummaryWriter(log_dir)


def _wandb_id(run_dir: str) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same W&B run."""
    path = os.path.join(run_dir, "wandb_id")
    if not os.path.exists(path):
        import uuid

        with open(path, "w") as f:
            f.write(uuid.uuid4().hex[:16])
    return open(path).read().strip()


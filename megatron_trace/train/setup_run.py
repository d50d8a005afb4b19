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
    engine: object | None  # global rank 0 only
    annotator: object | None
    verify: object  # list of (response text, gold) -> list of "correct" | other results
    schedule: KLSchedule
    problems: list[dict]
    loss_kwargs: dict
    teacher: SnapshotTeacher | None = None  # None: live teacher
    start_step: int = 0
    cursor: int = 0
    metrics_path: str | None = None
    _tb: object = field(default=None, repr=False)
    _wandb: object = field(default=None, repr=False)
    _closers: list = field(default_factory=list, repr=False)

    def next_prompts(self, n: int) -> tuple[list[list[int]], list[dict]]:
        ids, metas = [], []
        for _ in range(n):
            row = self.problems[self.cursor % len(self.problems)]
            self.cursor += 1
            text = math_prompt(row["problem"], self.tokenizer, thinking=self.cfg.data.thinking, kind=self.prompt_kind)
            ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            metas.append(row)
        return ids, metas

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
        from ..tasks.arith import generate
        from ..tasks.tokenizer import build_char_tokenizer

        a = cfg.data.arith
        problems = [p.to_row() for p in generate(a.num_train, seed=cfg.seed, num_ops=a.num_ops, digits=a.digits,
                                                 ops=a.ops)]
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

        return OracleAnnotator(cfg.annotate.coverage_cap)
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


def _build_engine(cfg: Config, hf_model, dtype, tokenizer, device):
    if cfg.rollout.engine == "sglang":
        from ..rollout.sglang import SGLangEngine

        if not cfg.model.hf_dir:
            raise ValueError("rollout.engine=sglang starts from model.hf_dir; set it (convert a checkpoint with "
                             "tools/convert_megatron_to_hf.py)")
        return SGLangEngine.launch(cfg.model.hf_dir, tp_size=1, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    from ..rollout import HFEngine

    return HFEngine(hf_model, tokenizer, eos_token_ids=[tokenizer.eos_token_id], device=device)


def build_actor(cfg: Config, groups: ParallelGroups, tokenizer, dtype: torch.dtype):
    """(arch, this rank's GPTModel stage, the HF model it came from or None) per `model.*`."""
    from ..models.hf_io import make_random_hf_model

    hf_model = None
    if cfg.model.ckpt:
        from ..models.checkpoint import load_checkpoint, read_meta

        arch = arch_from_hf_config(read_meta(cfg.model.ckpt)["hf_config"])
        model = load_checkpoint(cfg.model.ckpt, groups, params_dtype=dtype, use_te=cfg.model.use_te)
    else:
        if cfg.model.hf_dir:
            from ..models.convert import HFCheckpointReader

            arch = arch_from_hf_config(cfg.model.hf_dir)
            reader = HFCheckpointReader(cfg.model.hf_dir)
        else:
            arch = dataclasses.replace(get_arch(cfg.model.size), vocab_size=len(tokenizer))
            hf_model = make_random_hf_model(arch, seed=cfg.seed)
            reader = _DictReader(dict(hf_model.state_dict()))
        model = build_model(arch, groups, params_dtype=dtype, use_te=cfg.model.use_te, perform_initialization=False)
        load_hf_into_model(model, reader, groups)
    return arch, model, hf_model


def setup_run(cfg: Config, *, write_run_dir: bool = True) -> Run:
    groups = initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, device=cfg.parallel.device, seed=cfg.seed)
    if cfg.optim.distributed_optimizer and groups.device.type == "cpu":
        raise ValueError("config key 'optim.distributed_optimizer': value True is not allowed on CPU "
                         "(gloo has no reduce-scatter); set it to false")
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
    schedule = KLSchedule(s.lambda0, s.warmup_steps, s.decay_steps, s.decay)
    teacher = None
    if cfg.teacher.mode == "snapshot" and s.lambda0 > 0 and ROUTE_VARIANTS[cfg.loss.variant].mask is not None:
        teacher = SnapshotTeacher(arch, groups, params_dtype=dtype, use_te=cfg.model.use_te,
                                  sync_every=cfg.teacher.sync_every, offload=cfg.teacher.offload)
    engine = annotator = None
    if dist.get_rank() == 0 and cfg.train.mode != "train_only":
        if hf_model is None and cfg.rollout.engine == "hf":
            from transformers import AutoConfig, AutoModelForCausalLM

            if cfg.model.hf_dir:
                hf_model = AutoModelForCausalLM.from_pretrained(cfg.model.hf_dir, dtype=dtype)
            else:  # from a checkpoint: the shape here, the weights from the actor (synced below)
                from ..models.checkpoint import read_meta

                hf_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**read_meta(cfg.model.ckpt)["hf_config"]))
        engine = _build_engine(cfg, hf_model, dtype, tokenizer, groups.device)
        closers.append(engine.shutdown)
        if s.lambda0 > 0 and ROUTE_VARIANTS[cfg.loss.variant].mask in ("annotator", "inverted"):
            annotator = _build_annotator(cfg, engine, tokenizer)
    if cfg.model.ckpt and cfg.train.mode != "train_only":
        from ..sync import sync_weights

        sync_weights(ddp, groups, engine, version=0)
    run = Run(cfg, groups, arch, tokenizer, ddp, optimizer, engine, annotator, verify, schedule, problems,
              loss_kwargs=dict(variant=cfg.loss.variant, eps_low=cfg.loss.eps_low, eps_high=cfg.loss.eps_high,
                               agg=cfg.loss.agg, max_response_len=cfg.loss.max_response_len,
                               lambda0=s.lambda0, entry_clip=cfg.loss.entry_clip, routed_grpo=cfg.loss.routed_grpo,
                               kl_ref_coef=0.0, entropy_coef=cfg.loss.entropy_coef, chunk_size=cfg.loss.chunk_size),
              teacher=teacher)
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
        from torch.utils.tensorboard import SummaryWriter

        run._tb = SummaryWriter(os.path.join(cfg.run.dir, "tb"))
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


def _wandb_id(run_dir: str) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same W&B run."""
    path = os.path.join(run_dir, "wandb_id")
    if not os.path.exists(path):
        import uuid

        with open(path, "w") as f:
            f.write(uuid.uuid4().hex[:16])
    return open(path).read().strip()


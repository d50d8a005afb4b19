"""Build everything a run needs from a `Config`: groups, actor, optimizer, engine, data, annotator.

The actor and the engine both start from the same deterministic HF initialisation (a random Qwen3
of `model.size` seeded by `seed`, or `model.hf_dir`), so every TP/PP layout starts from the same
weights. For the synthetic task the vocabulary is the character tokenizer's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import Config, dump_config
from ..data.problems import math_prompt
from ..loss import KLSchedule
from ..models.builder import build_model
from ..models.convert import load_hf_into_model
from ..models.qwen3 import Qwen3Arch, arch_from_hf_config, get_arch
from ..parallel import ParallelGroups, initialize
from .setup import OptimSettings, build_optimizer, wrap_ddp

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
    verify: object
    schedule: KLSchedule
    problems: list[dict]
    loss_kwargs: dict
    start_step: int = 0
    cursor: int = 0
    metrics_path: str | None = None
    _tb: object = field(default=None, repr=False)

    def next_prompts(self, n: int) -> tuple[list[list[int]], list[dict]]:
        ids, metas = [], []
        for _ in range(n):
            row = self.problems[self.cursor % len(self.problems)]
            self.cursor += 1
            text = math_prompt(row["problem"], self.tokenizer, thinking=self.cfg.data.thinking)
            ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            metas.append(row)
        return ids, metas

    def log(self, step: int, metrics: dict) -> None:
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)


def _arith_verify(items):
    from ..tasks.arith import verify

    return ["correct" if verify(text, gold) else "wrong" for text, gold in items]


def setup_run(cfg: Config, *, write_run_dir: bool = True) -> Run:
    from ..models.hf_io import make_random_hf_model
    from ..rollout import HFEngine

    groups = initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, device=cfg.parallel.device, seed=cfg.seed)
    if cfg.data.source == "arith":
        from ..tasks.arith import generate
        from ..tasks.tokenizer import build_char_tokenizer

        tokenizer = build_char_tokenizer()
        problems = [p.to_row() for p in generate(cfg.data.arith.num_train, seed=cfg.seed, num_ops=cfg.data.arith.num_ops,
                                                 digits=cfg.data.arith.digits)]
        verify = _arith_verify
    else:
        raise ValueError(f"data.source={cfg.data.source!r}: only 'arith' is wired into the loop so far")
    if cfg.model.hf_dir:
        arch = arch_from_hf_config(cfg.model.hf_dir)
        from ..models.convert import HFCheckpointReader

        reader = HFCheckpointReader(cfg.model.hf_dir)
        hf_model = None
    else:
        arch = dataclasses.replace(get_arch(cfg.model.size), vocab_size=len(tokenizer))
        hf_model = make_random_hf_model(arch, seed=cfg.seed)
        reader = _DictReader(dict(hf_model.state_dict()))
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model = build_model(arch, groups, params_dtype=dtype, use_te=cfg.model.use_te, perform_initialization=False)
    load_hf_into_model(model, reader, groups)
    ddp = wrap_ddp(model, groups)
    o = cfg.optim
    optimizer = build_optimizer(ddp, groups, OptimSettings(optimizer=o.optimizer, lr=o.lr, weight_decay=o.weight_decay,
                                                           clip_grad=o.clip_grad))
    engine = annotator = None
    if dist.get_rank() == 0:
        if cfg.rollout.engine != "hf":
            raise ValueError("rollout.engine=sglang is not wired into the loop yet; use hf")
        if hf_model is None:
            from transformers import AutoModelForCausalLM

            hf_model = AutoModelForCausalLM.from_pretrained(cfg.model.hf_dir, dtype=dtype)
        engine = HFEngine(hf_model, tokenizer, eos_token_ids=[tokenizer.eos_token_id], device=groups.device)
        if cfg.annotate.kind == "oracle":
            from ..tasks.oracle import OracleAnnotator

            annotator = OracleAnnotator(cfg.annotate.coverage_cap)
        else:
            raise ValueError(f"annotate.kind={cfg.annotate.kind!r} is not wired into the loop yet; use oracle")
    s = cfg.schedule
    run = Run(cfg, groups, arch, tokenizer, ddp, optimizer, engine, annotator, verify,
              KLSchedule(s.lambda0, s.warmup_steps, s.decay_steps, s.decay), problems,
              loss_kwargs=dict(variant=cfg.loss.variant, eps_low=cfg.loss.eps_low, eps_high=cfg.loss.eps_high,
                               agg=cfg.loss.agg, max_response_len=cfg.loss.max_response_len,
                               lambda0=s.lambda0, entry_clip=cfg.loss.entry_clip, routed_grpo=cfg.loss.routed_grpo,
                               kl_ref_coef=0.0, entropy_coef=cfg.loss.entropy_coef, chunk_size=cfg.loss.chunk_size))
    if write_run_dir and dist.get_rank() == 0:
        from .checkpoint import find_latest

        metrics = os.path.join(cfg.run.dir, "metrics.jsonl")
        if os.path.exists(metrics) and find_latest(cfg.run.dir) is None:
            # A previous run without any checkpoint: start over, but keep its metrics aside.
            os.replace(metrics, metrics + ".prev")
        os.makedirs(cfg.run.dir, exist_ok=True)
        with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))
        run.metrics_path = os.path.join(cfg.run.dir, "metrics.jsonl")
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            run._tb = SummaryWriter(os.path.join(cfg.run.dir, "tb"))
    return run

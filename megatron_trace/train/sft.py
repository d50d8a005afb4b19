"""Supervised warm start: cross-entropy on reference solutions, on the same Megatron machinery
as the RL step (micro-batches through `get_forward_backward_func`, global-count normalisation,
DP-summed gradients, Megatron's optimizer, TP/PP).

Each example is [prompt + reference solution + EOS] with the loss on the solution tokens. A share
`sft.privileged_frac` of the examples uses the teacher's privileged prompt (the problem, the
reference solution and a coarse diagnostic, `teacher.context`) before the same solution, so that
the base learns to use privileged context: without it, a self-teacher is no better than the
student. The result is written as an HF directory (`<run.dir>/hf`) through the export path, so
RL starts from it with the same HF -> Megatron import as a real Qwen3, plus `sft_report.json`
(held-out greedy accuracy, and the mean log-prob of the reference solution under the plain
prompt versus the privileged one). A finished SFT run with the same config is reused (cached).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time

import torch
import torch.distributed as dist

from ..config import Config, config_to_dict, dump_config
from ..loss import token_logprob_and_entropy
from ..types import TrainSample

__all__ = ["run_sft", "sft_examples"]


def _config_key(cfg: Config) -> str:
    keep = {k: v for k, v in config_to_dict(cfg).items() if k in ("seed", "model", "data", "sft")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def weights_digest(hf_dir: str) -> str:
    """sha256 over the exported safetensors files (sorted by name): equal digests mean bit-equal
    bases, so two runs' studies can be told apart by their base at a glance."""
    h = hashlib.sha256()
    for name in sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors")):
        with open(os.path.join(hf_dir, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def sft_examples(problems: list[dict], tokenizer, *, privileged_frac: float, seed: int,
                 thinking: bool = False, kind: str = "arith") -> list[TrainSample]:
    """One example per problem: plain prompt, or (privileged_frac of them) the teacher's prompt."""
    from ..annotate.base import KEY_TYPES
    from ..data.problems import math_prompt
    from ..teacher import build_teacher_input

    rng = random.Random(f"sft-{seed}")
    out = []
    for i, row in enumerate(problems):
        response = tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if rng.random() < privileged_frac:
            t = build_teacher_input(tokenizer, row["problem"], row["solution"], rng.choice(KEY_TYPES), True,
                                    response, thinking=thinking, kind=kind)
            prompt = t.input_ids[: t.prompt_len]
        else:
            prompt = tokenizer(math_prompt(row["problem"], tokenizer, thinking=thinking, kind=kind),
                               add_special_tokens=False)["input_ids"]
        out.append(TrainSample(prompt, response, 0.0, [0] * len(response), uid=i))
    return out


def _sft_step(ddp, optimizer, groups, batch: list[TrainSample], micro_batch_size: int, vocab_size: int,
              fused_head: bool = False, head_chunk_tokens: int | None = None) -> dict:
    """One SFT update: the global token mean of -log q(y_t) over the response tokens. With
    `fused_head` (`loss.fused_head`) the cross-entropy comes from the final hidden states and the
    output weight (loss/fused_head.py) and the output layer is bypassed: no logits exist."""
    from ..loss.fused_head import fused_head as fused
    from ..parallel.schedule import run_schedule
    from .micro import Batching
    from .model_pass import forward_micro_batch, head_weight
    from .step import _global_counts, _grads_finite, make_micro_batches

    # Length-sorted micro-batches: plain and privileged examples differ ~2x in length, so mixing
    # them pads every micro-batch to the longest. The loss is a global token sum, so the order of
    # examples across micro-batches does not change it.
    mine = sorted(batch[groups.dp_rank::groups.dp_size], key=lambda s: len(s.prompt_ids) + len(s.response_ids))
    mbs = make_micro_batches(mine, micro_batch_size)
    counts = _global_counts(mine, groups)
    ddp.train()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    total = torch.zeros((), dtype=torch.float64)

    def step(data_iter, m):
        mb = mbs[next(data_iter)]
        ids = mb.ids.to(groups.device)
        if fused_head:
            out = forward_micro_batch(m, groups, mb, Batching(micro_batch_size), fused=True)
        else:
            pos = torch.arange(ids.shape[1], device=groups.device).unsqueeze(0).expand_as(ids)
            out = m(ids, pos, None)

        def loss_func(out):
            nonlocal total
            targets = ids[mb.rows, mb.cols + 1]
            if fused_head:  # out: [1, T, H] hidden states at the response positions
                lp = fused(out[0], head_weight(m), targets, groups.tp, vocab_size=vocab_size,
                           chunk_tokens=head_chunk_tokens).logprob
            else:
                lp, _ = token_logprob_and_entropy(out[mb.rows, mb.cols], targets, groups.tp, vocab_size=vocab_size)
            loss = -lp.sum() / counts.num_tokens  # global token mean; DP ranks and micro-batches sum
            total += loss.detach().double().cpu()
            return loss, torch.zeros((), dtype=torch.int, device=loss.device), {"loss": loss.detach()}

        return out, loss_func

    run_schedule(groups, ddp, step, iter(range(len(mbs))), num_microbatches=len(mbs),
                 seq_length=max(mb.ids.shape[1] for mb in mbs), micro_batch_size=micro_batch_size)
    grad_norm, skipped = float("nan"), True
    if _grads_finite(ddp, groups):
        ok, grad_norm, _ = optimizer.step()
        skipped = not ok
    if groups.is_last_stage and groups.dp_size > 1:
        dist.all_reduce(total, group=groups.dp)  # gloo and nccl both take float64 sums
    return {"sft/loss": float(total) if groups.is_last_stage else None, "optim/grad_norm": float(grad_norm),
            "optim/skipped": float(skipped), "train/num_tokens": float(counts.num_tokens)}


@torch.no_grad()
def _evaluate(hf_dir: str, tokenizer, heldout: list[dict], verify, thinking: bool, max_new_tokens: int,
              seed: int) -> dict:
    """Greedy held-out accuracy, and the reference solution's mean token log-prob under the plain
    and the privileged prompt (the self-teacher's advantage), with transformers on rank 0."""
    from transformers import AutoModelForCausalLM

    from ..data.problems import math_prompt
    from ..rollout import HFEngine, SamplingParams
    from ..teacher import build_teacher_input

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    engine = HFEngine(model, tokenizer, eos_token_ids=[tokenizer.eos_token_id])
    prompts = [tokenizer(math_prompt(r["problem"], tokenizer, thinking=thinking, kind="arith"),
                         add_special_tokens=False)["input_ids"]
               for r in heldout]
    texts = []
    for i in range(0, len(prompts), 32):
        outs = engine.generate(prompts[i:i + 32], SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                                                                 seed=seed))
        texts += [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
    correct = [r == "correct" for r in verify([(t, row["answer"]) for t, row in zip(texts, heldout)])]

    def ref_logprob(prompt_ids, response_ids):
        ids = torch.tensor([prompt_ids + response_ids])
        lp = torch.log_softmax(model(ids).logits[0].double(), -1)
        p = len(prompt_ids)
        return lp[p - 1:p - 1 + len(response_ids)].gather(1, torch.tensor(response_ids)[:, None]).mean().item()

    student, teacher = [], []
    for row, prompt in list(zip(heldout, prompts))[:64]:
        response = tokenizer(row["solution"], add_special_tokens=False)["input_ids"]
        student.append(ref_logprob(prompt, response))
        t = build_teacher_input(tokenizer, row["problem"], row["solution"], "key_computation", True, response,
                                thinking=thinking, kind="arith")
        teacher.append(ref_logprob(t.input_ids[: t.prompt_len], response))
    n = len(correct)
    return {"heldout_accuracy": sum(correct) / n if n else float("nan"), "num_heldout": n,
            "ref_logprob_student": sum(student) / len(student), "ref_logprob_teacher": sum(teacher) / len(teacher),
            "samples": [{"problem": r["problem"], "response": t, "correct": c}
                        for r, t, c in list(zip(heldout, texts, correct))[:20]]}


def run_sft(cfg: Config) -> dict | None:
    """Every rank. Trains, exports `<run.dir>/hf`, evaluates; returns the report on rank 0."""
    from tqdm.auto import tqdm

    from ..models.convert import export_hf_stream, hf_param_names
    from ..models.hf_io import save_hf_checkpoint
    from ..parallel import initialize
    from .setup import OptimSettings, build_optimizer, lr_at, wrap_ddp
    from .setup_run import _load_data, build_actor

    s, out_dir = cfg.sft, cfg.run.dir
    report_path, hf_dir = os.path.join(out_dir, "sft_report.json"), os.path.join(out_dir, "hf")
    key = _config_key(cfg)
    if os.path.exists(report_path) and os.path.exists(os.path.join(hf_dir, "config.json")):
        report = json.load(open(report_path))
        if report.get("config_key") == key:
            return {**report, "cached": True}
    if cfg.data.source != "arith":
        raise ValueError(f"sft needs reference solutions; data.source={cfg.data.source!r} is not wired yet (use arith)")
    groups = initialize(tp=cfg.parallel.tp, pp=cfg.parallel.pp, device=cfg.parallel.device, seed=cfg.seed)
    tokenizer, problems, verify, closers = _load_data(cfg, None)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    arch, model, _ = build_actor(cfg, groups, tokenizer, dtype)
    ddp = wrap_ddp(model, groups)
    optimizer = build_optimizer(ddp, groups, OptimSettings(optimizer="adam", lr=s.lr, weight_decay=cfg.optim.weight_decay,
                                                           clip_grad=cfg.optim.clip_grad))
    examples = sft_examples(problems, tokenizer, privileged_frac=s.privileged_frac, seed=cfg.seed,
                            thinking=cfg.data.thinking)
    rank0 = dist.get_rank() == 0
    if rank0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))
        log = open(os.path.join(out_dir, "sft_metrics.jsonl"), "w")
    rng = random.Random(f"sft-order-{cfg.seed}")
    order: list[int] = []
    t0 = time.perf_counter()
    bar = tqdm(range(s.steps), desc="sft", disable=not rank0 or not cfg.log.progress)
    for step in bar:
        while len(order) < s.batch_size:
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            order += epoch
        batch, order = [examples[i] for i in order[: s.batch_size]], order[s.batch_size:]
        lr = lr_at(step, s.steps, s.lr, s.min_lr, s.warmup_steps, "cosine")
        for g in optimizer.param_groups:
            g["lr"] = lr
        m = _sft_step(ddp, optimizer, groups, batch, cfg.optim.micro_batch_size, arch.vocab_size,
                      cfg.loss.fused_head, cfg.loss.head_chunk_tokens or None)
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, m["sft/loss"])
        m["sft/loss"] = next(p for p in parts if p is not None)
        if step == 0:
            first_loss = m["sft/loss"]
        if rank0:
            log.write(json.dumps({"step": step, "optim/lr": lr, **m}) + "\n")
            bar.set_postfix(loss=f"{m['sft/loss']:.3f}")
    train_seconds = time.perf_counter() - t0
    stream = export_hf_stream(ddp, groups)
    report = None
    if rank0:
        log.close()
        save_hf_checkpoint(stream, hf_dir, arch.to_hf_dict(), total=len(hf_param_names(arch)))
        tokenizer.save_pretrained(hf_dir)
        from ..tasks import task_rows

        a = cfg.data.arith
        heldout = task_rows(cfg.data.task, s.heldout, split="heldout", seed=cfg.seed, num_ops=a.num_ops,
                            digits=a.digits, ops=a.ops) if s.heldout else []
        report = {"config_key": key, "steps": s.steps, "train_seconds": train_seconds,
                  "params": arch.num_params, "hf_dir": hf_dir, "weights_sha256": weights_digest(hf_dir),
                  "first_loss": first_loss, "final_loss": m["sft/loss"]}
        if heldout:
            report.update(_evaluate(hf_dir, tokenizer, heldout, verify, cfg.data.thinking, cfg.rollout.max_new_tokens,
                                    cfg.seed))
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1)
    else:
        for _ in stream:  # the export is collective
            pass
    for fn in closers:
        fn()
    return report

"""End-to-end weight-sync check behind `tools/check_weight_sync.py` (and its tests).

Builds a tiny Megatron actor at TP/PP from a random HF checkpoint, takes one optimizer step
(loss: -mean log-prob of the next token through our vocab-parallel primitive), syncs it into a
freshly initialised engine on global rank 0, then compares
  - the engine's logits with the actor's gathered logits on a probe batch, and
  - the engine's log-probs of a greedy sample with the actor's recomputation of the same tokens.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

__all__ = ["run_check"]


def _actor_step(model, groups, ids: torch.Tensor) -> float:
    from ..loss import token_logprob_and_entropy
    from ..parallel.schedule import run_schedule
    from ..train.setup import OptimSettings, build_optimizer, wrap_ddp

    ddp = wrap_ddp(model, groups)
    opt = build_optimizer(ddp, groups, OptimSettings(optimizer="sgd", lr=0.5, clip_grad=1.0))
    vocab = model.arch.vocab_size

    def step(data_iter, m):
        x = next(data_iter).to(groups.device)
        pos = torch.arange(x.shape[1] - 1, device=groups.device).unsqueeze(0).expand(x.shape[0], -1)
        logits = m(x[:, :-1], pos, None)

        def loss_func(out):
            lp, _ = token_logprob_and_entropy(out.reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1), groups.tp,
                                              vocab_size=vocab)
            loss = -lp.mean()
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    ddp.zero_grad_buffer()
    opt.zero_grad()
    run_schedule(groups, ddp, step, iter([ids]), num_microbatches=1, seq_length=ids.shape[1] - 1,
                 micro_batch_size=ids.shape[0])
    ok, grad_norm, _ = opt.step()
    assert ok
    return float(grad_norm)


def _rank(hf_dir: str, tp: int, pp: int, engine_kind: str, device: str, seed: int) -> dict | None:
    from ..models.checkpoint import load_hf
    from ..models.forward import forward_logits, gather_full_logits
    from ..models.hf_io import make_random_hf_model
    from ..parallel import initialize
    from ..rollout.base import SamplingParams
    from .weights import sync_weights, verify_engine

    groups = initialize(tp=tp, pp=pp, device=device)
    model = load_hf(hf_dir, groups)
    arch = model.arch
    gen = torch.Generator().manual_seed(seed)
    train_ids = torch.randint(0, arch.vocab_size, (4, 12), generator=gen)
    grad_norm = _actor_step(model, groups, train_ids)

    engine = None
    if dist.get_rank() == 0:
        if engine_kind == "hf":
            from ..rollout.hf import HFEngine

            # A *different* random init: only the sync can make it match the actor.
            engine = HFEngine(make_random_hf_model(arch, seed=seed + 99), eos_token_ids=[], device=groups.device)
        else:
            from ..models.hf_io import save_hf_checkpoint
            from ..rollout.sglang import SGLangEngine

            save_hf_checkpoint(((k, v) for k, v in make_random_hf_model(arch, seed=seed + 99).state_dict().items()),
                               hf_dir + "_engine", arch.to_hf_dict())
            engine = SGLangEngine.launch(hf_dir + "_engine")
    report = sync_weights(model, groups, engine, version=1)
    probe = torch.randint(0, arch.vocab_size, (2, 16), generator=gen)
    logit_diff = verify_engine(model, groups, engine, probe_ids=probe, tol=float("inf")) \
        if engine_kind == "hf" else None

    # Greedy sample on the engine, then the actor recomputes the same tokens' log-probs.
    prompts = torch.randint(0, arch.vocab_size, (3, 6), generator=gen).tolist()
    payload = [None]
    if engine is not None:
        samples = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8))
        payload = [[(s.token_ids, s.logprobs) for s in samples]]
    dist.broadcast_object_list(payload, src=0)
    samples = payload[0]
    seqs = torch.tensor([p + toks for p, (toks, _) in zip(prompts, samples)])
    full = gather_full_logits(forward_logits(model, groups, seqs), groups, arch.vocab_size, tuple(seqs.shape))
    logp = torch.log_softmax(full.double(), dim=-1)
    lp_diff = 0.0
    for b, (p, (toks, lps)) in enumerate(zip(prompts, samples)):
        for i, (t, lp) in enumerate(zip(toks, lps)):
            lp_diff = max(lp_diff, abs(logp[b, len(p) - 1 + i, t].item() - lp))
    if engine is not None and hasattr(engine, "shutdown"):
        engine.shutdown()
    if dist.get_rank() != 0:
        return None
    return {
        "max_abs_logit_diff": logit_diff,
        "max_abs_logprob_diff": lp_diff,
        "sync_seconds": round(report.seconds, 4),
        "sync_bytes": report.num_bytes,
        "sync_tensors": report.num_tensors,
        "grad_norm": grad_norm,
        "device": "cuda" if groups.device.type == "cuda" else "cpu",
        "tp": tp,
        "pp": pp,
        "engine": engine_kind,
    }


def run_check(tp: int = 1, pp: int = 1, engine: str = "hf", device: str = "auto", seed: int = 0,
              workdir: str | None = None) -> dict:
    import tempfile

    from ..models.hf_io import make_random_hf_model
    from ..models.qwen3 import QWEN3_SIZES
    from ..parallel import launch

    if engine not in ("hf", "sglang"):
        raise ValueError(f"--engine must be hf or sglang, got {engine!r}")
    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        hf_dir = f"{tmp}/actor"
        make_random_hf_model(QWEN3_SIZES["tiny"], hf_dir, seed=seed)
        res = launch(_rank, tp * pp, hf_dir, tp, pp, engine, device, seed)[0]
    if res is not None:
        res["seconds_total"] = round(time.time() - t0, 2)
    return res or {}

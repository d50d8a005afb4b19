"""Packing benchmark: one TRACE train step on a fixed batch of long-tailed rollouts, padded
(`optim.micro_batch_size` whole rollouts per micro-batch, right-padded: the layout before token
budgets) against token-budget packing (`optim.pack_sequences` + `optim.max_tokens_per_micro_batch`),
and against a token budget on padded rows (length-sorted, no packing). The job behind
`tools/bench_packing.py`.

On CPU a packed row attends through a dense block-diagonal mask, so its attention costs the
square of the row length whatever the sequences in it: keep the packed budget near the typical
rollout length (longer rollouts get a row of their own). With TransformerEngine's THD path the
cost is per sequence and the budget can be as large as memory allows.

The batch: response lengths drawn log-normal (seeded), clipped to [min, max]; every rollout gets
a ~50-token prompt; half of them carry key spans (25% of their tokens, FKL) and a privileged
prompt twice as long, so the teacher pass runs as in a TRACE step at lambda > 0. Both layouts
start from the same weights and optimizer state; they alternate, one warm-up each, and the
median over repetitions is reported. The two steps' losses and grad norms are reported too:
they must agree (the layout never changes the numbers).
"""

from __future__ import annotations

import copy
import math
import statistics
import time

__all__ = ["bench_packing_job", "lognormal_lengths"]


def lognormal_lengths(n: int, mean: float, max_len: int, min_len: int = 8, seed: int = 0) -> list[int]:
    """n lengths, log-normal with sigma 1 and the given mean before clipping to [min_len, max_len]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(mean) - sigma ** 2 / 2
    x = torch.exp(mu + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    return [int(min(max(v, min_len), max_len)) for v in x.tolist()]


def _samples(lengths: list[int], vocab: int, seed: int):
    import torch

    from ..types import TrainSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        prompt = torch.randint(0, vocab, (50,), generator=g).tolist()
        resp = torch.randint(0, vocab, (n,), generator=g).tolist()
        routes = [0] * n
        teacher = None
        if i % 2 == 0:  # a key span over 25% of the response (at least one token)
            a, k = n // 3, max(1, n // 4)
            routes[a:a + k] = [1] * len(routes[a:a + k])
            teacher = torch.randint(0, vocab, (100,), generator=g).tolist() + resp
        out.append(TrainSample(prompt, resp, float(torch.randn(1, generator=g)), routes, None, teacher,
                               100 if teacher else 0, i))
    return out


def _job(size: str, rollouts: int, mean: float, max_len: int, micro_batch_size: int, budget: int,
         padded_budget: int, repeats: int, seed: int):
    import torch

    from ..loss import LossConfig
    from ..models.builder import build_model
    from ..models.qwen3 import QWEN3_SIZES
    from ..parallel import initialize
    from .setup import OptimSettings, build_optimizer, wrap_ddp
    from .step import train_step

    groups = initialize(tp=1, pp=1)
    torch.manual_seed(seed)
    arch = QWEN3_SIZES[size]
    ddp = wrap_ddp(build_model(arch, groups), groups)
    opt = build_optimizer(ddp, groups, OptimSettings(optimizer="sgd", lr=1e-5))
    params = list(ddp.parameters())
    w0 = [p.detach().clone() for p in params]
    opt0 = copy.deepcopy(opt.state_dict())
    lengths = lognormal_lengths(rollouts, mean, max_len, seed=seed)
    batch = _samples(lengths, arch.vocab_size, seed)
    layouts = {"padded": dict(micro_batch_size=micro_batch_size),
               "packed": dict(micro_batch_size=micro_batch_size, max_tokens_per_micro_batch=budget,
                              pack_sequences=True),
               "budget_padded": dict(micro_batch_size=micro_batch_size, max_tokens_per_micro_batch=padded_budget)}
    times: dict[str, list[float]] = {k: [] for k in layouts}
    metrics: dict[str, dict] = {}
    for rep in range(repeats + 1):
        names = list(layouts)
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate the order
            with torch.no_grad():
                for p, w in zip(params, w0):
                    p.copy_(w)
            opt.load_state_dict(opt0)
            t0 = time.perf_counter()
            res = train_step(ddp, opt, groups, batch, LossConfig(variant="trace_fkl"), 0.5, vocab_size=arch.vocab_size,
                             probe_tokens=4, key_token_lift=4, **layouts[name])
            dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
            metrics[name] = res.metrics
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in params)
    return {
        "size": size, "num_params": n_params, "rollouts": rollouts, "response_len_mean": sum(lengths) / len(lengths),
        "response_len_max": max(lengths), "micro_batch_size": micro_batch_size, "max_tokens_per_micro_batch": budget,
        "repeats": repeats, "torch_threads": torch.get_num_threads(),
        "seconds_padded": med["padded"], "seconds_packed": med["packed"], "seconds_budget_padded": med["budget_padded"],
        "padding_fraction_padded": metrics["padded"]["layout/padding_frac"],
        "padding_fraction_packed": metrics["packed"]["layout/padding_frac"],
        "micro_batches_padded": metrics["padded"]["layout/micro_batches"],
        "micro_batches_packed": metrics["packed"]["layout/micro_batches"],
        "padding_fraction_budget_padded": metrics["budget_padded"]["layout/padding_frac"],
        "time_ratio_padded_vs_packed": med["padded"] / med["packed"],
        "time_ratio_padded_vs_budget_padded": med["padded"] / med["budget_padded"],
        "loss_padded": metrics["padded"]["loss/total"], "loss_packed": metrics["packed"]["loss/total"],
        "grad_norm_padded": metrics["padded"]["optim/grad_norm"], "grad_norm_packed": metrics["packed"]["optim/grad_norm"],
        "max_rel_diff_loss": max(abs(metrics[k]["loss/total"] / metrics["padded"]["loss/total"] - 1) for k in layouts),
        "target_met": med["padded"] / med["packed"] >= 1.5,
    }


def bench_packing_job(size: str = "tiny", rollouts: int = 64, mean: float = 200.0, max_len: int = 1500,
                      micro_batch_size: int = 4, budget: int = 512, padded_budget: int = 2048, repeats: int = 3,
                      seed: int = 0) -> dict:
    from ..parallel import run_on_ranks

    return run_on_ranks(_job, 1, size, rollouts, mean, max_len, micro_batch_size, budget, padded_budget, repeats,
                        seed, timeout_s=3600)[0]

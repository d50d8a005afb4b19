"""The `hf` engine's decode loop before issue 22, kept only as the baseline that
`tools/bench_rollout.py` reports as `tokens_per_s_ours_before` (`HFEngine(..., _legacy_sampler=True)`).

It samples every row with its own `torch.Generator` in a Python loop over the rows at each token,
keeps finished rows in the batch, and lets transformers' `DynamicCache` grow by concatenation.
Not used by training or evaluation; do not build on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Sample, SamplingParams
from .sampling import filter_top_k_top_p

__all__ = ["legacy_generate_rows"]


@torch.no_grad()
def legacy_generate_rows(engine, rows: list[list[int]], params: SamplingParams,
                         row_seeds: Sequence[int] | None) -> list[Sample]:
    B, L = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, L), engine.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    ids, mask = ids.to(engine.device), mask.to(engine.device)
    if row_seeds is None:
        gen = torch.Generator(device=engine.device)
        gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        row_gens = None
    else:
        row_gens = [torch.Generator(device=engine.device).manual_seed(int(x)) for x in row_seeds]
    stop_ids = torch.tensor(sorted(set(engine.eos_token_ids) | set(params.stop_token_ids)), device=engine.device)
    out_tokens: list[list[int]] = [[] for _ in range(B)]
    out_lps: list[list[float]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = torch.zeros(B, dtype=torch.bool, device=engine.device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = None
    step_ids, step_pos, step_mask = ids, position_ids, mask
    for _ in range(params.max_new_tokens):
        out = engine.model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos,
                           use_cache=True, **{engine._cache_kw: cache})
        cache = getattr(out, engine._cache_kw)
        logits = out.logits[:, -1, :].float()
        if params.temperature > 0:
            logp = torch.log_softmax(logits / params.temperature, dim=-1)
            probs = torch.softmax(filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p), dim=-1)
            if row_gens is None:
                nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
            else:
                nxt = torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g)[:, 0]
                                 for i, g in enumerate(row_gens)])
        else:
            logp = torch.log_softmax(logits, dim=-1)
            nxt = logits.argmax(-1)
        chosen_lp = logp.gather(1, nxt[:, None])[:, 0]
        for i in torch.nonzero(~done)[:, 0].tolist():
            tok = int(nxt[i])
            out_tokens[i].append(tok)
            out_lps[i].append(float(chosen_lp[i]))
            if stop_ids.numel() and bool((stop_ids == tok).any()):
                reasons[i], done[i] = "stop", True
            elif params.stop and engine._stop_string_hit(out_tokens[i], params.stop):
                reasons[i], done[i] = "stop", True
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        step_mask = torch.cat([step_mask, torch.ones((B, 1), dtype=step_mask.dtype, device=engine.device)], dim=1)
        step_pos = step_pos[:, -1:] + 1
    return [Sample(out_tokens[i], out_lps[i], reasons[i], engine.weight_version) for i in range(B)]

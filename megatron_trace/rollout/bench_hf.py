"""The `hf` engine against transformers' own `model.generate`: the same rows, one process, modes
interleaved (the job behind `tools/bench_rollout.py --mode transformers`).

Modes, each generating every row once per repetition:

- `transformers`: `model.generate(do_sample=True, ...)` on all rows in one left-padded batch, with
  the same temperature, top-k, top-p and max_new_tokens (top-k 0 when ours is off: transformers
  would otherwise apply its default of 50);
- `ours`: `HFEngine.generate` with the engine's defaults (auto batches, compaction);
- `ours_no_compaction`: the same with finished rows kept to the end (what compaction buys; equal
  to `ours` when EOS is off, as nothing finishes early);
- `ours_before`: the pre-issue-22 loop (per-row `torch.Generator`s in a Python loop over the rows,
  batches of `before_batch_prompts` prompts, finished rows kept), kept behind a private flag.

A random model of `size` (EOS off on every side, so every row runs to max_new_tokens), or, with
`hf_dir`, a saved checkpoint and its tokenizer on prompts of the synthetic arithmetic task with
EOS on everywhere (the demo's situation; rows then end at different lengths and the counts of
generated tokens differ between modes, so throughput is generated tokens, EOS included, per
second). Repetition 0 warms every mode up and is not counted; the order of the modes rotates every
repetition; medians are reported.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

__all__ = ["bench_vs_transformers"]

MODES = ("transformers", "ours", "ours_no_compaction", "ours_before")


def _arith_prompts(tokenizer, num: int, seed: int) -> list[list[int]]:
    from ..data.problems import math_prompt
    from ..tasks.arith import generate

    probs = generate(num, split="train", num_ops=2, digits=1, seed=seed, ops="+-")
    return [tokenizer(math_prompt(p.to_row()["problem"], kind="arith"), add_special_tokens=False)["input_ids"]
            for p in probs]


def _left_pad(rows: list[list[int]], pad: int):
    import torch

    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    return ids, mask


def _generated(seqs, eos: set[int]) -> int:
    """Tokens a transformers output row generated: up to and including its first EOS."""
    n = 0
    for row in seqs.tolist():
        for j, t in enumerate(row):
            if t in eos:
                n += j + 1
                break
        else:
            n += len(row)
    return n


def bench_vs_transformers(size: str = "demo", num_prompts: int = 16, n: int = 4, max_new_tokens: int = 48,
                          repeats: int = 5, seed: int = 0, min_len: int = 48, max_len: int = 60,
                          temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
                          before_batch_prompts: int = 8, hf_dir: str | None = None) -> dict:
    import torch

    from .base import SamplingParams, prompt_seed
    from .bench import make_prompts
    from .hf import HFEngine

    if num_prompts < 1 or n < 1 or max_new_tokens < 1 or repeats < 1 or before_batch_prompts < 1:
        raise ValueError(f"need prompts, n, max_new_tokens, repeats and before_batch_prompts >= 1, got "
                         f"{num_prompts}, {n}, {max_new_tokens}, {repeats}, {before_batch_prompts}")
    if temperature <= 0:
        raise ValueError(f"the comparison samples: need temperature > 0, got {temperature}")
    if hf_dir is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(hf_dir):
            raise ValueError(f"--hf-dir {hf_dir!r} is not a directory")
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        prompts = _arith_prompts(tokenizer, num_prompts, seed)
        eos = [tokenizer.eos_token_id]
        num_params, label = sum(p.numel() for p in model.parameters()), hf_dir
    else:
        from ..models.hf_io import make_random_hf_model
        from ..models.qwen3 import get_arch

        arch = get_arch(size)
        model = make_random_hf_model(arch, seed=seed)
        prompts = make_prompts(num_prompts, arch.vocab_size, seed, min_len, max_len)
        eos, num_params, label = [], arch.num_params, size
    params = SamplingParams(n=n, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
    seeds = [prompt_seed(seed, 0, uid) for uid in range(num_prompts)]
    ours = HFEngine(model, eos_token_ids=eos)
    keep_rows = HFEngine(model, eos_token_ids=eos, compact=False)
    before = HFEngine(model, eos_token_ids=eos, batch_prompts=before_batch_prompts, _legacy_sampler=True)
    rows = [p for p in prompts for _ in range(n)]
    ids, mask = _left_pad(rows, ours.pad_token_id)
    gen_cfg = copy.deepcopy(model.generation_config)
    gen_cfg.update(do_sample=True, temperature=temperature, top_k=top_k if top_k > 0 else 0, top_p=top_p,
                   max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=ours.pad_token_id,
                   eos_token_id=eos[0] if eos else None, num_beams=1, num_return_sequences=1)

    def run(mode: str) -> int:
        if mode == "transformers":
            torch.manual_seed(seed)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            new = out[:, ids.shape[1]:]
            if not eos and new.shape[1] != max_new_tokens:
                raise RuntimeError(f"transformers generated {new.shape[1]} tokens per row, expected {max_new_tokens}")
            return _generated(new, set(eos))
        engine = {"ours": ours, "ours_no_compaction": keep_rows, "ours_before": before}[mode]
        return sum(len(s.token_ids) for s in engine.generate(prompts, params, seeds))

    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {m: [] for m in MODES}
    tokens: dict[str, list[int]] = {m: [] for m in MODES}
    for rep in range(repeats + 1):  # repetition 0 warms every mode up and is not counted
        k = rep % len(MODES)
        for mode in MODES[k:] + MODES[:k]:
            t0 = time.perf_counter()
            got = run(mode)
            dt = time.perf_counter() - t0
            if rep:
                times[mode].append(dt)
                tokens[mode].append(got)
    sec = {m: statistics.median(times[m]) for m in MODES}
    tps = {m: sum(tokens[m]) / sum(times[m]) for m in MODES}
    out = {
        "model": label, "num_params": num_params, "prompts": num_prompts, "n": n, "rows": len(rows),
        "max_new_tokens": max_new_tokens, "prompt_len": [min(map(len, prompts)), max(map(len, prompts))],
        "eos": bool(eos), "temperature": temperature, "top_k": top_k, "top_p": top_p, "repeats": repeats,
        "seed": seed, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "before_batch_prompts": before_batch_prompts,
        **{f"seconds_{m}": sec[m] for m in MODES}, **{f"seconds_all_{m}": times[m] for m in MODES},
        **{f"tokens_{m}": statistics.median(tokens[m]) for m in MODES},
        **{f"tokens_per_s_{m}": tps[m] for m in MODES},
    }
    out["ratio_ours_vs_transformers"] = tps["ours"] / tps["transformers"]
    out["ratio_ours_vs_before"] = tps["ours"] / tps["ours_before"]
    out["ratio_compaction"] = tps["ours"] / tps["ours_no_compaction"]
    out["target_met_vs_transformers"] = out["ratio_ours_vs_transformers"] >= 1.2
    out["load_avg_1m_before"], out["load_avg_1m_after"] = load_before, os.getloadavg()[0]
    return out

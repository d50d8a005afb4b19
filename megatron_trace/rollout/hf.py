"""Rollout engine on `transformers`: batched sampling with a KV cache, on CPU or one GPU.

Prompts are left-padded into one batch (each repeated n times); every step runs the model on the
newest token with the cache, takes log softmax(logits / T) as the reported log-probs, applies
top-k then top-p to a copy, and samples from it with a `torch.Generator` seeded from
`params.seed`, so a seeded call is reproducible whatever else the process does. Weights are
updated in place from HF-named tensors (no reload from disk).

With per-prompt `seeds` every row has its own generator (`sample_seed(seeds[i], j)`) and each
prompt's n rows form their own batch, so a prompt's samples are bit-identical whichever engine
serves it and whatever else it is asked for (`generate_rows` is the same with explicit row seeds,
for servers that receive already-derived per-request seeds).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .base import MEMORY_TAGS, Sample, SamplingParams, sample_seed

__all__ = ["HFEngine"]


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass *before* it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class HFEngine:
    def __init__(self, model, tokenizer=None, *, eos_token_ids: Sequence[int] | None = None, device=None,
                 batch_prompts: int = 1):
        """model: a transformers causal LM. tokenizer: needed only for stop strings.

        batch_prompts: with per-prompt seeds, how many prompts share one forward batch. 1 (default)
        makes a prompt's samples bit-identical whichever engine serves it; more is faster on CPU
        (about 3x at 16 on the demo model), and then samples agree across engine counts in their
        tokens but their log-probs only to about 1e-6 (padding changes the kernels' sums).
        """
        if batch_prompts < 1:
            raise ValueError(f"rollout.hf_batch_prompts must be >= 1, got {batch_prompts}")
        self.batch_prompts = batch_prompts
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.tokenizer = tokenizer
        eos = eos_token_ids
        if eos is None:
            cfg_eos = getattr(model.config, "eos_token_id", None)
            eos = [cfg_eos] if isinstance(cfg_eos, int) else list(cfg_eos or [])
        self.eos_token_ids = tuple(eos)
        self.pad_token_id = 0
        self.weight_version = 0
        # transformers 5 renamed the KV-cache argument and output field from past_key_values to cache.
        import inspect

        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._asleep_tags: set[str] = set()

    @classmethod
    def from_pretrained(cls, hf_dir: str, *, device: str | None = None, dtype: torch.dtype = torch.float32,
                        tokenizer=None) -> HFEngine:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
        return cls(model, tokenizer, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        params = dict(self.model.named_parameters())
        n = 0
        for name, tensor in named_tensors:
            if name not in params:
                if name == "lm_head.weight" and getattr(self.model.config, "tie_word_embeddings", False):
                    continue  # tied: the embedding is the head
                raise KeyError(f"engine has no parameter {name!r}")
            p = params[name]
            if tuple(p.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: engine shape {tuple(p.shape)} != pushed {tuple(tensor.shape)}")
            p.copy_(tensor.to(p.device, p.dtype))
            n += 1
        if version is not None:
            self.weight_version = version
        return n

    def finish_sync(self, version: int) -> None:
        self.weight_version = version

    def named_parameters(self):
        return self.model.named_parameters()

    @torch.no_grad()
    def probe_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full logits `[b, s, V]` (fp32, CPU) of a right-aligned batch with no padding."""
        return self.model(input_ids.to(self.device)).logits.float().cpu()

    # ------------------------------------------------------------------ lifecycle

    @property
    def asleep(self) -> bool:
        return bool(self._asleep_tags)

    def sleep(self, tags: Sequence[str] | None = None) -> None:
        """Release accelerator memory for training. "weights": the model moves to host memory
        (on CPU there is nothing to move); "kv_cache"/"cuda_graph": this engine keeps no cache or
        graph between calls, so they only mark the engine asleep."""
        tags = set(MEMORY_TAGS if tags is None else tags)
        if tags - set(MEMORY_TAGS):
            raise ValueError(f"unknown memory tags {sorted(tags - set(MEMORY_TAGS))}; expected a subset of {MEMORY_TAGS}")
        if "weights" in tags and "weights" not in self._asleep_tags and self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._asleep_tags |= tags

    def wake(self, tags: Sequence[str] | None = None) -> None:
        tags = set(MEMORY_TAGS if tags is None else tags)
        if "weights" in tags and "weights" in self._asleep_tags and self.device.type == "cuda":
            self.model.to(self.device)
        self._asleep_tags -= tags

    def shutdown(self) -> None:
        self.model = None

    # ------------------------------------------------------------------ sampling

    def _stop_string_hit(self, token_ids: list[int], stops: Sequence[str]) -> bool:
        text = self.tokenizer.decode(token_ids)
        return any(s in text for s in stops)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Sample]:
        if seeds is None:
            return self.generate_rows([list(p) for p in prompts for _ in range(params.n)], params)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        out: list[Sample] = []
        k = self.batch_prompts  # 1: one batch per prompt, independent of what else is asked
        for start in range(0, len(prompts), k):
            ps, ss = prompts[start:start + k], seeds[start:start + k]
            out += self.generate_rows([list(p) for p in ps for _ in range(params.n)], params,
                                      [sample_seed(s, j) for s in ss for j in range(params.n)])
        return out

    @torch.no_grad()
    def generate_rows(self, rows: Sequence[Sequence[int]], params: SamplingParams,
                      row_seeds: Sequence[int] | None = None) -> list[Sample]:
        """One sample per row (params.n is ignored). row_seeds: one generator per row; without
        them one generator seeded by params.seed draws for the whole batch."""
        if self._asleep_tags:
            raise RuntimeError(f"the rollout engine is asleep (released: {sorted(self._asleep_tags)}); "
                               "wake() it before generate()")
        if params.stop and self.tokenizer is None:
            raise ValueError("sampling.stop strings need an engine built with a tokenizer")
        if not rows:
            return []
        rows = [list(r) for r in rows]
        if any(len(r) == 0 for r in rows):
            raise ValueError("empty prompt")
        if row_seeds is not None and len(row_seeds) != len(rows):
            raise ValueError(f"{len(row_seeds)} row seeds for {len(rows)} rows")
        B, L = len(rows), max(len(r) for r in rows)
        ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, L - len(r):] = torch.tensor(r)
            mask[i, L - len(r):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if row_seeds is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
            row_gens = None
        else:
            row_gens = [torch.Generator(device=self.device).manual_seed(int(x)) for x in row_seeds]
        stop_ids = torch.tensor(sorted(set(self.eos_token_ids) | set(params.stop_token_ids)), device=self.device)

        out_tokens: list[list[int]] = [[] for _ in range(B)]
        out_lps: list[list[float]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        step_ids, step_pos, step_mask = ids, position_ids, mask
        for _ in range(params.max_new_tokens):
            out = self.model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos,
                             use_cache=True, **{self._cache_kw: cache})
            cache = getattr(out, self._cache_kw)
            logits = out.logits[:, -1, :].float()
            if params.temperature > 0:
                logp = torch.log_softmax(logits / params.temperature, dim=-1)
                filtered = _filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
                probs = torch.softmax(filtered, dim=-1)
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
                elif params.stop and self._stop_string_hit(out_tokens[i], params.stop):
                    reasons[i], done[i] = "stop", True
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            step_mask = torch.cat([step_mask, torch.ones((B, 1), dtype=step_mask.dtype, device=self.device)], dim=1)
            step_pos = step_pos[:, -1:] + 1
        return [Sample(out_tokens[i], out_lps[i], reasons[i], self.weight_version) for i in range(B)]

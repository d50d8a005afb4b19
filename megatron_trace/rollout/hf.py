"""Rollout engine on `transformers`: batched sampling with a KV cache, on CPU or one GPU.

Rows (each prompt repeated n times) are left-padded into batches. A step runs the model on the
newest token with a preallocated cache (`kv_cache.GrowingCache`: written in place, no per-step
concatenation), reports log softmax(logits / T) of the sampled token, and samples every row at
once from top-k/top-p-filtered probabilities with a counter-based generator keyed by (the row's
seed, the response position) (`sampling.py`). Weights are updated in place from HF-named tensors
(no reload from disk).

Seeds. Sample j of a prompt with seed s draws from `sample_seed(s, j)`; without per-prompt seeds
the prompts get `prompt_seed(params.seed, 0, i)`. A row's tokens are therefore the same whichever
engine serves it, whatever else shares its batch and however large the batch is; log-probs agree
to float rounding (padding and batch shape change the kernels' sums by ~1e-7).

Batches. `batch_prompts="auto"` (default) packs rows, shortest prompts first, into as few batches
as `max_batch_tokens` allows (rows x (longest prompt + max_new_tokens) per batch, the KV cache's
size); an integer k makes batches of k prompts' rows in order. Rows that finish (a stop token or
string) leave the batch and its cache once a quarter of the batch has finished (`compact=False`
keeps them to the end), so compute follows the live rows.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch

from .base import MEMORY_TAGS, Sample, SamplingParams, prompt_seed, sample_seed
from .sampling import sample_next

__all__ = ["DEFAULT_MAX_BATCH_TOKENS", "HFEngine", "plan_batches"]

DEFAULT_MAX_BATCH_TOKENS = 32768
COMPACT_FRACTION = 0.25  # compact once this share of a batch has finished (see docs/LOG.md, issue 22)


def _base_seed(params: SamplingParams) -> int:
    """params.seed, or a fresh random one for an unseeded call."""
    return params.seed if params.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())


def plan_batches(lengths: Sequence[int], max_new_tokens: int, max_batch_tokens: int,
                 rows_per_batch: int | None = None) -> list[list[int]]:
    """Row indices per batch. rows_per_batch: fixed consecutive chunks. Otherwise rows sorted by
    length fill each batch while rows x (longest + max_new_tokens) <= max_batch_tokens (a batch
    always takes at least one row, however long)."""
    if rows_per_batch is not None:
        return [list(range(i, min(i + rows_per_batch, len(lengths)))) for i in range(0, len(lengths), rows_per_batch)]
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batches and (len(batches[-1]) + 1) * (lengths[i] + max_new_tokens) <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class HFEngine:
    def __init__(self, model, tokenizer=None, *, eos_token_ids: Sequence[int] | None = None, device=None,
                 batch_prompts: int | str = "auto", max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 compact: bool = True, _legacy_sampler: bool = False):
        """model: a transformers causal LM. tokenizer: needed only for stop strings.

        batch_prompts: "auto" (batches sized by max_batch_tokens) or prompts per batch.
        max_batch_tokens: the most rows x (longest prompt + max_new_tokens) one batch holds.
        compact: finished rows leave the batch. _legacy_sampler: the pre-issue-22 loop (per-row
        generators), for tools/bench_rollout.py's `tokens_per_s_ours_before` only.
        """
        if batch_prompts != "auto" and not (isinstance(batch_prompts, int) and batch_prompts >= 1):
            raise ValueError(f"rollout.hf_batch_prompts must be 'auto' or an integer >= 1, got {batch_prompts!r}")
        if max_batch_tokens < 1:
            raise ValueError(f"rollout.hf_max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if _legacy_sampler and batch_prompts == "auto":
            raise ValueError("the legacy sampler needs an integer batch_prompts")
        self.batch_prompts = batch_prompts
        self.max_batch_tokens = max_batch_tokens
        self.compact = compact
        self._legacy_sampler = _legacy_sampler
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
        fwd = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in fwd else "past_key_values"
        self._prefill_kw = {"logits_to_keep": 1} if "logits_to_keep" in fwd else {}
        self._asleep_tags: set[str] = set()

    @classmethod
    def from_pretrained(cls, hf_dir: str, *, device: str | None = None, dtype: torch.dtype = torch.float32,
                        tokenizer=None, **engine_kwargs) -> HFEngine:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
        return cls(model, tokenizer, device=device or ("cuda" if torch.cuda.is_available() else "cpu"), **engine_kwargs)

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
            base = _base_seed(params)
            seeds = [prompt_seed(base, 0, i) for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        rows = [list(p) for p in prompts for _ in range(params.n)]
        return self.generate_rows(rows, params, [sample_seed(s, j) for s in seeds for j in range(params.n)])

    def generate_rows(self, rows: Sequence[Sequence[int]], params: SamplingParams,
                      row_seeds: Sequence[int] | None = None) -> list[Sample]:
        """One sample per row (params.n only sizes integer `batch_prompts` batches). row_seeds: one
        seed per row; without them row i uses `sample_seed(params.seed, i)`."""
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
        if row_seeds is None:
            base = _base_seed(params)
            row_seeds = [sample_seed(base, i) for i in range(len(rows))]
        if len(row_seeds) != len(rows):
            raise ValueError(f"{len(row_seeds)} row seeds for {len(rows)} rows")
        per_batch = None if self.batch_prompts == "auto" else self.batch_prompts * max(1, params.n)
        out: list[Sample | None] = [None] * len(rows)
        for batch in plan_batches([len(r) for r in rows], params.max_new_tokens, self.max_batch_tokens, per_batch):
            if self._legacy_sampler:
                from .hf_legacy import legacy_generate_rows

                got = legacy_generate_rows(self, [rows[i] for i in batch], params, [row_seeds[i] for i in batch])
            else:
                got = self._decode([rows[i] for i in batch], params, [row_seeds[i] for i in batch])
            for i, sample in zip(batch, got):
                out[i] = sample
        return out

    @torch.no_grad()
    def _decode(self, rows: list[list[int]], params: SamplingParams, seeds: Sequence[int]) -> list[Sample]:
        """One left-padded batch to the end: every row samples until a stop token or string, or
        max_new_tokens. Identical prompts (a prompt's n samples) are prefilled once and their cache
        copied; finished rows leave the batch (and its cache) when compaction is on."""
        from .kv_cache import GrowingCache

        dev, B, L = self.device, len(rows), max(len(r) for r in rows)
        uniq: dict[tuple[int, ...], int] = {}
        first: list[int] = []  # a row of each distinct prompt
        src = []  # row -> its distinct prompt
        for i, r in enumerate(rows):
            u = uniq.setdefault(tuple(r), len(uniq))
            if u == len(first):
                first.append(i)
            src.append(u)
        width = L + params.max_new_tokens
        mask = torch.ones((B, width), dtype=torch.long)  # columns past the prompt are the responses
        pads = [L - len(r) for r in rows]
        for i in range(B):
            mask[i, :pads[i]] = 0
        ids = torch.full((len(uniq), L), self.pad_token_id, dtype=torch.long)
        for r, u in uniq.items():
            ids[u, L - len(r):] = torch.tensor(r)
        src_t = torch.tensor(src, dtype=torch.long, device=dev)
        mask = mask.to(dev)
        pos = (mask[first, :L].cumsum(-1) - 1).clamp(min=0)
        cache = GrowingCache(self.model.config.num_hidden_layers, width)
        out = self.model(input_ids=ids.to(dev), attention_mask=mask[first, :L], position_ids=pos, use_cache=True,
                         **{self._cache_kw: cache}, **self._prefill_kw)
        logits = out.logits[:, -1, :].float()
        if len(uniq) < B:
            cache.keep(src_t)
            logits, pos = logits[src_t], pos[src_t]
        step_pos = pos[:, -1:]
        seeds_t = torch.tensor([int(x) for x in seeds], dtype=torch.int64, device=dev)
        stop_ids = torch.tensor(sorted(set(self.eos_token_ids) | set(params.stop_token_ids)), dtype=torch.long,
                                device=dev)
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        live = list(range(B))  # batch row -> input row; -1 once finished but not yet compacted away
        n_live, seen, dropped = B, L, 0  # seen: columns in the cache
        for t in range(params.max_new_tokens):
            nxt, lp = sample_next(logits, seeds_t, t, params.temperature, params.top_k, params.top_p)
            nxt_l, lp_l = nxt.tolist(), lp.tolist()
            hit = torch.isin(nxt, stop_ids).tolist() if stop_ids.numel() else [False] * len(live)
            for j, i in enumerate(live):
                if i < 0:
                    continue
                tokens[i].append(nxt_l[j])
                logps[i].append(lp_l[j])
                if hit[j] or (params.stop and self._stop_string_hit(tokens[i], params.stop)):
                    reasons[i], live[j] = "stop", -1
                    n_live -= 1
            if n_live == 0 or t + 1 == params.max_new_tokens:
                break
            if self.compact and len(live) - n_live >= max(1.0, COMPACT_FRACTION * len(live)):
                keep = [j for j, i in enumerate(live) if i >= 0]
                drop = min(pads[live[j]] for j in keep) - dropped  # padding no remaining row needs
                dropped += drop
                idx = torch.tensor(keep, dtype=torch.long, device=dev)
                cache.keep(idx, drop)
                mask, seen = mask[idx, drop:], seen - drop
                nxt, step_pos, seeds_t = nxt[idx], step_pos[idx], seeds_t[idx]
                live = [live[j] for j in keep]
            seen, step_pos = seen + 1, step_pos + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=mask[:, :seen], position_ids=step_pos,
                             use_cache=True, **{self._cache_kw: cache})
            logits = out.logits[:, -1, :].float()
        return [Sample(tokens[i], logps[i], reasons[i], self.weight_version) for i in range(B)]

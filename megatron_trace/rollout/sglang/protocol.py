"""SGLang 0.5.6's request and answer shapes, shared by the colocated engine and the HTTP client:
our `SamplingParams` -> SGLang's `sampling_params` (one dict per sample row, with its seed), one
SGLang output dict -> `Sample`, memory tags, and the error type every remote call raises."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..base import MEMORY_TAGS, Sample, SamplingParams, sample_seed

__all__ = ["DEFAULT_GROUP_NAME", "EngineRequestError", "import_sglang", "parse_output", "refuse_if_asleep",
           "to_sglang_sampling_params"]

_INSTALL_HINT = ("SGLang is not installed: pip install -e '.[sglang]' (pins sglang==0.5.6 and with it torch 2.9.1: "
                 "use the GPU image of docker/Dockerfile, docs/install.md)")
DEFAULT_GROUP_NAME = "megatron_trace_weights"


def import_sglang():
    try:
        import sglang
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return sglang


class EngineRequestError(RuntimeError):
    """A request to a rollout server failed: unreachable, timed out, an HTTP error status, or an
    answer with success=false. `url` is the server, `endpoint` the path, `status` the HTTP status
    (None when no answer came)."""

    def __init__(self, url: str, endpoint: str, message: str, status: int | None = None):
        self.url, self.endpoint, self.status, self.detail = url, endpoint, status, message
        super().__init__(f"SGLang server {url} failed on {endpoint}"
                         + (f" (HTTP {status})" if status is not None else "") + f": {message}")


# --------------------------------------------------------------------------- translation


def to_sglang_sampling_params(params: SamplingParams, seed: int | None = None) -> dict:
    """Our SamplingParams -> SGLang's sampling_params dict (n is expanded by the caller)."""
    out = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "skip_special_tokens": False,
        "no_stop_trim": True,  # keep the stop token, as the hf engine does
    }
    if params.stop:
        out["stop"] = list(params.stop)
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    if seed is not None:
        out["sampling_seed"] = int(seed)
    return out


def parse_output(out: dict, weight_version: int) -> Sample:
    """One SGLang output dict -> Sample. weight_version: the client's version when the request
    was sent. A request that was paused and resumed under newer weights reports the server's
    newer version in meta_info; the sample keeps the older of the two (its oldest tokens')."""
    meta = out.get("meta_info", {})
    try:
        weight_version = min(weight_version, int(meta.get("weight_version")))
    except (TypeError, ValueError):  # a server that never had a version says "default"
        pass
    token_ids = list(out.get("output_ids") or [])
    lps = [float(x[0]) for x in meta.get("output_token_logprobs", [])]
    if len(lps) != len(token_ids):
        raise ValueError(f"SGLang returned {len(token_ids)} tokens but {len(lps)} log-probs (return_logprob=True?)")
    reason = (meta.get("finish_reason") or {}).get("type", "abort")
    return Sample(token_ids, lps, reason if reason in ("stop", "length", "abort") else "abort", weight_version)


def _expand(prompts: Sequence[Sequence[int]], params: SamplingParams,
            seeds: Sequence[int] | None = None) -> tuple[list[list[int]], list[dict]]:
    """One row and one sampling_params dict per sample, prompt-major."""
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    rows, sps = [], []
    for i, p in enumerate(prompts):
        for j in range(params.n):
            rows.append(list(p))
            if seeds is not None:
                seed = sample_seed(seeds[i], j)
            else:
                seed = None if params.seed is None else params.seed * 1_000_003 + i * params.n + j
            sps.append(to_sglang_sampling_params(params, seed))
    return rows, sps


def _tag_list(tags: Sequence[str] | None) -> list[str]:
    tags = list(MEMORY_TAGS if tags is None else tags)
    unknown = sorted(set(tags) - set(MEMORY_TAGS))
    if unknown:
        raise ValueError(f"unknown memory tags {unknown}; expected a subset of {MEMORY_TAGS}")
    return [t for t in MEMORY_TAGS if t in tags]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # "float32", "bfloat16": SGLang does getattr(torch, name)



def refuse_if_asleep(released: set[str], who: str) -> None:
    if released:
        raise RuntimeError(f"{who} is asleep (released: {sorted(released)}); wake() it before generate()")


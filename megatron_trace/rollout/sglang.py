"""SGLang rollout engine (GPU only). Pinned version: sglang[srt]==0.5.6, the `sglang` extra.

Colocated mode, `sglang.Engine` in the trainer's process, one RL step:
  1. resume_memory_occupation(tags=["weights"])                 wake() part 1
  2. update_weights_from_tensor(named_tensors=bucket, flush_cache=False)   per bucket (HF names;
     SGLang's loader fuses q/k/v and gate/up and applies its own TP slicing)
  3. flush_cache()                                               after the last bucket
  4. resume_memory_occupation(tags=["kv_cache"])                 wake() part 2
  5. generate(input_ids=[[...]], sampling_params={...}, return_logprob=True)
     with skip_tokenizer_init=True: token ids in, `output_ids` and
     meta_info["output_token_logprobs"] = [(logprob, token_id, None), ...] out
  6. release_memory_occupation(tags=["kv_cache", "weights"])    sleep() before training
The engine must be created with enable_memory_saver=True for 1/4/6.

Remote mode, an `sglang.launch_server` process:
  POST /generate                       {"input_ids", "sampling_params", "return_logprob": true}
  POST /init_weights_update_group      {"master_address", "master_port", "rank_offset", "world_size",
                                        "group_name", "backend"}
  POST /update_weights_from_distributed {"names", "dtypes", "shapes", "group_name", "flush_cache"}
       while the trainer broadcasts each tensor (rank 0 of that group) in the same order
  POST /update_weights_from_disk       {"model_path"}   (fallback: a checkpoint on shared storage)
  POST /flush_cache, /release_memory_occupation, /resume_memory_occupation

Log-probs are SGLang's default: log softmax(logits / temperature), before top-k/top-p.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterable, Sequence

import torch

from .base import Sample, SamplingParams

__all__ = ["RemoteSGLangEngine", "SGLangEngine", "parse_output", "to_sglang_sampling_params"]

_INSTALL_HINT = "SGLang is not installed: pip install -e '.[sglang]' (GPU image; pins sglang[srt]==0.5.6)"


def _import_sglang():
    try:
        import sglang
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return sglang


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
        out["sampling_seed"] = seed
    return out


def parse_output(out: dict, weight_version: int) -> Sample:
    """One SGLang output dict -> Sample."""
    meta = out.get("meta_info", {})
    token_ids = list(out.get("output_ids") or [])
    lps = [float(x[0]) for x in meta.get("output_token_logprobs", [])]
    if len(lps) != len(token_ids):
        raise ValueError(f"SGLang returned {len(token_ids)} tokens but {len(lps)} log-probs (return_logprob=True?)")
    reason = (meta.get("finish_reason") or {}).get("type", "abort")
    return Sample(token_ids, lps, reason if reason in ("stop", "length", "abort") else "abort", weight_version)


def _expand(prompts: Sequence[Sequence[int]], params: SamplingParams) -> tuple[list[list[int]], list[dict]]:
    rows, sps = [], []
    for i, p in enumerate(prompts):
        for j in range(params.n):
            rows.append(list(p))
            seed = None if params.seed is None else params.seed * 1_000_003 + i * params.n + j
            sps.append(to_sglang_sampling_params(params, seed))
    return rows, sps


class SGLangEngine:
    """In-process (colocated) `sglang.Engine`."""

    def __init__(self, engine):
        self.engine = engine
        self.weight_version = 0

    @classmethod
    def launch(cls, model_path: str, *, tp_size: int = 1, mem_fraction_static: float = 0.5, **server_args) -> SGLangEngine:
        sglang = _import_sglang()
        engine = sglang.Engine(model_path=model_path, tp_size=tp_size, mem_fraction_static=mem_fraction_static,
                               enable_memory_saver=True, skip_tokenizer_init=True, **server_args)
        return cls(engine)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Sample]:
        rows, sps = _expand(prompts, params)
        if not rows:
            return []
        outs = self.engine.generate(input_ids=rows, sampling_params=sps, return_logprob=True)
        return [parse_output(o, self.weight_version) for o in outs]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        bucket = list(named_tensors)
        self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False)
        if version is not None:
            self.finish_sync(version)
        return len(bucket)

    def finish_sync(self, version: int) -> None:
        self.engine.flush_cache()
        self.weight_version = version

    def sleep(self) -> None:
        self.engine.release_memory_occupation(tags=["kv_cache", "weights"])

    def wake(self) -> None:
        self.engine.resume_memory_occupation(tags=["weights"])
        self.engine.resume_memory_occupation(tags=["kv_cache"])

    def shutdown(self) -> None:
        self.engine.shutdown()


class RemoteSGLangEngine:
    """An SGLang HTTP server (`python -m sglang.launch_server ...`)."""

    def __init__(self, base_url: str, timeout_s: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.weight_version = 0

    def _post(self, path: str, payload: dict):
        req = urllib.request.Request(self.base_url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Sample]:
        rows, sps = _expand(prompts, params)
        if not rows:
            return []
        outs = self._post("/generate", {"input_ids": rows, "sampling_params": sps, "return_logprob": True})
        if isinstance(outs, dict):
            outs = [outs]
        return [parse_output(o, self.weight_version) for o in outs]

    def update_weights_from_disk(self, model_path: str, version: int) -> None:
        res = self._post("/update_weights_from_disk", {"model_path": model_path})
        if isinstance(res, dict) and res.get("success") is False:
            raise RuntimeError(f"SGLang refused update_weights_from_disk: {res.get('message')}")
        self.weight_version = version

    def init_weights_update_group(self, master_address: str, master_port: int, world_size: int,
                                  group_name: str = "megatron_trace_sync", backend: str = "nccl"):
        """Join the server's ranks (offset 1) with this trainer process (rank 0) in a new group."""
        payload = {"master_address": master_address, "master_port": master_port, "rank_offset": 1,
                   "world_size": world_size, "group_name": group_name, "backend": backend}
        t = threading.Thread(target=self._post, args=("/init_weights_update_group", payload))
        t.start()
        store = torch.distributed.TCPStore(master_address, master_port, world_size, is_master=True)
        pg = torch.distributed.ProcessGroupNCCL(store, 0, world_size) if backend == "nccl" else \
            torch.distributed.ProcessGroupGloo(store, 0, world_size)
        t.join()
        self._group, self._group_name = pg, group_name
        return pg

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        """Broadcast a bucket through the update group (init_weights_update_group first)."""
        bucket = list(named_tensors)
        payload = {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                   "shapes": [list(t.shape) for _, t in bucket], "group_name": self._group_name,
                   "flush_cache": version is not None}
        t = threading.Thread(target=self._post, args=("/update_weights_from_distributed", payload))
        t.start()
        for _, tensor in bucket:
            self._group.broadcast([tensor.contiguous()], 0).wait()
        t.join()
        if version is not None:
            self.weight_version = version
        return len(bucket)

    def finish_sync(self, version: int) -> None:
        self._post("/flush_cache", {})
        self.weight_version = version

    def sleep(self) -> None:
        self._post("/release_memory_occupation", {"tags": ["kv_cache", "weights"]})

    def wake(self) -> None:
        self._post("/resume_memory_occupation", {"tags": ["weights"]})
        self._post("/resume_memory_occupation", {"tags": ["kv_cache"]})

    def shutdown(self) -> None:
        pass  # the server's lifetime belongs to its launcher

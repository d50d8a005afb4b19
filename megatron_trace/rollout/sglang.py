"""SGLang rollout engines. Pinned version: sglang[srt]==0.5.6, the `sglang` extra (GPU only).

Colocated mode (`SGLangEngine`, an `sglang.Engine` in the trainer's process), one RL step:
  1. resume_memory_occupation(tags=["weights"])                 wake(["weights"])
  2. update_weights_from_tensor(named_tensors=bucket, flush_cache=False)   per bucket (HF names;
     SGLang's loader fuses q/k/v and gate/up and applies its own TP slicing)
  3. flush_cache()                                               finish_sync(version)
  4. resume_memory_occupation(tags=["kv_cache"])                 wake(["kv_cache"])
  5. generate(input_ids=[[...]], sampling_params=[{...}], return_logprob=True)
     with skip_tokenizer_init=True: token ids in, `output_ids` and
     meta_info["output_token_logprobs"] = [(logprob, token_id, None), ...] out
  6. release_memory_occupation(tags=["kv_cache", "weights"])    sleep() before training
The engine is created with enable_memory_saver=True for 1/4/6.

Remote mode (`RemoteSGLangEngine`, one `sglang.launch_server` process, or a router in front of
several for generation). HTTP protocol of 0.5.6 (`sglang/srt/entrypoints/http_server.py`):
  POST /generate                        {"input_ids", "sampling_params", "return_logprob": true}
  GET  /health, /get_server_info (its "tp_size" sets the server's ranks in a weight group)
  POST /init_weights_update_group       {"master_address", "master_port", "rank_offset",
                                         "world_size", "group_name", "backend"}
  POST /update_weights_from_distributed {"names", "dtypes", "shapes", "group_name", "flush_cache"}
       while trainer rank 0 broadcasts each tensor, in the same order, over that group
  POST /destroy_weights_update_group    {"group_name"}
  POST /update_weights_from_disk        {"model_path"}   (fallback: a checkpoint on shared storage)
  POST /flush_cache                     plain-text answer; 400 while requests are running
  POST /update_weight_version           {"new_version", "abort_all_requests"}
  POST /release_memory_occupation, /resume_memory_occupation   {"tags": [...]}
Answers: the weight calls return {"success", "message"} (HTTP 400 when success is false); the
memory calls return `null` on success and {"error": {"message"}} with HTTP 400 on failure.
Every call here checks the answer and raises `EngineRequestError` naming the server and endpoint.

A weight sync to a fleet of servers is ONE broadcast from trainer rank 0 to every server's ranks:
`RemoteWeightGroup.connect(engines, master_address, master_port, ...)` builds the group (server i
joins as ranks 1 + sum of the previous servers' tp sizes), `push(bucket)` announces the bucket to
every server and broadcasts it once. The group offers `update_weights`/`finish_sync`, so it can
stand in for the engine in `sync.sync_weights`. The trainer side of the group is created like
SGLang's own (`sync.remote_group.init_custom_process_group`).

Seeds: sample j of prompt i carries `sampling_seed = sample_seed(seeds[i], j)`. SGLang honours a
per-request sampling_seed only when the server runs with `enable_deterministic_inference`.

Log-probs are SGLang's default: log softmax(logits / temperature), before top-k/top-p.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

import torch

from .base import MEMORY_TAGS, Sample, SamplingParams, sample_seed

__all__ = ["EngineRequestError", "RemoteSGLangEngine", "RemoteWeightGroup", "SGLangEngine", "connect",
           "parse_output", "to_sglang_sampling_params"]

log = logging.getLogger(__name__)

_INSTALL_HINT = "SGLang is not installed: pip install -e '.[sglang]' (GPU image; pins sglang[srt]==0.5.6)"
DEFAULT_GROUP_NAME = "megatron_trace_weights"


def _import_sglang():
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
    """One SGLang output dict -> Sample."""
    meta = out.get("meta_info", {})
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


# --------------------------------------------------------------------------- colocated


def _refuse_if_asleep(released: set[str], who: str) -> None:
    if released:
        raise RuntimeError(f"{who} is asleep (released: {sorted(released)}); wake() it before generate()")


class SGLangEngine:
    """In-process (colocated) `sglang.Engine`."""

    def __init__(self, engine):
        self.engine = engine
        self.weight_version = 0
        self._asleep: set[str] = set()

    @classmethod
    def launch(cls, model_path: str, *, tp_size: int = 1, base_gpu_id: int = 0, mem_fraction_static: float = 0.5,
               **server_args) -> SGLangEngine:
        """Start `sglang.Engine` on GPUs [base_gpu_id, base_gpu_id + tp_size). server_args go to
        SGLang's ServerArgs (e.g. dtype, enable_deterministic_inference, random_seed)."""
        sglang = _import_sglang()
        kwargs = {"enable_memory_saver": True, "skip_tokenizer_init": True, **server_args}
        engine = sglang.Engine(model_path=model_path, tp_size=tp_size, base_gpu_id=base_gpu_id,
                               mem_fraction_static=mem_fraction_static, **kwargs)
        return cls(engine)

    @property
    def asleep(self) -> bool:
        return bool(self._asleep)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Sample]:
        _refuse_if_asleep(self._asleep, "the SGLang engine")
        rows, sps = _expand(prompts, params, seeds)
        if not rows:
            return []
        outs = self.engine.generate(input_ids=rows, sampling_params=sps, return_logprob=True)
        if isinstance(outs, dict):
            outs = [outs]
        return [parse_output(o, self.weight_version) for o in outs]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        bucket = list(named_tensors)
        res = self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False)
        if isinstance(res, tuple) and len(res) >= 2 and not res[0]:
            raise RuntimeError(f"sglang.Engine.update_weights_from_tensor failed: {res[1]}")
        if version is not None:
            self.finish_sync(version)
        return len(bucket)

    def finish_sync(self, version: int) -> None:
        res = self.engine.flush_cache()
        if getattr(res, "success", True) is False:
            raise RuntimeError("sglang.Engine.flush_cache refused (requests still running?)")
        self.weight_version = version

    def sleep(self, tags: Sequence[str] | None = None) -> None:
        todo = [t for t in _tag_list(tags) if t not in self._asleep]
        if todo:
            self.engine.release_memory_occupation(tags=todo)
            self._asleep |= set(todo)

    def wake(self, tags: Sequence[str] | None = None) -> None:
        # SGLang's resume removes each tag from its released set and fails for one never released.
        todo = [t for t in _tag_list(tags) if t in self._asleep]
        if todo:
            self.engine.resume_memory_occupation(tags=todo)
            self._asleep -= set(todo)

    def shutdown(self) -> None:
        self.engine.shutdown()


# --------------------------------------------------------------------------- remote

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # cluster-internal: never via a proxy


def _error_message(body) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in body:
            return str(body["message"])
    return str(body)[:2000] if body not in (None, "") else "no details"


class RemoteSGLangEngine:
    """One SGLang HTTP server (`python -m sglang.launch_server ...`), or an `sglang-router` URL.

    timeout_s bounds generation and weight calls; health_timeout_s bounds `health()`.

    router=True: the URL is an sglang-router, which (0.3.2) takes ONE sampling_params dict per
    /generate request (a list is a 422). Every sample is then its own request (single input_ids,
    its own sampling_seed), `max_concurrency` in flight, so the router spreads them over its
    workers. Weight and memory calls go to each server, never to a router.
    """

    def __init__(self, base_url: str, timeout_s: float = 600.0, health_timeout_s: float = 5.0, *,
                 router: bool = False, max_concurrency: int = 32):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.health_timeout_s = health_timeout_s
        self.router = router
        self.max_concurrency = max(1, int(max_concurrency))
        self.weight_version = 0
        self._asleep: set[str] = set()
        self._tp_size: int | None = None
        self._own_group: RemoteWeightGroup | None = None  # from init_weights_update_group (one-server fleet)
        self._member_of: RemoteWeightGroup | None = None

    def __repr__(self) -> str:
        return f"RemoteSGLangEngine({self.base_url!r})"

    # ------------------------------------------------------------------ HTTP

    def request(self, method: str, endpoint: str, payload: dict | None = None, *, timeout: float | None = None):
        """Send one request; returns the decoded JSON answer (text if not JSON, None if empty).
        Raises EngineRequestError on a connection failure, a timeout or an HTTP error status."""
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        req = urllib.request.Request(self.base_url + endpoint, data=data, headers=headers, method=method)
        t = self.timeout_s if timeout is None else timeout
        try:
            with _OPENER.open(req, timeout=t) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read() if exc.fp is not None else b""
            raise EngineRequestError(self.base_url, endpoint, _error_message(_decode(raw)), exc.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                msg = f"no answer within {t:g} s"
            else:
                msg = f"cannot reach the server ({reason})"
            raise EngineRequestError(self.base_url, endpoint, msg) from None
        return _decode(body)

    def call(self, endpoint: str, payload: dict | None = None, *, timeout: float | None = None):
        """POST a control request and check its answer: HTTP errors and {"success": false} raise
        EngineRequestError; `null` (the memory calls) and {"success": true, ...} pass."""
        if self.router:
            raise RuntimeError(f"{self.base_url} is a router: send {endpoint} to each server (RemoteSGLangEngine "
                               "per worker URL), not through the router")
        res = self.request("POST", endpoint, {} if payload is None else payload, timeout=timeout)
        if isinstance(res, dict) and res.get("success") is False:
            raise EngineRequestError(self.base_url, endpoint, _error_message(res))
        if isinstance(res, dict) and "error" in res:
            raise EngineRequestError(self.base_url, endpoint, _error_message(res))
        return res

    # ------------------------------------------------------------------ info

    def health(self) -> bool:
        """GET /health within health_timeout_s; False on any failure."""
        try:
            self.request("GET", "/health", timeout=self.health_timeout_s)
            return True
        except EngineRequestError:
            return False

    def server_info(self) -> dict:
        res = self.request("GET", "/get_server_info", timeout=max(self.health_timeout_s, 30.0))
        if not isinstance(res, dict):
            raise EngineRequestError(self.base_url, "/get_server_info", f"expected a JSON object, got {res!r:.200}")
        return res

    def model_info(self) -> dict:
        return self.request("GET", "/get_model_info", timeout=max(self.health_timeout_s, 30.0))

    @property
    def tp_size(self) -> int:
        """The server's number of TP ranks (/get_server_info "tp_size"; 1 if it does not say)."""
        if self._tp_size is None:
            self._tp_size = int(self.server_info().get("tp_size") or 1)
        return self._tp_size

    # ------------------------------------------------------------------ generation

    @property
    def asleep(self) -> bool:
        return bool(self._asleep)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Sample]:
        _refuse_if_asleep(self._asleep, f"the SGLang server {self.base_url}")
        rows, sps = _expand(prompts, params, seeds)
        if not rows:
            return []
        if self.router:
            def one(k: int):
                return self.request("POST", "/generate",
                                    {"input_ids": rows[k], "sampling_params": sps[k], "return_logprob": True})

            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(rows)),
                                    thread_name_prefix="sglang-gen") as pool:
                outs = list(pool.map(one, range(len(rows))))
        else:
            outs = self.request("POST", "/generate", {"input_ids": rows, "sampling_params": sps,
                                                      "return_logprob": True})
        if isinstance(outs, dict):
            outs = [outs]
        if not isinstance(outs, list) or len(outs) != len(rows):
            raise EngineRequestError(self.base_url, "/generate",
                                     f"expected {len(rows)} outputs, got {type(outs).__name__} "
                                     f"{len(outs) if isinstance(outs, list) else ''}")
        try:
            return [parse_output(o, self.weight_version) for o in outs]
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise EngineRequestError(self.base_url, "/generate", f"malformed output: {exc}") from None

    # ------------------------------------------------------------------ memory

    def sleep(self, tags: Sequence[str] | None = None) -> None:
        """POST /release_memory_occupation for the tags not yet released (None = all)."""
        todo = [t for t in _tag_list(tags) if t not in self._asleep]
        if todo:
            self.call("/release_memory_occupation", {"tags": todo})
            self._asleep |= set(todo)

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """POST /resume_memory_occupation for the released ones among tags (None = all released).
        SGLang fails on resuming a tag it never released, so only released tags are sent."""
        todo = [t for t in _tag_list(tags) if t in self._asleep]
        if todo:
            self.call("/resume_memory_occupation", {"tags": todo})
            self._asleep -= set(todo)

    def flush_cache(self) -> None:
        """POST /flush_cache (SGLang answers 400 while requests are running or waiting)."""
        self.request("POST", "/flush_cache", {})

    # ------------------------------------------------------------------ weights

    def update_weight_version(self, version: int) -> None:
        self.call("/update_weight_version", {"new_version": str(version), "abort_all_requests": False})

    def update_weights_from_disk(self, model_path: str, version: int) -> None:
        self.call("/update_weights_from_disk", {"model_path": model_path, "weight_version": str(version)})
        self.weight_version = version

    def init_weights_update_group(self, master_address: str, master_port: int, *, backend: str = "nccl",
                                  group_name: str = DEFAULT_GROUP_NAME,
                                  timeout_s: float = 600.0) -> RemoteWeightGroup:
        """A weight group of this server alone (trainer = rank 0); then `update_weights` works on
        this engine directly. For several servers use `RemoteWeightGroup.connect` (one broadcast)."""
        if self._own_group is not None:
            raise RuntimeError(f"{self.base_url} already has a weight group; close it first")
        self._own_group = RemoteWeightGroup.connect([self], master_address, master_port, backend=backend,
                                                    group_name=group_name, timeout_s=timeout_s)
        return self._own_group

    def _single_group(self) -> RemoteWeightGroup:
        group = self._own_group or self._member_of
        if group is None:
            raise RuntimeError(f"no weight group to {self.base_url}: call init_weights_update_group(...) or "
                               "RemoteWeightGroup.connect([...]) first")
        if len(group.engines) > 1:
            raise RuntimeError(f"{self.base_url} is one of {len(group.engines)} servers in weight group "
                               f"{group.group_name!r}; push through the RemoteWeightGroup (one broadcast to all)")
        return group

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        """Broadcast a bucket through this engine's one-server weight group."""
        group = self._single_group()
        n = group.push(named_tensors)
        if version is not None:
            group.finish_sync(version)
        return n

    def finish_sync(self, version: int) -> None:
        """Flush the server's cache and record the version (the server's too)."""
        self.flush_cache()
        self.update_weight_version(version)
        self.weight_version = version

    def shutdown(self) -> None:
        """Closes this engine's own weight group; the server's lifetime belongs to its launcher."""
        if self._own_group is not None:
            try:
                self._own_group.close()
            finally:
                self._own_group = None


def _decode(raw: bytes):
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw.decode(errors="replace")


# --------------------------------------------------------------------------- fleet weight sync


class RemoteWeightGroup:
    """Trainer rank 0 plus the ranks of every server, in one process group for weight broadcasts.

    Build it with `RemoteWeightGroup.connect(...)` (or the module-level `connect`) on the trainer
    rank that owns the rollout fleet. `push(bucket)` announces the bucket to every server and
    broadcasts each tensor once; `update_weights`/`finish_sync` make the group usable as the
    `engine` of `sync.sync_weights`.
    """

    def __init__(self, engines: Sequence[RemoteSGLangEngine], pg, *, group_name: str, backend: str,
                 world_size: int, rank_offsets: Sequence[int], timeout_s: float):
        self.engines = list(engines)
        self.pg = pg
        self.group_name = group_name
        self.backend = backend
        self.world_size = world_size
        self.rank_offsets = list(rank_offsets)
        self.timeout_s = timeout_s
        self.weight_version = min((e.weight_version for e in self.engines), default=0)
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, engines: Sequence[RemoteSGLangEngine], master_address: str, master_port: int, *,
                backend: str = "nccl", group_name: str = DEFAULT_GROUP_NAME, timeout_s: float = 600.0,
                tp_sizes: Sequence[int] | None = None) -> RemoteWeightGroup:
        """POST /init_weights_update_group to every server at once and join as rank 0.

        Server i gets rank_offset = 1 + the tp sizes of servers 0..i-1 (from /get_server_info
        unless `tp_sizes` is given); world_size = 1 + their sum. master_address:master_port must
        be reachable from the servers; this process hosts the rendezvous store there.
        """
        from ..sync.remote_group import init_custom_process_group

        engines = list(engines)
        if not engines:
            raise ValueError("RemoteWeightGroup.connect needs at least one server")
        sizes = [e.tp_size for e in engines] if tp_sizes is None else [int(s) for s in tp_sizes]
        if len(sizes) != len(engines):
            raise ValueError(f"{len(sizes)} tp sizes for {len(engines)} servers")
        offsets, nxt = [], 1
        for s in sizes:
            offsets.append(nxt)
            nxt += s
        world_size = nxt
        pool = ThreadPoolExecutor(max_workers=len(engines), thread_name_prefix="wgroup-connect")
        try:
            futs = [pool.submit(e.call, "/init_weights_update_group",
                                {"master_address": master_address, "master_port": int(master_port), "rank_offset": off,
                                 "world_size": world_size, "group_name": group_name, "backend": backend},
                                timeout=timeout_s + 30)
                    for e, off in zip(engines, offsets)]
            # rank 0's join runs in a daemon thread: if a server refuses, it would block until the
            # timeout, and a pool thread would hold up interpreter exit that long
            own = _in_daemon_thread(init_custom_process_group, backend, f"tcp://{master_address}:{int(master_port)}",
                                    world_size, 0, group_name, timedelta(seconds=timeout_s))
            # A server that refuses answers at once while rank 0 would wait for it until the
            # timeout: fail on the first refusal, naming the server.
            _wait_all(futs + [own], engines + [None], "/init_weights_update_group", fail_fast=True)
            pg = own.result()
        finally:
            pool.shutdown(wait=False)
        group = cls(engines, pg, group_name=group_name, backend=backend, world_size=world_size, rank_offsets=offsets,
                    timeout_s=timeout_s)
        for e in engines:
            e._member_of = group
        log.info("weight group %r: trainer rank 0 + %s (world %d, %s)", group_name,
                 ", ".join(f"{e.base_url} @ rank {o}" for e, o in zip(engines, offsets)), world_size, backend)
        return group

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, flush_cache: bool = False,
             weight_version: int | None = None) -> int:
        """Announce the bucket to every server (POST /update_weights_from_distributed, at once) and
        broadcast each tensor from rank 0 in that order; raises EngineRequestError naming every
        server that did not answer success."""
        if self.pg is None:
            raise RuntimeError(f"weight group {self.group_name!r} is closed")
        bucket = [(name, t.detach().contiguous()) for name, t in named_tensors]
        if not bucket:
            return 0
        if self.backend == "nccl":
            bucket = [(n, t if t.is_cuda else t.cuda()) for n, t in bucket]
        payload = {"names": [n for n, _ in bucket], "dtypes": [_dtype_name(t.dtype) for _, t in bucket],
                   "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                   "flush_cache": bool(flush_cache)}
        if weight_version is not None:
            payload["weight_version"] = str(weight_version)
        import torch.distributed as dist

        with self._lock:
            pool = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="wgroup-push")
            try:
                futs = [pool.submit(e.call, "/update_weights_from_distributed", payload, timeout=self.timeout_s)
                        for e in self.engines]
                try:
                    for _, t in bucket:
                        dist.broadcast(t, src=0, group=self.pg)
                except Exception as exc:
                    # a server that refused at once never joined the broadcast: name it if so
                    refused = [f"{e.base_url}: {f.exception()}" for e, f in zip(self.engines, futs)
                               if f.done() and f.exception() is not None]
                    raise RuntimeError(f"weight broadcast over group {self.group_name!r} failed: {exc}"
                                       + (f"; servers that refused: {'; '.join(refused)}" if refused else "")) from exc
                _wait_all(futs, self.engines, "/update_weights_from_distributed")
            finally:
                pool.shutdown(wait=False)
        if weight_version is not None:
            self._set_version(weight_version)
        return len(bucket)

    # the engine-like face used by sync.sync_weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        n = self.push(named_tensors)
        if version is not None:
            self.finish_sync(version)
        return n

    def finish_sync(self, version: int) -> None:
        """After the last bucket: flush every server's cache and set its weight version."""
        with ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="wgroup-finish") as pool:
            futs = [pool.submit(e.finish_sync, version) for e in self.engines]
            _wait_all(futs, self.engines, "/flush_cache + /update_weight_version")
        self._set_version(version)

    def _set_version(self, version: int) -> None:
        self.weight_version = version
        for e in self.engines:
            e.weight_version = version

    def close(self) -> None:
        """POST /destroy_weights_update_group to every server and destroy rank 0's group."""
        if self.pg is None:
            return
        from ..sync.remote_group import destroy_custom_process_group

        errors = []
        for e in self.engines:
            try:
                e.call("/destroy_weights_update_group", {"group_name": self.group_name}, timeout=60)
            except EngineRequestError as exc:
                errors.append(exc)
            if e._member_of is self:
                e._member_of = None
            if e._own_group is self:
                e._own_group = None
        pg, self.pg = self.pg, None
        destroy_custom_process_group(pg)
        if errors:
            raise errors[0]

    def __enter__(self) -> RemoteWeightGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(engines: Sequence[RemoteSGLangEngine], master_address: str, master_port: int, backend: str = "nccl",
            group_name: str = DEFAULT_GROUP_NAME, *, timeout_s: float = 600.0,
            tp_sizes: Sequence[int] | None = None) -> RemoteWeightGroup:
    """`RemoteWeightGroup.connect`: one weight-update group from trainer rank 0 to all servers."""
    return RemoteWeightGroup.connect(engines, master_address, master_port, backend=backend, group_name=group_name,
                                     timeout_s=timeout_s, tp_sizes=tp_sizes)


def _in_daemon_thread(fn, *args) -> Future:
    fut: Future = Future()

    def run():
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="wgroup-rank0").start()
    return fut


def _wait_all(futs, engines, endpoint: str, *, fail_fast: bool = False) -> None:
    """Wait for the futures and raise, naming every server that failed (a single failure passes
    through unchanged). fail_fast: stop waiting at the first failure (for calls that would block
    on the refusing server). Futures whose engine is None are local work."""
    from concurrent.futures import ALL_COMPLETED, FIRST_EXCEPTION, wait

    pending = set(futs)
    while pending:
        done, pending = wait(pending, return_when=FIRST_EXCEPTION if fail_fast else ALL_COMPLETED)
        if any(f.exception() is not None for f in done):
            break
    failed = [(e, f.exception()) for e, f in zip(engines, futs) if f.done() and f.exception() is not None]
    if not failed:
        return
    if len(failed) == 1:
        raise failed[0][1]
    local = [x for e, x in failed if e is None]
    if local:
        raise local[0]
    urls = ", ".join(e.base_url for e, _ in failed)
    detail = "; ".join(f"{e.base_url}" + (f" (HTTP {x.status})" if getattr(x, "status", None) else "")
                       + f": {getattr(x, 'detail', x)}" for e, x in failed)
    raise EngineRequestError(urls, endpoint, detail) from failed[0][1]

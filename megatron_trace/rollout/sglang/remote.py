"""Remote SGLang: one `python -m sglang.launch_server` over HTTP, or an `sglang-router` in front
of several (for generation only).

The HTTP protocol of 0.5.6 (`sglang/srt/entrypoints/http_server.py`) this client speaks:
  POST /generate                        {"input_ids", "sampling_params", "return_logprob": true}
  GET  /health, /get_server_info (its "tp_size" sets the server's ranks in a weight group)
  POST /init_weights_update_group       {"master_address", "master_port", "rank_offset",
                                         "world_size", "group_name", "backend"}
  POST /update_weights_from_distributed {"names", "dtypes", "shapes", "group_name", "flush_cache"}
       while trainer rank 0 broadcasts each tensor, in the same order, over that group; the
       server takes its model-update lock first, so it waits while requests are in flight
  POST /destroy_weights_update_group    {"group_name"}
  POST /update_weights_from_disk        {"model_path"}   (fallback: a checkpoint on shared storage)
  POST /abort_request                   {"abort_all": true}: every running and waiting request
                                        ends (finish reason "abort"); fire and forget
  POST /flush_cache                     plain-text answer; 400 while requests are running
  POST /pause_generation                {"mode": "retract" | "in_place" | "abort"}: new requests wait;
                                        running ones go back to the queue (retract), stay with their
                                        KV cache (in_place) or end (abort); a weight update then
                                        proceeds without waiting for them
  POST /continue_generation             {}: the paused requests resume (under the new weights)
  POST /update_weight_version           {"new_version", "abort_all_requests"}
  POST /release_memory_occupation, /resume_memory_occupation   {"tags": [...]}
Answers: the weight calls return {"success", "message"} (HTTP 400 when success is false); the
memory calls return `null` on success and {"error": {"message"}} with HTTP 400 on failure.
Every call here checks the answer and raises `EngineRequestError` naming the server and endpoint.

With an API key (`api_key`; the config names the environment variable that holds it,
`rollout.remote.api_key_env`) every request carries `Authorization: Bearer <key>`, as SGLang's
`--api-key` middleware wants (without it the server answers 401 to every route but `/health*`
and `/metrics`). The key is never part of a message, a repr or a log line.

Before a weight sync every server aborts what it still runs (`abort_all`): a request that timed
out on our side and was retried elsewhere keeps running there, and would hold the model-update
lock while trainer rank 0 waits in the broadcast. `flush_cache` retries while the server answers
400 (the aborted requests are still draining).
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from ..base import Sample, SamplingParams
from .protocol import (
    DEFAULT_GROUP_NAME,
    EngineRequestError,
    _expand,
    _tag_list,
    parse_output,
    refuse_if_asleep,
)

if TYPE_CHECKING:
    from .weight_group import RemoteWeightGroup

__all__ = ["RemoteSGLangEngine"]

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

    timeout_s bounds generation and weight calls; health_timeout_s bounds `health()`. api_key:
    sent as a bearer token with every request (the server's `--api-key`).

    router=True: the URL is an sglang-router, which (0.3.2) takes ONE sampling_params dict per
    /generate request (a list is a 422). Every sample is then its own request (single input_ids,
    its own sampling_seed), `max_concurrency` in flight, so the router spreads them over its
    workers. Weight and memory calls go to each server, never to a router.
    """

    def __init__(self, base_url: str, timeout_s: float = 600.0, health_timeout_s: float = 5.0, *,
                 router: bool = False, max_concurrency: int = 32, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.health_timeout_s = health_timeout_s
        self.router = router
        self.max_concurrency = max(1, int(max_concurrency))
        self.flush_retry_s = 60.0  # how long /flush_cache is retried while it answers 400
        self.weight_version = 0
        self._asleep: set[str] = set()
        self._tp_size: int | None = None
        self._own_group = None  # a RemoteWeightGroup from init_weights_update_group (one-server fleet)
        self._member_of = None  # the RemoteWeightGroup this server is in

    def __repr__(self) -> str:
        return f"RemoteSGLangEngine({self.base_url!r})"

    # ------------------------------------------------------------------ HTTP

    def request(self, method: str, endpoint: str, payload: dict | None = None, *, timeout: float | None = None):
        """Send one request; returns the decoded JSON answer (text if not JSON, None if empty).
        Raises EngineRequestError on a connection failure, a timeout or an HTTP error status."""
        data = None if payload is None else json.dumps(payload).encode()
        headers = {**({"Content-Type": "application/json"} if data is not None else {}), **self._auth}
        req = urllib.request.Request(self.base_url + endpoint, data=data, headers=headers, method=method)
        t = self.timeout_s if timeout is None else timeout
        try:
            with _OPENER.open(req, timeout=t) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read() if exc.fp is not None else b""
            msg = _error_message(_decode(raw))
            if exc.code == 401:
                msg += (" (the server wants an API key: put it in an environment variable and name that variable in "
                        "rollout.remote.api_key_env)" if not self._auth else
                        " (the server refused the key from rollout.remote.api_key_env)")
            raise EngineRequestError(self.base_url, endpoint, msg, exc.code) from None
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
        refuse_if_asleep(self._asleep, f"the SGLang server {self.base_url}")
        version = self.weight_version  # as sent: a weight update may land while it runs
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
            return [parse_output(o, version) for o in outs]
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

    def abort_all(self) -> None:
        """POST /abort_request {"abort_all": true}: end every request the server still runs."""
        self.request("POST", "/abort_request", {"abort_all": True}, timeout=max(self.health_timeout_s, 30.0))

    def pause_generation(self, mode: str = "retract") -> None:
        """POST /pause_generation {"mode"}: see the module docstring."""
        self.call("/pause_generation", {"mode": mode}, timeout=max(self.health_timeout_s, 60.0))

    def continue_generation(self) -> None:
        """POST /continue_generation: paused requests resume."""
        self.call("/continue_generation", {}, timeout=max(self.health_timeout_s, 60.0))

    def flush_cache(self) -> None:
        """POST /flush_cache. SGLang answers 400 while requests are running or waiting (aborted
        ones drain within moments): retried every 0.2 s for up to `flush_retry_s`, then raised."""
        t0 = time.monotonic()
        tries = 0
        while True:
            tries += 1
            try:
                self.request("POST", "/flush_cache", {})
                return
            except EngineRequestError as exc:
                if exc.status != 400:
                    raise
                if time.monotonic() - t0 > self.flush_retry_s:
                    raise EngineRequestError(self.base_url, "/flush_cache", f"still refused after {tries} tries in "
                                             f"{self.flush_retry_s:g} s (requests still running?): {exc.detail}",
                                             400) from None
            time.sleep(0.2)

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
        self._own_group = _group().connect([self], master_address, master_port, backend=backend,
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

    def begin_sync(self) -> None:
        """Before the first bucket: the server ends what it still runs (see the module docstring)."""
        self.abort_all()

    def finish_sync(self, version: int, flush: bool = True) -> None:
        """Flush the server's cache (unless `flush` is False: SGLang refuses it under requests
        paused in place) and record the version (the server's too)."""
        if flush:
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



def _group():
    from .weight_group import RemoteWeightGroup

    return RemoteWeightGroup

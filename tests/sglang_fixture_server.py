"""TEST FIXTURE: a CPU stand-in for `python -m sglang.launch_server`. Not an inference server.

It speaks the subset of SGLang 0.5.6's HTTP protocol (`sglang/srt/entrypoints/http_server.py`)
that megatron-trace's remote rollout path uses, backed by `megatron_trace.rollout.HFEngine` on CPU
(one torch thread), so the remote client, the weight-update group and `sglang-router` can be
tested without a GPU or SGLang itself:

  POST|PUT /generate               input_ids (one list or a list of lists), sampling_params (a
                                   dict or one per row: max_new_tokens, temperature, top_p, top_k,
                                   stop_token_ids, sampling_seed, ...), return_logprob
  GET  /health, /health_generate, /get_server_info (/server_info), /get_model_info (/model_info),
       /get_weight_version (/weight_version)
  GET|POST /flush_cache            plain text, as SGLang answers; 400 while requests are in flight
  POST /abort_request              {"abort_all": true}: requests in flight end with finish reason abort
  POST /pause_generation           {"mode": "abort" (default) | "retract" | "in_place"}
  POST /continue_generation
  POST /init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group,
       /update_weight_version, /update_weights_from_disk
  GET|POST /release_memory_occupation, /resume_memory_occupation   {"tags": [...]}

A request may ask to be slow: `sampling_params.custom_params = {"fixture_delay_s": S}` keeps it in
flight for S seconds before it samples (an abort ends it early, with finish reason abort and no
tokens). As in SGLang, in-flight requests hold the model-update lock for reading: a weight update
waits until they are done, and /flush_cache answers 400 meanwhile.

Pause, as SGLang 0.5.6's tokenizer manager and scheduler do it: while paused, a new /generate
waits before it counts as in flight; a weight update no longer waits for the requests in flight.
`abort` ends them (and returns once none is left); `retract` and `in_place` stop them at the next
prompt group of their batch (the fixture samples one group of identical rows at a time, the
granularity at which it can switch weights), and after /continue_generation the rest of the batch
samples under whatever weights the server then holds; each output's meta_info "weight_version" is
the version its group was sampled with. /flush_cache works while paused in `retract` mode (SGLang
retracts the running requests, so their KV may go) and answers 400 in `in_place` mode.

Answers have SGLang's shapes: outputs {"output_ids", "meta_info": {...}} (a list for a batch);
{"success", "message"} with HTTP 400 on failure for the weight calls; `null` on success and
{"error": {"message"}} with HTTP 400 on failure for the memory calls and /generate.

Sampling: row r draws from its own generator seeded with its `sampling_seed` (random when absent),
and consecutive identical rows with identical sampling parameters form one `HFEngine.generate_rows`
batch, so a request built by `RemoteSGLangEngine.generate(prompts, params, seeds)` returns exactly
what a local `HFEngine.generate(prompts, params, seeds)` returns on the same weights. With
`--max-batch-rows N`, up to N consecutive rows with identical parameters form a batch whatever
their prompts (closer to SGLang's batching, and several times faster; the samples then equal a
local engine's only to float rounding). (Real SGLang
honours sampling_seed only with `enable_deterministic_inference`, and is not bit-identical to hf.)

API key: with `--api-key KEY` (or, so that a key need not show in `ps`, the variable named by
`--api-key-env`), every request but OPTIONS and the paths starting /health or /metrics must carry
`Authorization: Bearer KEY`, else 401 {"error": "Unauthorized"}: SGLang 0.5.6's middleware.

Run:   python tests/sglang_fixture_server.py --model-path HF_DIR --port P [--host 127.0.0.1] [--api-key K]
       (--port 0 picks a free port). Prints one line `SGLANG_FIXTURE_READY http://HOST:PORT` when
       it serves, and exits cleanly on SIGTERM/SIGINT.
Tests start and stop it (and PyPI `sglang-router`) with `tests/fixture_processes.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

READY = "SGLANG_FIXTURE_READY"
_MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
GROUP_TIMEOUT_S = 120.0  # SGLang uses torch's default (30 min); a test should fail sooner
# SGLang 0.5.6 SamplingParams.__init__ keywords; anything else is a 400, as SGLang rejects it.
_SAMPLING_KEYS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "custom_params", "stream_interval", "logit_bias", "sampling_seed",
}


class BadRequest(Exception):
    pass


class FixtureState:
    """The model, its lock, the weight groups and the released memory tags of one server."""

    def __init__(self, model_path: str, host: str, max_batch_rows: int = 0):
        import torch

        from megatron_trace.rollout import HFEngine

        torch.set_num_threads(1)
        self.model_path = model_path
        self.host = host
        self.port = 0
        self.engine = HFEngine.from_pretrained(model_path, device="cpu", dtype=torch.float32)
        self.lock = threading.Lock()  # serialises model access (generate, weight loads)
        self.groups: dict[str, object] = {}
        self.group_devices: dict[str, str] = {}  # receive buffers: cuda for nccl groups
        self.released: set[str] = set()
        self.weight_version = "default"
        self.n_requests = 0
        self.in_flight = 0  # generate requests running (SGLang's model_update_lock readers)
        self.idle = threading.Condition()
        self.abort_epoch = 0  # bumped by /abort_request abort_all
        self.paused: str | None = None  # the /pause_generation mode while paused
        self.max_batch_rows = max_batch_rows  # 0: one batch per run of identical rows

    # ------------------------------------------------------------------ generate

    def generate(self, body: dict):
        from megatron_trace.rollout import SamplingParams

        if body.get("stream"):
            raise BadRequest("the test fixture does not stream")
        ids = body.get("input_ids")
        if ids is None:
            raise BadRequest("the test fixture needs input_ids (it runs with skip_tokenizer_init)")
        single = bool(ids) and isinstance(ids[0], int)
        rows = [ids] if single else ids
        if not rows or any(not r or not all(isinstance(t, int) for t in r) for r in rows):
            raise BadRequest("input_ids must be a non-empty list of token ids or a list of such lists")
        sps = body.get("sampling_params") or {}
        if isinstance(sps, dict):
            sps = [sps] * len(rows)
        if len(sps) != len(rows):
            raise BadRequest(f"{len(sps)} sampling_params for {len(rows)} inputs")
        parsed, delay = [], 0.0
        for sp in sps:
            unknown = set(sp) - _SAMPLING_KEYS
            if unknown:
                raise BadRequest(f"unknown sampling params {sorted(unknown)}")
            if sp.get("stop") or sp.get("stop_regex"):
                raise BadRequest("stop strings need a tokenizer; the fixture has none (skip_tokenizer_init)")
            if int(sp.get("n", 1)) != 1:
                raise BadRequest("the fixture takes n=1 per row (expand samples into rows)")
            top_k = int(sp.get("top_k", -1))
            params = SamplingParams(
                n=1, temperature=float(sp.get("temperature", 1.0)), top_p=float(sp.get("top_p", 1.0)),
                top_k=-1 if top_k <= 0 else top_k, max_new_tokens=int(sp.get("max_new_tokens", 128)),
                stop_token_ids=tuple(int(t) for t in (sp.get("stop_token_ids") or ())))
            seed = sp.get("sampling_seed")
            parsed.append((params, int(seed) if seed is not None else random.randrange(2**31 - 1)))
            delay = max(delay, float((sp.get("custom_params") or {}).get("fixture_delay_s", 0.0)))
        with self.idle:
            while self.paused:  # SGLang holds new requests at the door while paused
                self.idle.wait(0.05)
            self.in_flight += 1
            epoch = self.abort_epoch
        try:
            if delay and not self._wait_unless_aborted(delay, epoch):
                return self._aborted(rows, single)
            return self._sample(rows, parsed, single, body, epoch)
        finally:
            with self.idle:
                self.in_flight -= 1
                self.idle.notify_all()

    def _wait_unless_aborted(self, seconds: float, epoch: int) -> bool:
        """Sleep up to `seconds`; False as soon as /abort_request aborts everything."""
        deadline = time.monotonic() + seconds
        with self.idle:
            while self.abort_epoch == epoch:
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                self.idle.wait(min(left, 0.05))
        return False

    def _aborted(self, rows, single):
        outs = [{"output_ids": [], "meta_info": {"id": f"fixture-{os.getpid()}-aborted-{i}", "prompt_tokens": len(r),
                                                 "completion_tokens": 0, "output_token_logprobs": [],
                                                 "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
                                                 "weight_version": self.weight_version}}
                for i, r in enumerate(rows)]
        return outs[0] if single else outs

    def abort_all(self) -> None:
        with self.idle:
            self.abort_epoch += 1
            self.idle.notify_all()

    def pause(self, mode: str) -> None:
        if mode not in ("abort", "retract", "in_place"):
            raise BadRequest(f"Invalid mode: {mode!r}. Expected one of ['abort', 'retract', 'in_place'].")
        with self.idle:
            self.paused = mode
            self.idle.notify_all()
        if mode == "abort":  # SGLang aborts until no request holds the model-update lock
            self.abort_all()
            self.wait_idle()

    def resume(self) -> None:
        with self.idle:
            self.paused = None
            self.idle.notify_all()

    def _hold_while_paused(self, epoch: int) -> bool:
        """Between two groups of a batch: wait while paused; False once the batch was aborted."""
        with self.idle:
            while self.paused and self.abort_epoch == epoch:
                self.idle.wait(0.05)
            return self.abort_epoch == epoch

    def wait_idle(self) -> None:
        """SGLang's model-update writer lock: wait until no request is in flight."""
        with self.idle:
            while self.in_flight:
                self.idle.wait(0.05)

    def _sample(self, rows, parsed, single, body, epoch):
        samples, versions = [], []
        i = 0
        while i < len(rows):  # consecutive identical rows with identical params: one batch
            j = i + 1
            while j < len(rows) and parsed[j][0] == parsed[i][0] and (
                    j - i < self.max_batch_rows if self.max_batch_rows else rows[j] == rows[i]):
                j += 1
            if not self._hold_while_paused(epoch):
                return self._aborted(rows, single)
            with self.lock:
                if self.released:
                    raise BadRequest(f"memory released ({sorted(self.released)}): resume_memory_occupation first")
                samples += self.engine.generate_rows(rows[i:j], parsed[i][0], [s for _, s in parsed[i:j]])
                versions += [self.weight_version] * (j - i)
            i = j
        with self.lock:
            self.n_requests += 1
        outs = []
        for row, s, version in zip(rows, samples, versions):
            rid = f"fixture-{os.getpid()}-{self.n_requests}-{len(outs)}"
            fr = {"type": "stop", "matched": s.token_ids[-1]} if s.finish_reason == "stop" else \
                {"type": "length", "length": len(s.token_ids)}
            meta = {"id": rid, "finish_reason": fr, "prompt_tokens": len(row),
                    "completion_tokens": len(s.token_ids), "cached_tokens": 0, "weight_version": version}
            if body.get("return_logprob"):
                meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(s.logprobs, s.token_ids)]
            outs.append({"output_ids": s.token_ids, "meta_info": meta})
        return outs[0] if single else outs

    # ------------------------------------------------------------------ weights

    def init_group(self, body: dict):
        import torch.distributed as dist  # noqa: F401

        from megatron_trace.sync.remote_group import init_custom_process_group

        name = body.get("group_name", "weight_update_group")
        if name in self.groups:
            return False, f"group {name!r} exists"
        try:
            pg = init_custom_process_group(
                backend=body.get("backend", "nccl"),
                init_method=f"tcp://{body['master_address']}:{body['master_port']}",
                world_size=int(body["world_size"]), rank=int(body["rank_offset"]), group_name=name,
                timeout=GROUP_TIMEOUT_S)
        except Exception as exc:  # SGLang answers the failure, it does not crash
            return False, f"Failed to initialize custom process group: {exc}."
        self.groups[name] = pg
        self.group_devices[name] = "cuda" if body.get("backend", "nccl") == "nccl" else "cpu"
        return True, "Succeeded to initialize custom process group."

    def destroy_group(self, body: dict):
        import torch.distributed as dist

        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:
            return False, "The group to be destroyed does not exist."
        dist.destroy_process_group(self.groups.pop(name))
        return True, "Succeeded to destroy custom process group."

    def update_from_distributed(self, body: dict):
        import torch
        import torch.distributed as dist

        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:
            return False, f"Group {name} not in {list(self.groups)}. Please call `init_weights_update_group` first."
        if not self.paused:  # SGLang takes its model-update lock only when not paused
            self.wait_idle()  # before joining the broadcast, as SGLang's tokenizer manager does
        try:
            weights, handles = [], []
            for pname, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
                t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.group_devices.get(name, "cpu"))
                handles.append(dist.broadcast(t, src=0, group=self.groups[name], async_op=True))
                weights.append((pname, t))
            for h in handles:
                h.wait()
            with self.lock:
                self.engine.update_weights(weights)
        except Exception as exc:
            return False, (f"Failed to update parameter online: {exc}. The full weights of the ModelRunner are "
                           "partially updated. Please discard the whole weights.")
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        return True, "Succeeded to update parameter online."

    def update_from_disk(self, body: dict):
        from safetensors.torch import load_file

        path = body["model_path"]
        try:
            tensors = {}
            for f in sorted(os.listdir(path)):
                if f.endswith(".safetensors"):
                    tensors.update(load_file(os.path.join(path, f)))
            if not tensors:
                return False, f"no safetensors under {path}"
            with self.lock:
                self.engine.update_weights(tensors.items())
        except Exception as exc:
            return False, f"Failed to update weights from disk: {exc}"
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        return True, "Succeeded to update model weights."

    def memory(self, body: dict, release: bool):
        tags = body.get("tags") or list(_MEMORY_TAGS)
        unknown = set(tags) - set(_MEMORY_TAGS)
        if unknown:
            raise BadRequest(f"unknown memory tags {sorted(unknown)}")
        with self.lock:  # SGLang asserts an idle scheduler
            if release:
                self.released |= set(tags)
            else:
                missing = set(tags) - self.released
                if missing:  # SGLang's scheduler would fail on offload_tags.remove(tag)
                    raise BadRequest(f"cannot resume {sorted(missing)}: not released")
                self.released -= set(tags)

    def server_info(self) -> dict:
        return {"model_path": self.model_path, "tokenizer_path": None, "host": self.host, "port": self.port,
                "tp_size": 1, "dp_size": 1, "pp_size": 1, "skip_tokenizer_init": True, "enable_memory_saver": True,
                "weight_version": self.weight_version, "disaggregation_mode": "null",
                "internal_states": [{"fixture_generate_requests": self.n_requests, "fixture_in_flight": self.in_flight}],
                "version": "0.5.6 (megatron-trace test fixture)"}

    def model_info(self) -> dict:
        return {"model_path": self.model_path, "tokenizer_path": None, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": self.weight_version,
                "has_image_understanding": False, "has_audio_understanding": False}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sglang-fixture"

    def log_message(self, *args):  # quiet: tests read the log only on failure
        pass

    @property
    def state(self) -> FixtureState:
        return self.server.state

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        if not n:
            return {}
        try:
            body = json.loads(self.rfile.read(n))
        except ValueError as exc:
            raise BadRequest(f"invalid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object")
        return body

    def _send(self, status: int, payload=None, text: str | None = None):
        data = text.encode() if text is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if text is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _result(self, ok_msg):
        ok, msg = ok_msg
        self._send(200 if ok else 400, {"success": ok, "message": msg})

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _authorised(self, method: str, path: str) -> bool:
        key = self.server.api_key
        if not key or method == "OPTIONS" or path.startswith(("/health", "/metrics")):
            return True
        return self.headers.get("Authorization") == "Bearer " + key

    def do_OPTIONS(self):
        self._send(200, text="")

    def _dispatch(self, method: str):
        path = self.path.split("?", 1)[0]
        if not self._authorised(method, path):
            self._body()  # drain it: the connection is kept alive
            self._send(401, {"error": "Unauthorized"})
            return
        try:
            body = self._body() if method in ("POST", "PUT") else {}
            s = self.state
            if path == "/health":
                self._send(200, text="")
            elif path == "/health_generate":
                try:
                    s.generate({"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}})
                    self._send(200, text="")
                except BadRequest:
                    self._send(503, text="")
            elif path in ("/get_server_info", "/server_info"):
                self._send(200, s.server_info())
            elif path in ("/get_model_info", "/model_info"):
                self._send(200, s.model_info())
            elif path in ("/get_weight_version", "/weight_version"):
                self._send(200, {"weight_version": s.weight_version})
            elif path == "/generate" and method in ("POST", "PUT"):
                self._send(200, s.generate(body))
            elif path == "/flush_cache":
                busy = s.in_flight > 0 and s.paused != "retract"
                self._send(400 if busy else 200, text="Cache flushed.\nPlease check backend logs for more details. "
                           "(When there are running or waiting requests, the operation will not be performed.)\n")
            elif path == "/abort_request" and method == "POST":
                if body.get("abort_all"):
                    s.abort_all()
                self._send(200, text="")
            elif path == "/pause_generation" and method == "POST":
                s.pause(body.get("mode", "abort"))
                self._send(200, {"message": "Generation paused successfully.", "status": "ok"})
            elif path == "/continue_generation" and method == "POST":
                s.resume()
                self._send(200, {"message": "Generation continued successfully.", "status": "ok"})
            elif path in ("/release_memory_occupation", "/resume_memory_occupation"):
                s.memory(body, release=path.startswith("/release"))
                self._send(200, None)
            elif method != "POST":
                self._send(405, {"error": {"message": f"{method} {path} not allowed"}})
            elif path == "/init_weights_update_group":
                self._result(s.init_group(body))
            elif path == "/destroy_weights_update_group":
                self._result(s.destroy_group(body))
            elif path == "/update_weights_from_distributed":
                self._result(s.update_from_distributed(body))
            elif path == "/update_weights_from_disk":
                self._result(s.update_from_disk(body))
            elif path == "/update_weight_version":
                s.weight_version = str(body["new_version"])
                self._send(200, {"success": True, "message": f"Weight version updated to {s.weight_version}",
                                 "new_version": s.weight_version})
            else:
                self._send(404, {"detail": "Not Found"})
        except (BadRequest, KeyError, TypeError, ValueError) as exc:
            self._send(400, {"error": {"message": f"{type(exc).__name__}: {exc}" if not isinstance(exc, BadRequest)
                                       else str(exc)}})
        except Exception as exc:  # pragma: no cover - a bug in the fixture itself
            self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}"}})


def serve(model_path: str, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
          max_batch_rows: int = 0) -> None:
    state = FixtureState(model_path, host, max_batch_rows)
    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.api_key = api_key or None
    httpd.daemon_threads = True
    httpd.state = state
    state.port = httpd.server_address[1]

    def _stop(signum, frame):
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"{READY} http://{host}:{state.port}", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
        for pg in list(state.groups.values()):
            try:
                import torch.distributed as dist

                dist.destroy_process_group(pg)
            except Exception:
                pass
    print("sglang fixture: stopped", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="TEST FIXTURE: CPU stand-in for sglang.launch_server (SGLang 0.5.6 HTTP)")
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (SGLang's --api-key)")
    p.add_argument("--api-key-env", default=None, help="the same, the key read from this environment variable")
    p.add_argument("--max-batch-rows", type=int, default=0,
                   help="batch up to N consecutive rows of any prompts (0: one batch per run of identical rows)")
    a = p.parse_args(argv)
    key = a.api_key or (os.environ.get(a.api_key_env) if a.api_key_env else None)
    if a.api_key_env and not key:
        p.error(f"--api-key-env {a.api_key_env}: the variable is not set")
    serve(a.model_path, a.host, a.port, key, a.max_batch_rows)


if __name__ == "__main__":
    main()

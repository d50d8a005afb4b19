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
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sglang_fixture_state import BadRequest, FixtureState

READY = "SGLANG_FIXTURE_READY"


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

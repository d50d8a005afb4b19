"""SGLang adapter: pure translation functions; the remote client against an in-process HTTP
server that answers in SGLang 0.5.6's shapes (no model); the colocated engine against a stub of
`sglang.Engine`; and a contract test against the pinned wheel's own declarations (read from its
source, `tests/sglang_wheel.py`). The end-to-end path with real processes is tests/e2e/test_remote_rollout.py."""

import importlib.util
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_trace.rollout import SamplingParams
from megatron_trace.rollout.base import sample_seed
from megatron_trace.rollout.sglang import (
    EngineRequestError,
    RemoteSGLangEngine,
    RemoteWeightGroup,
    SGLangEngine,
    _expand,
    parse_output,
    to_sglang_sampling_params,
)

HAVE_SGLANG = importlib.util.find_spec("sglang") is not None


def _sglang_output(ids, lps, reason):
    # The shape of one SGLang 0.5.6 output with skip_tokenizer_init=True and return_logprob=True.
    fr = {"type": "stop", "matched": ids[-1]} if reason == "stop" else {"type": "length", "length": len(ids)}
    return {"output_ids": ids, "meta_info": {"id": "x", "finish_reason": fr, "prompt_tokens": 3,
                                             "completion_tokens": len(ids),
                                             "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids)]}}


def test_translation():
    sp = to_sglang_sampling_params(SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=9,
                                                  stop=("</s>",), stop_token_ids=(7,)), seed=3)
    assert sp == {"max_new_tokens": 9, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "skip_special_tokens": False,
                  "no_stop_trim": True, "stop": ["</s>"], "stop_token_ids": [7], "sampling_seed": 3}
    s = parse_output(_sglang_output([4, 5, 7], [-0.1, -0.2, -0.3], "stop"), 4)
    assert s.token_ids == [4, 5, 7] and s.logprobs == [-0.1, -0.2, -0.3] and s.finish_reason == "stop"
    assert s.weight_version == 4
    with pytest.raises(ValueError, match="return_logprob"):
        parse_output({"output_ids": [1], "meta_info": {"finish_reason": {"type": "length"}}}, 0)


def test_expand_uses_per_prompt_seeds():
    params = SamplingParams(n=3, max_new_tokens=2, seed=9)
    rows, sps = _expand([[1, 2], [3]], params, seeds=[101, 202])
    assert rows == [[1, 2]] * 3 + [[3]] * 3
    assert [sp["sampling_seed"] for sp in sps] == [sample_seed(101, j) for j in range(3)] + \
        [sample_seed(202, j) for j in range(3)]
    # without seeds: derived from params.seed, distinct per sample; without any seed: none sent
    assert len({sp["sampling_seed"] for sp in _expand([[1], [2]], params)[1]}) == 6
    assert all("sampling_seed" not in sp for sp in _expand([[1]], SamplingParams(n=2))[1])
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        _expand([[1]], params, seeds=[1, 2])


# --------------------------------------------------------------------------- a protocol stub


class _Stub(BaseHTTPRequestHandler):
    """Answers like SGLang 0.5.6's http_server; `server.overrides[path] = (status, payload)`."""

    def log_message(self, *a):
        pass

    def _send(self, status, payload):
        data = json.dumps(payload).encode() if not isinstance(payload, str) else payload.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.calls.append((self.path, None))
        if self.path in self.server.overrides:
            self._send(*self.server.overrides[self.path])
        elif self.path == "/health":
            self._send(200, "")
        elif self.path == "/get_server_info":
            self._send(200, {"tp_size": 2, "dp_size": 1})
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"null")
        self.server.calls.append((self.path, body))
        if self.path in self.server.overrides:
            return self._send(*self.server.overrides[self.path])
        if self.path == "/generate":
            ids = body["input_ids"]
            rows = [ids] if isinstance(ids[0], int) else ids
            outs = [_sglang_output([len(p), 1], [-0.5, -0.25], "length") for p in rows]
            self._send(200, outs[0] if isinstance(ids[0], int) else outs)
        elif self.path in ("/release_memory_occupation", "/resume_memory_occupation"):
            self._send(200, None)  # SGLang returns null on success
        elif self.path == "/flush_cache":
            self._send(200, "Cache flushed.\n")
        else:
            self._send(200, {"success": True, "message": "ok"})


@pytest.fixture
def stub():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    srv.calls, srv.overrides = [], {}
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_remote_client_speaks_the_http_protocol(stub):
    eng = RemoteSGLangEngine(stub.url)
    out = eng.generate([[1, 2, 3], [4]], SamplingParams(n=2, max_new_tokens=2), seeds=[5, 6])
    assert [s.token_ids for s in out] == [[3, 1], [3, 1], [1, 1], [1, 1]] and out[0].finish_reason == "length"
    path, body = stub.calls[0]
    assert path == "/generate" and body["return_logprob"] is True and len(body["input_ids"]) == 4
    assert [sp["sampling_seed"] for sp in body["sampling_params"]] == \
        [sample_seed(5, 0), sample_seed(5, 1), sample_seed(6, 0), sample_seed(6, 1)]
    eng.update_weights_from_disk("/ckpt/step_5", version=5)
    eng.finish_sync(6)
    assert [c[0] for c in stub.calls[1:]] == ["/update_weights_from_disk", "/flush_cache", "/update_weight_version"]
    assert stub.calls[-1][1] == {"new_version": "6", "abort_all_requests": False} and eng.weight_version == 6
    assert eng.health() is True and eng.tp_size == 2


def test_router_mode_sends_one_request_per_sample(stub):
    eng = RemoteSGLangEngine(stub.url, router=True, max_concurrency=3)
    out = eng.generate([[1, 2, 3], [4]], SamplingParams(n=2, max_new_tokens=2), seeds=[5, 6])
    assert [s.token_ids for s in out] == [[3, 1], [3, 1], [1, 1], [1, 1]]
    gens = [b for p, b in stub.calls if p == "/generate"]
    assert len(gens) == 4 and all(isinstance(b["sampling_params"], dict) for b in gens)
    assert sorted(b["sampling_params"]["sampling_seed"] for b in gens) == \
        sorted([sample_seed(5, 0), sample_seed(5, 1), sample_seed(6, 0), sample_seed(6, 1)])
    with pytest.raises(RuntimeError, match="is a router"):
        eng.sleep()


def test_errors_name_the_server_and_endpoint(stub):
    eng = RemoteSGLangEngine(stub.url)
    stub.overrides["/update_weights_from_disk"] = (400, {"success": False, "message": "bad checkpoint"})
    with pytest.raises(EngineRequestError, match=r"127\.0\.0\.1:\d+ failed on /update_weights_from_disk "
                                                 r"\(HTTP 400\): bad checkpoint") as ei:
        eng.update_weights_from_disk("/x", version=1)
    assert ei.value.url == stub.url and ei.value.status == 400 and eng.weight_version == 0
    # success:false with HTTP 200 is a failure too
    stub.overrides["/update_weight_version"] = (200, {"success": False, "message": "nope"})
    with pytest.raises(EngineRequestError, match="nope"):
        eng.update_weight_version(3)
    stub.overrides["/generate"] = (400, {"error": {"message": "input too long"}})
    with pytest.raises(EngineRequestError, match="/generate.*input too long"):
        eng.generate([[1]], SamplingParams(max_new_tokens=1))
    stub.overrides["/flush_cache"] = (400, "Cache not flushed")
    eng.flush_retry_s = 0.5  # retried while it answers 400 (requests draining), then raised
    with pytest.raises(EngineRequestError, match=r"/flush_cache \(HTTP 400\): still refused after \d+ tries"):
        eng.finish_sync(2)
    assert sum(p == "/flush_cache" for p, _ in stub.calls) >= 2
    dead = _closed_port_url()
    t0 = time.monotonic()
    assert RemoteSGLangEngine(dead, health_timeout_s=1).health() is False
    with pytest.raises(EngineRequestError, match=rf"{dead} failed on /generate: cannot reach the server"):
        RemoteSGLangEngine(dead).generate([[1]], SamplingParams(max_new_tokens=1))
    assert time.monotonic() - t0 < 10
    assert issubclass(EngineRequestError, RuntimeError)


def test_sleep_wake_send_tags_and_refuse_generate(stub):
    eng = RemoteSGLangEngine(stub.url)
    eng.sleep(["kv_cache", "weights"])
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate([[1]], SamplingParams(max_new_tokens=1))
    eng.wake(["weights"])
    eng.wake()  # only what is still released
    eng.wake()  # nothing released: no request
    mem = [(p, b) for p, b in stub.calls if "memory" in p]
    assert mem == [("/release_memory_occupation", {"tags": ["weights", "kv_cache"]}),
                   ("/resume_memory_occupation", {"tags": ["weights"]}),
                   ("/resume_memory_occupation", {"tags": ["kv_cache"]})]
    assert len(eng.generate([[1]], SamplingParams(max_new_tokens=1))) == 1
    stub.overrides["/release_memory_occupation"] = (400, {"error": {"message": "requests in flight"}})
    with pytest.raises(EngineRequestError, match="release_memory_occupation.*requests in flight"):
        eng.sleep()
    assert not eng.asleep
    with pytest.raises(ValueError, match="unknown memory tags"):
        eng.sleep(["vram"])


def test_weight_calls_need_a_group_and_a_refusing_server_fails_fast(stub):
    eng = RemoteSGLangEngine(stub.url)
    with pytest.raises(RuntimeError, match="no weight group"):
        eng.update_weights([])
    stub.overrides["/init_weights_update_group"] = (400, {"success": False, "message": "Failed to initialize"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(EngineRequestError, match=rf"{stub.url} failed on /init_weights_update_group.*Failed to init"):
        RemoteWeightGroup.connect([eng], "127.0.0.1", port, backend="gloo", group_name="unit_refuse", timeout_s=5)
    assert time.monotonic() - t0 < 4  # did not wait for the rendezvous timeout
    body = next(b for p, b in stub.calls if p == "/init_weights_update_group")
    # tp_size 2 from /get_server_info: the server's ranks are 1 and 2 of a world of 3
    assert body == {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 3,
                    "group_name": "unit_refuse", "backend": "gloo"}


# --------------------------------------------------------------------------- colocated, stubbed


class _FakeEngine:
    def __init__(self):
        self.calls = []

    def generate(self, **kw):
        self.calls.append(("generate", kw))
        return [_sglang_output([7, 2], [-1.0, -2.0], "stop") for _ in kw["input_ids"]]

    def update_weights_from_tensor(self, **kw):
        self.calls.append(("update_weights_from_tensor", kw))
        return (False, "shape mismatch") if kw["named_tensors"] and kw["named_tensors"][0][0] == "bad" else (True, "")

    def flush_cache(self):
        self.calls.append(("flush_cache", {}))

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", {"tags": tags}))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", {"tags": tags}))

    def shutdown(self):
        pass


def test_colocated_engine_maps_seeds_tags_and_checks_results():
    fake = _FakeEngine()
    eng = SGLangEngine(fake)
    out = eng.generate([[1, 2]], SamplingParams(n=2, max_new_tokens=2), seeds=[3])
    assert len(out) == 2 and out[0].finish_reason == "stop"
    kw = fake.calls[0][1]
    assert kw["return_logprob"] is True and [sp["sampling_seed"] for sp in kw["sampling_params"]] == \
        [sample_seed(3, 0), sample_seed(3, 1)]
    eng.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate([[1]], SamplingParams(max_new_tokens=1))
    eng.wake(["weights"])
    eng.wake(["kv_cache"])
    eng.wake()
    assert [c for c in fake.calls if c[0] in ("release", "resume")] == [
        ("release", {"tags": ["weights", "kv_cache", "cuda_graph"]}), ("resume", {"tags": ["weights"]}),
        ("resume", {"tags": ["kv_cache"]}), ("resume", {"tags": ["cuda_graph"]})]
    import torch

    assert eng.update_weights([("w", torch.zeros(1))], version=3) == 1 and eng.weight_version == 3
    with pytest.raises(RuntimeError, match="shape mismatch"):
        eng.update_weights([("bad", torch.zeros(1))])


def test_missing_sglang_names_the_extra():
    if HAVE_SGLANG:
        pytest.skip("sglang is installed here; the error path cannot be exercised")
    with pytest.raises(ImportError, match=r"\.\[sglang\]"):
        SGLangEngine.launch("/nonexistent")


def _wheel_api():
    """What the pinned wheel declares (read from its source: sglang cannot be imported here)."""
    import ast
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import sglang_wheel

    path = sglang_wheel.wheel_path()

    def tree(member):
        return ast.parse(sglang_wheel.read(path, "sglang/srt/" + member))

    def classes(t):
        return {n.name: n for n in t.body if isinstance(n, ast.ClassDef)}

    def fields(cls):
        return {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}

    engine = classes(tree("entrypoints/engine.py"))["Engine"]
    methods = {f.name: [a.arg for a in f.args.args + f.args.kwonlyargs] + (["**"] if f.args.kwarg else [])
               for f in engine.body if isinstance(f, ast.FunctionDef)}
    io = classes(tree("managers/io_struct.py"))
    routes = set()
    for node in ast.walk(tree("entrypoints/http_server.py")):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("post", "api_route", "get") and node.args \
                and isinstance(node.args[0], ast.Constant):
            routes.add(node.args[0].value)
    server_args = fields(classes(tree("server_args.py"))["ServerArgs"])
    return methods, {k: fields(v) for k, v in io.items()}, routes, server_args


def test_contract_against_the_pinned_sglang_wheel():
    """Our calls against SGLang 0.5.6 itself: Engine method parameters, ServerArgs fields, request
    fields and HTTP routes, read from the wheel that `make test` downloads."""
    methods, io, routes, server_args = _wheel_api()

    def accepts(name, *params):
        return all(p in methods[name] for p in params) or "**" in methods[name]

    assert accepts("generate", "input_ids", "sampling_params", "return_logprob")
    assert accepts("update_weights_from_tensor", "named_tensors", "load_format", "flush_cache")
    assert accepts("release_memory_occupation", "tags") and accepts("resume_memory_occupation", "tags")
    assert accepts("init_weights_update_group", "master_address", "master_port", "rank_offset", "world_size",
                   "group_name", "backend")
    assert accepts("update_weights_from_distributed", "names", "dtypes", "shapes", "group_name")
    assert "flush_cache" in methods and "shutdown" in methods
    assert {"model_path", "tp_size", "base_gpu_id", "mem_fraction_static", "enable_memory_saver",
            "skip_tokenizer_init", "random_seed", "dtype"} <= server_args
    assert {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"} <= \
        io["InitWeightsUpdateGroupReqInput"]
    assert {"names", "dtypes", "shapes", "group_name", "flush_cache", "weight_version"} <= \
        io["UpdateWeightsFromDistributedReqInput"]
    assert {"serialized_named_tensors", "load_format", "flush_cache"} <= io["UpdateWeightsFromTensorReqInput"]
    assert "abort_all" in io["AbortReq"] and {"new_version", "abort_all_requests"} <= io["UpdateWeightVersionReqInput"]
    assert {"tags"} <= io["ReleaseMemoryOccupationReqInput"] and {"tags"} <= io["ResumeMemoryOccupationReqInput"]
    assert {"/generate", "/flush_cache", "/abort_request", "/init_weights_update_group",
            "/update_weights_from_distributed", "/destroy_weights_update_group", "/update_weights_from_disk",
            "/update_weight_version", "/release_memory_occupation", "/resume_memory_occupation",
            "/get_server_info", "/health"} <= routes, sorted(routes)

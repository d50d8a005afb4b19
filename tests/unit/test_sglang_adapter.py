"""SGLang adapter: pure translation functions, the remote client against a local HTTP server
speaking SGLang's /generate protocol, and (only when sglang is importable) a contract test
against the real `sglang.Engine` signatures."""

import importlib.util
import inspect
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_trace.rollout import SamplingParams
from megatron_trace.rollout.sglang import (
    RemoteSGLangEngine,
    SGLangEngine,
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


class _Server(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.calls.append((self.path, body))
        if self.path == "/generate":
            outs = [_sglang_output([len(p), 1], [-0.5, -0.25], "length") for p in body["input_ids"]]
            data = json.dumps(outs if len(outs) > 1 else outs[0]).encode()
        else:
            data = json.dumps({"success": True, "message": "ok"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_remote_client_speaks_the_http_protocol():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    srv.calls = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        eng = RemoteSGLangEngine(f"http://127.0.0.1:{srv.server_port}")
        out = eng.generate([[1, 2, 3], [4]], SamplingParams(n=2, max_new_tokens=2, seed=1))
        assert [s.token_ids for s in out] == [[3, 1], [3, 1], [1, 1], [1, 1]] and out[0].finish_reason == "length"
        path, body = srv.calls[0]
        assert path == "/generate" and body["return_logprob"] is True and len(body["input_ids"]) == 4
        assert len({sp["sampling_seed"] for sp in body["sampling_params"]}) == 4  # distinct seeds per sample
        eng.update_weights_from_disk("/ckpt/step_5", version=5)
        eng.finish_sync(6)
        assert [c[0] for c in srv.calls[1:]] == ["/update_weights_from_disk", "/flush_cache"] and eng.weight_version == 6
    finally:
        srv.shutdown()
        srv.server_close()


def test_missing_sglang_names_the_extra():
    if HAVE_SGLANG:
        pytest.skip("sglang is installed here; the error path cannot be exercised")
    with pytest.raises(ImportError, match=r"\.\[sglang\]"):
        SGLangEngine.launch("/nonexistent")


@pytest.mark.skipif(not HAVE_SGLANG, reason="sglang not installed (GPU extra)")
def test_contract_against_real_sglang_engine_signatures():
    from sglang.srt.entrypoints.engine import Engine

    def accepts(fn, *names):
        params = inspect.signature(fn).parameters
        return all(n in params for n in names) or any(p.kind == p.VAR_KEYWORD for p in params.values())

    assert accepts(Engine.generate, "input_ids", "sampling_params", "return_logprob")
    assert accepts(Engine.update_weights_from_tensor, "named_tensors", "flush_cache")
    assert accepts(Engine.release_memory_occupation, "tags") and accepts(Engine.resume_memory_occupation, "tags")
    assert callable(Engine.flush_cache) and callable(Engine.shutdown)
    from sglang.srt.server_args import ServerArgs

    fields = {f for f in ServerArgs.__dataclass_fields__}
    assert {"model_path", "tp_size", "mem_fraction_static", "enable_memory_saver", "skip_tokenizer_init"} <= fields

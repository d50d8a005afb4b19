"""The API annotator against a real Chat Completions HTTP server on 127.0.0.1 with injected faults."""

import dataclasses
import json
import logging
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_trace.annotate.api import ApiAnnotator, ApiAnnotatorConfig
from megatron_trace.annotate.base import ERROR_TYPES, FAILURE_KINDS, KEY_TYPES, AnnotationRequest
from megatron_trace.annotate.segment import segment_text

SECRET = "sk-test-4f9a1c7e-DO-NOT-LEAK"
RESPONSE = "12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 52\nAnswer: 52"
SEGMENTS = tuple(segment_text(RESPONSE))  # 4 segments, ids 0..3


class _Handler(BaseHTTPRequestHandler):
    server_version = "fake-openai"

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):  # the OpenAI-compatible model list a self-hosted server answers
        with self.server.lock:
            self.server.auth.add(self.headers.get("Authorization"))
        if self.path.rstrip("/").endswith("/v1/models"):
            return self._send(200, json.dumps({"object": "list", "data": [{"id": "served/qwen3-32b"}]}).encode())
        self._send(404, b"{}")

    def do_POST(self):
        srv = self.server
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        with srv.lock:
            srv.requests += 1
            srv.auth.add(self.headers.get("Authorization"))
        srv.models.add(body["model"])
        problem = re.search(r"## Problem\n(.*?)\n", body["messages"][1]["content"]).group(1)
        mode, _, arg = problem.partition(" ")
        with srv.lock:
            seen = srv.seen.get(problem, 0)
            srv.seen[problem] = seen + 1
        if mode == "FAIL500ONCE" and seen == 0 or mode == "ALWAYS500":
            return self._send(500, b'{"error": "boom"}')
        if mode == "E400":
            return self._send(400, b'{"error": "bad request"}')
        if mode == "SLOW":
            time.sleep(1.0)
        if mode == "TRUNCATED":
            return self._send(200, b'{"choices": [{"message": {"content": "{\\"segm')
        content = srv.fuzz[int(arg)] if mode == "FUZZ" else srv.replies.get(mode, '{"segments": [1], "type": "key_computation"}')
        payload = {"choices": [{"message": {"role": "assistant", "content": content}}],
                   "usage": {"prompt_tokens": 100, "completion_tokens": 10}}
        self._send(200, json.dumps(payload).encode())

    def _send(self, code, data):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.lock, srv.requests, srv.auth, srv.seen, srv.fuzz = threading.Lock(), 0, set(), {}, []
    srv.models = set()
    srv.replies = {
        "OK": '{"segments": [1, 2], "type": "key_computation"}',
        "FENCED": '```json\n{"segments": [1], "type": "key_insight"}\n```',
        "PROSE": 'Sure! {"segments": [1], "type": "key_insight"}',
        "WRONGIDS": '{"segments": [7], "type": "key_insight"}',
        "BADTYPE": '{"segments": [1], "type": "arithmetic_error"}',
    }
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def annotator(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MT_TEST_ANNOTATOR_KEY", SECRET)
    cfg = ApiAnnotatorConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="fake",
                             api_key_env="MT_TEST_ANNOTATOR_KEY", timeout_s=0.4, max_retries=2, backoff_s=0.01,
                             cache_dir=str(tmp_path / "cache"), max_concurrency=8)
    return ApiAnnotator(cfg)


def req(problem, correct=True):
    return AnnotationRequest(problem, "12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 52\nAnswer: 52", correct, RESPONSE, SEGMENTS)


def test_faults_map_to_counted_failure_kinds(server, annotator, caplog):
    caplog.set_level(logging.DEBUG)
    cases = {"OK": None, "FENCED": None, "PROSE": "invalid_json", "WRONGIDS": "ids_out_of_range",
             "BADTYPE": "bad_type", "FAIL500ONCE": None, "ALWAYS500": "http_error", "E400": "http_error",
             "SLOW": "timeout", "TRUNCATED": "invalid_json"}
    out = annotator.annotate([req(p) for p in cases])
    assert {p: a.failure for p, a in zip(cases, out)} == cases
    assert out[0].segment_ids == (1, 2) and out[0].diagnostic == "key_computation"
    c = annotator.counters
    assert c["ok"] == 3 and sum(v for k, v in c.items() if k.startswith("failure/")) == 7
    assert server.seen["ALWAYS500"] == 3 and server.seen["E400"] == 1  # retried 5xx, not 4xx
    assert server.seen["FAIL500ONCE"] == 2 and c["retries"] >= 1 + 2 + 2
    assert server.auth == {f"Bearer {SECRET}"}  # the key was sent ...
    dump = json.dumps(dataclasses.asdict(annotator.config)) + repr(annotator) + repr(dict(c)) + caplog.text
    assert SECRET not in dump and "MT_TEST_ANNOTATOR_KEY" in dump  # ... and appears nowhere else


def test_cache_makes_a_rerun_free(server, annotator):
    first = annotator.annotate([req("OK"), req("FENCED")])
    calls = server.requests
    second = annotator.annotate([req("OK"), req("FENCED")])
    assert first == second and server.requests == calls and annotator.counters["cache_hits"] == 2
    assert annotator.counters["prompt_tokens"] == 200 and annotator.counters["completion_tokens"] == 20


def test_missing_key_is_a_counted_failure_without_the_key_name_leaking_a_value(server, annotator, monkeypatch):
    monkeypatch.delenv("MT_TEST_ANNOTATOR_KEY")
    (a,) = annotator.annotate([req("OK")])
    assert a.failure == "http_error" and server.requests == 0


def test_a_self_hosted_model_is_one_key(server, tmp_path, monkeypatch):
    """annotate.api.base_url alone: the model is the one the server lists, and no key is sent
    (not even OPENAI_API_KEY when it is set); OpenAI's URL keeps gpt-4o-mini and its key."""
    from megatron_trace.config import load_config

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    url = f"http://127.0.0.1:{server.server_port}/v1"
    cfg = load_config(None, ["annotate.kind=api", f"annotate.api.base_url={url}"]).annotate.api
    ann = ApiAnnotator(ApiAnnotatorConfig(base_url=cfg.base_url, model=cfg.model, api_key_env=cfg.api_key_env,
                                          max_retries=0, cache_dir=str(tmp_path)))
    (a,) = ann.annotate([req("OK")])
    assert a.ok and server.models == {"served/qwen3-32b"} and server.auth == {None}
    assert "served/qwen3-32b" in repr(ann)
    default = ApiAnnotatorConfig()
    assert (ApiAnnotator(default)._model, default.key_env) == ("gpt-4o-mini", "OPENAI_API_KEY")
    # a server that lists nothing: a counted failure naming the key to set, never an exception
    dead = ApiAnnotator(ApiAnnotatorConfig(base_url=url + "/nothing", max_retries=0))
    (b,) = dead.annotate([req("OK")])
    assert b.failure == "http_error"


def _fuzz_reply(rng: random.Random, n_segments: int, correct: bool):
    """A random reply and the failure kind a strict parser must give it (None = ok)."""
    types = KEY_TYPES if correct else ERROR_TYPES
    other = ERROR_TYPES if correct else KEY_TYPES
    good_ids = rng.sample(range(n_segments), rng.randint(1, n_segments))
    r = rng.random()
    if r < 0.2:
        return json.dumps({"segments": good_ids, "type": rng.choice(types)}), None
    if r < 0.3:
        return json.dumps({"segments": good_ids + [rng.choice([-1, n_segments, 10**9])], "type": rng.choice(types)}), "ids_out_of_range"
    if r < 0.4:
        return json.dumps({"segments": good_ids, "type": rng.choice(list(other) + ["", "KEY", "none"])}), "bad_type"
    if r < 0.45:
        return json.dumps({"segments": [], "type": rng.choice(types)}), "empty"
    if r < 0.55:  # truncated valid JSON
        s = json.dumps({"segments": good_ids, "type": rng.choice(types)})
        return s[: rng.randint(0, len(s) - 1)], "invalid_json"
    if r < 0.65:  # wrong shapes
        bad = rng.choice([
            {"segments": good_ids}, {"type": types[0]}, {"segments": good_ids, "type": types[0], "extra": 1},
            {"segments": [str(i) for i in good_ids], "type": types[0]}, {"segments": [True], "type": types[0]},
            {"segments": [1.5], "type": types[0]}, {"segments": None, "type": types[0]},
            {"segments": good_ids, "type": 3}, [good_ids, types[0]], "just a string", 42, None,
        ])
        return json.dumps(bad), "invalid_json"
    if r < 0.75:  # nesting bombs and huge strings
        depth = rng.randint(50, 3000)
        return "[" * depth + "]" * depth if rng.random() < 0.5 else "x" * rng.randint(1, 200_000), "invalid_json"
    if r < 0.85:  # random bytes-ish text
        return "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 300))), "invalid_json"
    # prose around valid JSON is not accepted by the strict parser
    return "Answer: " + json.dumps({"segments": good_ids, "type": rng.choice(types)}), "invalid_json"


def test_fuzzed_replies_never_raise_and_every_failure_is_counted(server, annotator):
    rng = random.Random(1234)
    expected, requests = [], []
    for i in range(1000):
        correct = rng.random() < 0.5
        content, kind = _fuzz_reply(rng, len(SEGMENTS), correct)
        server.fuzz.append(content)
        expected.append(kind)
        requests.append(req(f"FUZZ {i}", correct))
    out = annotator.annotate(requests)
    got = [a.failure for a in out]
    mismatches = [(i, e, g) for i, (e, g) in enumerate(zip(expected, got)) if e != g]
    assert not mismatches, mismatches[:5]
    assert all(k is None or k in FAILURE_KINDS for k in got)
    c = annotator.counters
    assert c["ok"] + sum(v for k, v in c.items() if k.startswith("failure/")) == 1000
    assert c["ok"] == got.count(None) and c["calls"] == 1000 + c["retries"]  # retries only on transient errors

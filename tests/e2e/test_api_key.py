"""Remote servers that require an API key (SGLang's `--api-key`): the fixture server answers 401
as SGLang 0.5.6's middleware does, the client sends `Authorization: Bearer <key>` when
`rollout.remote.api_key_env` names the variable that holds the key, and a remote TRACE run with
the key trains, syncs its weights, and leaves the key nowhere in its run directory or logs."""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import urllib.error
import urllib.request

import pytest

from megatron_trace.parallel import run_on_ranks
from megatron_trace.rollout import SamplingParams
from megatron_trace.rollout.sglang import EngineRequestError, RemoteSGLangEngine

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fixture_processes import char_task_model, pseudo_verify, start_fixture_servers, stop_processes  # noqa: E402

pytestmark = pytest.mark.dist

KEY_ENV = "MT_TEST_SGLANG_API_KEY"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(url: str, method: str = "GET", payload=None, key: str | None = None):
    headers = {"Content-Type": "application/json"} if payload is not None else {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if payload is None else json.dumps(payload).encode()
    try:
        with _NO_PROXY.open(urllib.request.Request(url, data=data, headers=headers, method=method), timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """One fixture server started with the key in its environment (`--api-key-env`, so the key is
    not on its command line). Yields (url, key)."""
    path = char_task_model(str(tmp_path_factory.mktemp("keyed_server_model")), seed=99)
    key = "mt-" + secrets.token_hex(16)
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = key
    procs = []
    try:
        procs = start_fixture_servers(1, path, api_key_env=KEY_ENV)
        yield procs[0][1], key
    finally:
        stop_processes(procs)
        if old is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = old


def test_server_refuses_requests_without_the_key(keyed_server):
    url, key = keyed_server
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "temperature": 0.0}}
    assert _http(url + "/health")[0] == 200  # as SGLang: health and metrics stay open
    for k in (None, "wrong-" + key):
        status, raw = _http(url + "/generate", "POST", body, key=k)
        assert status == 401 and json.loads(raw) == {"error": "Unauthorized"}
        assert _http(url + "/get_server_info", key=k)[0] == 401
    status, raw = _http(url + "/generate", "POST", body, key=key)
    assert status == 200 and len(json.loads(raw)["output_ids"]) == 2

    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=3)
    with pytest.raises(EngineRequestError) as err:
        RemoteSGLangEngine(url, timeout_s=60).generate([[5, 6]], params)
    assert err.value.status == 401 and "rollout.remote.api_key_env" in str(err.value)
    with pytest.raises(EngineRequestError, match="refused the key"):
        RemoteSGLangEngine(url, timeout_s=60, api_key="wrong").generate([[5, 6]], params)
    eng = RemoteSGLangEngine(url, timeout_s=60, api_key=key)
    assert key not in repr(eng)
    assert len(eng.generate([[5, 6]], params)[0].token_ids) == 3


def test_a_missing_key_variable_is_named():
    from megatron_trace.train.setup_run import remote_api_key

    assert remote_api_key(None) is None
    with pytest.raises(ValueError, match="rollout.remote.api_key_env.*MT_TEST_NOT_SET_ANYWHERE"):
        remote_api_key("MT_TEST_NOT_SET_ANYWHERE")
    from megatron_trace.config import load_config

    with pytest.raises(ValueError, match="rollout.remote.api_key_env"):
        load_config("configs/tiny_cpu.yaml", ["rollout.remote.api_key_env=not a name"])



def _keyed_run(rundir, url):
    import logging

    from megatron_trace.config import load_config
    from megatron_trace.train.loop import train
    from megatron_trace.train.setup_run import setup_run

    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("megatron_trace")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Keep(level=logging.DEBUG))
    cfg = load_config("configs/tiny_cpu.yaml", [
        f"run.dir={rundir}", "rollout.max_new_tokens=8", "rollout.prompts_per_step=2", "rollout.n=2",
        "log.tensorboard=false", "checkpoint.every=1", "optim.micro_batch_size=4", "rollout.placement=remote",
        f'rollout.remote.urls=["{url}"]', f"rollout.remote.api_key_env={KEY_ENV}",
        "rollout.remote.master_address=127.0.0.1", "rollout.remote.backend=gloo", "rollout.request_timeout_s=120"])
    run = setup_run(cfg)
    run.verify = pseudo_verify
    history = train(run, steps=2)
    run.close()
    return history, messages


def test_trainer_with_the_key_runs_and_never_writes_it(keyed_server, tmp_path):
    url, key = keyed_server
    rundir = tmp_path / "run"
    history, messages = run_on_ranks(_keyed_run, 1, str(rundir), url)[0]
    assert len(history) == 2
    assert all(math.isfinite(m["reward/mean"]) and m["optim/updates"] == 1 for m in history)
    assert any(k.startswith("sync/") for k in history[-1])  # the weights went to the keyed server
    files = [p for p in rundir.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.jsonl" for p in files) and any("checkpoints" in p.parts for p in files)
    for p in files:
        assert key.encode() not in p.read_bytes(), p
    assert messages and not any(key in m for m in messages)

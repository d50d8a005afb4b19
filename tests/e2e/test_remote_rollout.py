"""SGLang remote mode end to end on CPU: two `tests/sglang_fixture_server.py` processes (a test
stand-in for `sglang.launch_server` that speaks its 0.5.6 HTTP protocol, backed by HFEngine) on a
tiny random Qwen3, driven through `RemoteSGLangEngine`, a weight broadcast over gloo from this
process as trainer rank 0 to both servers, and the real PyPI `sglang-router` in front of them.

Every process is started here and stopped by PID in the fixtures' teardown.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_trace.rollout import HFEngine, SamplingParams
from megatron_trace.rollout.base import sample_seed
from megatron_trace.rollout.sglang import EngineRequestError, RemoteSGLangEngine, RemoteWeightGroup

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fixture_processes import start_fixture_servers, start_router, stop_processes  # noqa: E402

pytestmark = pytest.mark.dist

PROMPTS = [[1, 2, 3], [5, 6], [7, 8, 9, 10], [11]]
SEEDS = [101, 202, 303, 404]
PARAMS = SamplingParams(n=2, temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(hf_dirs):
    procs = start_fixture_servers(2, hf_dirs["tied"])
    try:
        yield [RemoteSGLangEngine(url, timeout_s=120) for _, url in procs]
    finally:
        stop_processes(procs)
    bad = [(url, p.returncode) for p, url in procs if p.returncode != 0]
    assert not bad, f"fixture servers did not exit cleanly on SIGTERM: {bad}"



@pytest.fixture
def loopback_gloo(monkeypatch):
    if os.path.exists("/sys/class/net/lo"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


def _local(hf_dir: str) -> HFEngine:
    # one prompt per batch, as the fixture server batches: then bit-identical, not only to rounding
    return HFEngine.from_pretrained(hf_dir, device="cpu", dtype=torch.float32, batch_prompts=1)


def _same(got, ref) -> None:
    assert [s.token_ids for s in got] == [s.token_ids for s in ref]
    assert [s.logprobs for s in got] == [s.logprobs for s in ref]  # bit-identical
    assert [s.finish_reason for s in got] == [s.finish_reason for s in ref]


def test_generate_matches_local_hf_engine(servers, hf_dirs, one_thread):
    ref = _local(hf_dirs["tied"]).generate(PROMPTS, PARAMS, seeds=SEEDS)
    for eng in servers:
        assert eng.health() and eng.tp_size == 1
        _same(eng.generate(PROMPTS, PARAMS, seeds=SEEDS), ref)
    # a prompt's samples do not depend on the batch it is sent in
    _same(servers[1].generate(PROMPTS[2:3], PARAMS, seeds=SEEDS[2:3]), ref[4:6])
    assert len({tuple(s.token_ids) for s in ref}) > 1


def _restore(engines, params_list, version):
    """Per-engine protocol path (update_weights + finish_sync) through one-server groups."""
    for eng in engines:
        eng.init_weights_update_group("127.0.0.1", _free_port(), backend="gloo", group_name="restore",
                                      timeout_s=60)
        try:
            half = len(params_list) // 2
            assert eng.update_weights(params_list[:half]) == half
            assert eng.update_weights(params_list[half:], version=version) == len(params_list) - half
        finally:
            eng.shutdown()  # closes its own group on both sides


def test_weight_broadcast_reaches_both_servers(servers, hf_dirs, one_thread, loopback_gloo):
    """One group: this process is rank 0, server i joins as rank 1 + i; every bucket is broadcast
    once to both. Afterwards both servers sample exactly what a local engine with the new weights
    samples; a bucket the servers cannot load fails naming both; then the per-engine protocol
    path restores the original weights."""
    from megatron_trace.models.hf_io import make_random_hf_model
    from megatron_trace.models.qwen3 import QWEN3_SIZES

    new_model = make_random_hf_model(QWEN3_SIZES["tiny"], seed=4242)
    new_params = [(n, p.detach().clone()) for n, p in new_model.named_parameters()]
    new_local = HFEngine(new_model, device="cpu", batch_prompts=1)
    old_local = _local(hf_dirs["tied"])
    old_params = [(n, p.detach().clone()) for n, p in old_local.model.named_parameters()]
    ref_new = new_local.generate(PROMPTS, PARAMS, seeds=SEEDS)
    ref_old = old_local.generate(PROMPTS, PARAMS, seeds=SEEDS)
    assert [s.token_ids for s in ref_new] != [s.token_ids for s in ref_old]

    group = RemoteWeightGroup.connect(servers, "127.0.0.1", _free_port(), backend="gloo", group_name="e2e_fleet",
                                      timeout_s=60)
    try:
        _fleet_checks(group, servers, new_params, ref_new)
    finally:
        group.close()
        _restore(servers, old_params, version=8)  # the other tests expect the original weights
    for eng in servers:
        got = eng.generate(PROMPTS, PARAMS, seeds=SEEDS)
        _same(got, ref_old)
        assert got[0].weight_version == 8


def _fleet_checks(group, servers, new_params, ref_new):
    assert (group.world_size, group.rank_offsets) == (3, [1, 2])
    bf16 = [(n, t.to(torch.bfloat16)) for n, t in new_params[:2]]  # dtypes travel by name
    assert group.push(bf16) == 2
    assert group.push(new_params[:5]) == 5  # and back to fp32 for the same tensors
    assert group.push(new_params[5:]) == len(new_params) - 5
    group.finish_sync(7)
    for eng in servers:
        got = eng.generate(PROMPTS, PARAMS, seeds=SEEDS)
        _same(got, ref_new)
        assert {s.weight_version for s in got} == {7}
        assert eng.request("GET", "/get_weight_version") == {"weight_version": "7"}
    # servers that cannot load a bucket answer success=false after the broadcast: both named
    with pytest.raises(EngineRequestError) as ei:
        group.push([("model.no_such_weight", torch.zeros(3))])
    msg = str(ei.value)
    assert all(e.base_url in msg for e in servers) and "no_such_weight" in msg
    assert "/update_weights_from_distributed" in msg
    # one server in a fleet group cannot be pushed to alone (the broadcast needs every member)
    with pytest.raises(RuntimeError, match="push through the RemoteWeightGroup"):
        servers[0].update_weights(new_params[:1])


def test_sleep_refuses_generate_then_wake(servers):
    eng = servers[0]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=3)
    before = eng.generate(PROMPTS[:1], params)
    eng.sleep(["kv_cache", "weights"])
    try:
        with pytest.raises(RuntimeError, match="asleep"):
            eng.generate(PROMPTS[:1], params)
        # the server itself refuses too (a client that did not put it to sleep asks)
        with pytest.raises(EngineRequestError, match=r"/generate \(HTTP 400\): memory released"):
            RemoteSGLangEngine(eng.base_url).generate(PROMPTS[:1], params)
        assert eng.health()  # asleep, not dead
    finally:
        eng.wake()
    assert not eng.asleep
    assert [s.token_ids for s in eng.generate(PROMPTS[:1], params)] == [s.token_ids for s in before]
    # resuming what was never released is an error on the server; the client never sends it
    with pytest.raises(EngineRequestError, match="resume_memory_occupation.*not released"):
        eng.call("/resume_memory_occupation", {"tags": ["kv_cache"]})


@pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None,
                    reason="sglang-router not installed (pip install sglang-router==0.3.2; dev extra)")
def test_router_in_front_of_two_servers(servers, hf_dirs, one_thread):
    """The real sglang-router (round robin) forwards /generate to both workers; it takes one
    sampling_params dict per request, so the client sends one request per sample."""
    urls = [e.base_url for e in servers]
    served_before = [e.server_info()["internal_states"][0]["fixture_generate_requests"] for e in servers]
    proc, url = start_router(urls, policy="round_robin")
    try:
        eng = RemoteSGLangEngine(url, router=True, max_concurrency=4, timeout_s=120)
        assert eng.health()
        got = eng.generate(PROMPTS, PARAMS, seeds=SEEDS)
        local = _local(hf_dirs["tied"])
        ref = [s for p, seed in zip(PROMPTS, SEEDS) for j in range(PARAMS.n)
               for s in local.generate_rows([p], PARAMS, [sample_seed(seed, j)])]
        _same(got, ref)
        # a batch (one dict for every row) goes through unchanged as well
        batch = eng.request("POST", "/generate", {"input_ids": [PROMPTS[0], PROMPTS[0]],
                                                  "sampling_params": {"max_new_tokens": 2, "temperature": 0.0},
                                                  "return_logprob": True})
        assert isinstance(batch, list) and len(batch) == 2 and batch[0]["output_ids"] == batch[1]["output_ids"]
    finally:
        stop_processes([proc])
    served = [e.server_info()["internal_states"][0]["fixture_generate_requests"] - b
              for e, b in zip(servers, served_before)]
    assert all(n > 0 for n in served) and sum(n for n in served) == len(PROMPTS) * PARAMS.n + 1


_SGLANG_RECIPE_RANK = textwrap.dedent("""
    # Rank 1 joins the way SGLang 0.5.6 documents it, from torch primitives only (not our helper):
    # rendezvous -> PrefixStore(group_name) -> _new_process_group_helper (adds group_name/).
    import sys, inspect, torch, torch.distributed as dist
    from datetime import timedelta
    from torch.distributed import distributed_c10d as c
    port, name = int(sys.argv[1]), sys.argv[2]
    t = timedelta(seconds=60)
    store, rank, world = next(c.rendezvous(f"tcp://127.0.0.1:{port}", 1, 2, timeout=t))
    store.set_timeout(t)
    store = c.PrefixStore(name, store)
    params = inspect.signature(c._new_process_group_helper).parameters
    opt = "backend_options" if "backend_options" in params else "pg_options"
    pg, _ = c._new_process_group_helper(2, 1, [], c.Backend("gloo"), store, group_name=name, timeout=t,
                                        **{opt: None})
    c._world.pg_group_ranks[pg] = {0: 0, 1: 1}
    x = torch.zeros(3)
    dist.broadcast(x, src=0, group=pg)
    assert not dist.is_initialized()
    print("RECEIVED", x.tolist())
""")

_SGLANG_OWN_RANK = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from sglang.srt.utils.common import init_custom_process_group
    port, name = int(sys.argv[1]), sys.argv[2]
    pg = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=1,
                                   group_name=name)
    x = torch.zeros(3)
    dist.broadcast(x, src=0, group=pg)
    print("RECEIVED", x.tolist())
""")


@pytest.mark.parametrize("peer", ["recipe", pytest.param("sglang", marks=pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None, reason="sglang not installed (GPU extra)"))])
def test_trainer_group_meets_sglang_side(peer, loopback_gloo, tmp_path):
    """Our rank 0 meets a rank 1 created SGLang's way: the store keys must agree."""
    from megatron_trace.sync.remote_group import destroy_custom_process_group, init_custom_process_group

    port, name = _free_port(), f"meet_{peer}"
    script = tmp_path / "peer.py"
    script.write_text(_SGLANG_RECIPE_RANK if peer == "recipe" else _SGLANG_OWN_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(port), name], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        pg = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, name, timeout=60)
        import torch.distributed as dist

        assert not dist.is_initialized()  # the default group is never created
        dist.broadcast(torch.tensor([1.0, 2.0, 3.0]), src=0, group=pg)
        out, _ = proc.communicate(timeout=60)
        destroy_custom_process_group(pg)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "RECEIVED [1.0, 2.0, 3.0]" in out, out


def _verify_rank(hf_dir, urls, ports):
    """Trainer rank 0 (tp=1): sync into both servers with verify=True; then the SECOND server alone
    gets a corrupted tensor (through a group of its own), and verifying the fleet catches it;
    finally the good weights go back."""
    import logging
    import os

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.models.convert import export_hf_stream
    from megatron_trace.parallel import initialize
    from megatron_trace.sync import WeightSyncError, sync_weights, verify_engine

    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("megatron_trace.sync.weights").addHandler(handler)
    groups = initialize(tp=1, device="cpu")
    model = load_hf(hf_dir, groups)
    engines = [RemoteSGLangEngine(u, timeout_s=120) for u in urls]
    group = RemoteWeightGroup.connect(engines, "127.0.0.1", ports[0], backend="gloo", group_name="verify_both")
    good = sync_weights(model, groups, group, version=7, verify=True, tol=1e-4).max_abs_logit_diff
    second = RemoteWeightGroup.connect([RemoteSGLangEngine(urls[1], timeout_s=120)], "127.0.0.1", ports[1],
                                       backend="gloo", group_name="verify_second")
    w = dict(export_hf_stream(model, groups))["model.layers.0.mlp.down_proj.weight"]
    second.push([("model.layers.0.mlp.down_proj.weight", w + 0.05)], flush_cache=True)
    second.close()
    try:
        verify_engine(model, groups, group)
        err = None
    except WeightSyncError as exc:
        err = str(exc)
    sync_weights(model, groups, group, version=9)
    group.close()
    return good, err, records


def test_verify_probes_every_remote_server(servers, hf_dirs, loopback_gloo):
    from megatron_trace.parallel import run_on_ranks

    good, err, logs = run_on_ranks(_verify_rank, 1, hf_dirs["tied"], [s.base_url for s in servers],
                                   [_free_port(), _free_port()])[0]
    assert good <= 1e-4
    assert err is not None and "log-probs differ from the actor" in err
    assert any(m.startswith("engine 1:") for m in logs) and not any(m.startswith("engine 0:") for m in logs)


def _sync_while_a_request_runs(hf_dir, url, port):
    """Trainer rank 0: a slow request (60 s, as one that timed out on our side and was retried
    elsewhere) is in flight on the server when the weight sync starts."""
    import os
    import threading
    import time

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.parallel import initialize
    from megatron_trace.sync import sync_weights

    groups = initialize(tp=1, device="cpu")
    model = load_hf(hf_dir, groups)
    eng = RemoteSGLangEngine(url, timeout_s=120)
    group = RemoteWeightGroup.connect([eng], "127.0.0.1", port, backend="gloo", group_name="abort_in_flight")
    slow = {}

    def send():
        slow["out"] = eng.request("POST", "/generate", {
            "input_ids": [1, 2, 3], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 4, "custom_params": {"fixture_delay_s": 60}}})

    worker = threading.Thread(target=send, daemon=True)
    worker.start()
    deadline = time.monotonic() + 30
    while eng.server_info()["internal_states"][0]["fixture_in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    sync_weights(model, groups, group, version=5)
    took = time.monotonic() - t0
    worker.join(timeout=30)
    group.close()
    return took, slow.get("out"), eng.request("GET", "/get_weight_version")


def test_sync_aborts_requests_still_running(servers, hf_dirs, loopback_gloo):
    """Before the broadcast every server aborts what it still runs: otherwise its model-update lock
    holds the update (and rank 0 in the broadcast) until the request ends; flush_cache is retried
    while the aborted request drains (400)."""
    from megatron_trace.parallel import run_on_ranks

    took, out, version = run_on_ranks(_sync_while_a_request_runs, 1, hf_dirs["tied"], servers[0].base_url,
                                      _free_port(), timeout_s=200)[0]
    assert took < 20, took  # not the 60 s the request would have run
    assert out is not None and out["meta_info"]["finish_reason"]["type"] == "abort", out
    assert version == {"weight_version": "5"}

"""Asynchronous rollouts on CPU (`rollout.async.max_age`, `train/async_rollout.py`): the pause
protocol of SGLang 0.5.6 against the fixture server, then whole runs of the TRACE loop in one
spawned gloo trainer rank against two `tests/sglang_fixture_server.py` processes:

- max_age=0 is the synchronous remote loop: the same metrics, bit for bit, as a run without the key;
- max_age=1: the samples of step k carry weight version k-1 (after step 0), every metric is finite;
- update_every=2: a batch two versions old is dropped, counted and regenerated;
- the API annotator unreachable: TRACE falls back to GRPO on those rollouts, as it does today;
- a server SIGKILLed while the producer thread generates: its prompts go to the other one.

Every process is started here and stopped by PID in the fixtures' teardown.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import time

import pytest
import torch

from megatron_trace.parallel import free_port, run_on_ranks
from megatron_trace.rollout import HFEngine, SamplingParams
from megatron_trace.rollout.sglang import EngineRequestError, RemoteSGLangEngine, RemoteWeightGroup

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fixture_processes import (  # noqa: E402
    REPO,
    char_task_model,
    pseudo_verify,
    run_in_session,
    start_fixture_servers,
    stop_processes,
)

pytestmark = pytest.mark.dist

STEPS = 4
SEED = 1234
OVERRIDES = ["rollout.max_new_tokens=10", "rollout.prompts_per_step=4", "rollout.n=2", "schedule.warmup_steps=2",
             "schedule.decay_steps=2", "optim.lr=0.05", "optim.optimizer=sgd", "loss.variant=trace_both",
             "annotate.max_segment_chars=4", "log.tensorboard=false", "optim.micro_batch_size=4",
             "checkpoint.every=1000", "train.save_records=true", "loss.tis_cap=2.0", f"seed={SEED}"]
LAYOUT_KEYS = ("time", "seconds", "dispatch/", "memory/", "sync/", "async/")


@pytest.fixture(scope="module")
def server_hf_dir(tmp_path_factory):
    return char_task_model(str(tmp_path_factory.mktemp("async_server_model")), seed=4321)


@pytest.fixture(scope="module")
def servers(server_hf_dir):
    procs = start_fixture_servers(2, server_hf_dir)
    try:
        yield procs
    finally:
        stop_processes(procs)


@pytest.fixture
def loopback_gloo(monkeypatch):
    if os.path.exists("/sys/class/net/lo"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


# --------------------------------------------------------------------------- the pause protocol


def _in_flight(eng) -> int:
    return eng.server_info()["internal_states"][0]["fixture_in_flight"]


def _wait_for(cond, what, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _send(eng, rows, seeds, delay_s, out, key):
    def go():
        out[key] = eng.request("POST", "/generate", {
            "input_ids": rows, "return_logprob": True,
            "sampling_params": [{"max_new_tokens": 5, "temperature": 1.0, "sampling_seed": s,
                                 "custom_params": {"fixture_delay_s": delay_s}} for s in seeds]})

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_retract_pause_lets_the_update_through_and_resumes_under_new_weights(servers, server_hf_dir, one_thread,
                                                                             loopback_gloo):
    """RemoteWeightGroup with pause_mode=retract: /pause_generation holds a request in flight and
    a new one at the door, the broadcast does not wait for them (it would under the model-update
    lock), /flush_cache works while paused, and after /continue_generation both requests sample
    under the new weights, reporting the new version."""
    from megatron_trace.models.hf_io import make_random_hf_model

    url = servers[0][1]
    eng = RemoteSGLangEngine(url, timeout_s=120)
    local = HFEngine.from_pretrained(server_hf_dir, device="cpu", dtype=torch.float32, batch_prompts=1)
    arch_model = make_random_hf_model(_arch_of(local), seed=99)
    new_params = [(n, p.detach().clone()) for n, p in arch_model.named_parameters()]
    rows, seeds = [[5, 6, 7], [8, 9]], [11, 22]
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=5)
    before = local.generate_rows(rows, params, seeds)
    assert local.update_weights(new_params) > 0
    after = local.generate_rows(rows, params, seeds)
    assert [s.token_ids for s in before] != [s.token_ids for s in after]

    group = RemoteWeightGroup.connect([eng], "127.0.0.1", free_port(), backend="gloo", group_name="pause_retract",
                                      timeout_s=60)
    group.pause_mode = "retract"
    out: dict = {}
    try:
        first = _send(eng, rows, seeds, 1.0, out, "first")  # in flight: sleeping before it samples
        _wait_for(lambda: _in_flight(eng) == 1, "the first request")
        group.begin_sync()  # /pause_generation {"mode": "retract"}
        second = _send(eng, rows, seeds, 0.0, out, "second")
        time.sleep(0.5)
        assert second.is_alive() and _in_flight(eng) == 1  # held at the door while paused
        t0 = time.monotonic()
        group.push(new_params)  # not held by the request in flight
        assert time.monotonic() - t0 < 10
        eng.request("POST", "/flush_cache", {})  # retract: the cache may go while requests wait
        time.sleep(1.0)
        assert first.is_alive()  # its delay is over, but it waits for the continue
        group.finish_sync(7)  # flush, version, /continue_generation
        first.join(60)
        second.join(60)
    finally:
        group.close()
        _restore(eng, server_hf_dir)
    assert group.last_pause_s > 1.0
    for key in ("first", "second"):
        outs = out[key]
        assert [o["output_ids"] for o in outs] == [s.token_ids for s in after], key
        assert [o["meta_info"]["weight_version"] for o in outs] == ["7", "7"], key
        assert [[x[0] for x in o["meta_info"]["output_token_logprobs"]] for o in outs] == [s.logprobs for s in after]


def _arch_of(engine):
    from megatron_trace.models.qwen3 import get_arch

    return dataclasses.replace(get_arch("tiny"), vocab_size=engine.model.config.vocab_size)


def _restore(eng, hf_dir):
    """The servers' original weights back (the loop runs below start from them)."""
    eng.call("/update_weights_from_disk", {"model_path": hf_dir, "weight_version": "0"})


def test_in_place_pause_refuses_flush_and_abort_pause_ends_requests(servers, server_hf_dir, one_thread,
                                                                     loopback_gloo):
    """in_place: /flush_cache answers 400 while a paused request holds its place, so the group's
    sync skips the flush and still continues; abort: /pause_generation returns once the requests
    in flight have ended with finish reason abort."""
    eng = RemoteSGLangEngine(servers[1][1], timeout_s=120)
    params = [(n, p.detach().clone()) for n, p in HFEngine.from_pretrained(server_hf_dir, device="cpu",
                                                                           dtype=torch.float32).model.named_parameters()]
    out: dict = {}
    group = RemoteWeightGroup.connect([eng], "127.0.0.1", free_port(), backend="gloo", group_name="pause_in_place",
                                      timeout_s=60)
    group.pause_mode = "in_place"
    try:
        t = _send(eng, [[5, 6, 7]], [3], 1.0, out, "in_place")
        _wait_for(lambda: _in_flight(eng) == 1, "the request")
        group.begin_sync()
        with pytest.raises(EngineRequestError, match="400"):
            eng.request("POST", "/flush_cache", {})
        group.push(params)
        group.finish_sync(3)  # no flush in in_place mode: it would be refused
        t.join(60)
    finally:
        group.close()
    assert out["in_place"][0]["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    assert out["in_place"][0]["meta_info"]["weight_version"] == "3"

    t = _send(eng, [[5, 6, 7]], [3], 60.0, out, "abort")
    _wait_for(lambda: _in_flight(eng) == 1, "the slow request")
    t0 = time.monotonic()
    eng.pause_generation("abort")
    assert time.monotonic() - t0 < 20 and _in_flight(eng) == 0
    t.join(30)
    assert out["abort"][0]["meta_info"]["finish_reason"]["type"] == "abort"
    eng.continue_generation()
    with pytest.raises(EngineRequestError, match="Invalid mode"):
        eng.pause_generation("later")


# --------------------------------------------------------------------------- kill and resume


def _train_cli(run_dir, url, env=None, steps=5):
    """`megatron-trace train` (one-step-off, checkpoint every step) in its own session, killed as a
    whole afterwards (`fixture_processes.run_in_session`). Returns (exit code, log, metric rows)."""
    import json
    import shutil

    args = ["train", "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"), f"train.steps={steps}",
            "checkpoint.every=1", "checkpoint.keep_last=10", "rollout.max_new_tokens=8", "rollout.prompts_per_step=2",
            "log.progress=false", "train.save_records=true", f"run.dir={run_dir}", *_remote([url]),
            "rollout.async.max_age=1"]
    exe = shutil.which("megatron-trace", path=os.path.dirname(sys.executable))
    log = f"{run_dir}.log"
    rc = run_in_session([exe, *args], log, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", **(env or {})})
    metrics = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(x) for x in open(metrics)] if os.path.exists(metrics) else []
    return rc, open(log).read(), rows


def test_kill_at_step_3_and_resume_trains_every_sample(servers, tmp_path):
    """SIGKILLed right after the checkpoint of step 3, while the producer holds the batch of step
    3: the resumed run regenerates that batch from the same prompts, says so, and ends with every
    step trained once, on as many samples as an uninterrupted run."""
    import json

    url = servers[1][1]
    run_dir = str(tmp_path / "run")
    rc, log, rows = _train_cli(run_dir, url, env={"MT_FAULT_KILL_AFTER_SAVE": "3"})
    assert rc != 0 and [r["step"] for r in rows] == [0, 1, 2], log[-3000:]
    state = json.load(open(os.path.join(run_dir, "checkpoints", "step_000003", "trainer_state.json")))
    assert state["async_in_flight_steps"] == [3] and state["async_in_flight_samples"] == 8
    assert state["cursor"] == 3 * 2  # the first prompt of batch 3, not past it
    rc, log, rows = _train_cli(run_dir, url)
    assert rc == 0, log[-3000:]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[3]["async/regenerated_on_resume"] == 8 and "async/regenerated_on_resume" not in rows[4]
    assert "8 samples (the batches of steps [3]) were in flight at the checkpoint" in log
    from megatron_trace.train.loop import load_record

    recs = [load_record(os.path.join(run_dir, "records", f"step_{k:06d}.pt")) for k in range(5)]
    assert [len(r["samples"]) for r in recs] == [8] * 5  # rollout.n=4 x 2 prompts, every step
    prompts = [sorted({tuple(s.prompt_ids) for s in r["samples"]}) for r in recs]
    assert len({tuple(p) for p in prompts}) == 5  # each step its own prompts: none skipped, none repeated


# --------------------------------------------------------------------------- whole runs


def _rank(runs):
    """One trainer rank; runs: [(name, run_dir, overrides, kill)] trained one after the other.
    kill=(url, pid, call): the call-th generate sent to that server (from the producer thread)
    SIGKILLs it first. Returns {name: {history, versions per step, fleet, logs} or {error}}."""
    import contextlib
    import logging
    import signal
    import traceback

    from megatron_trace.config import load_config
    from megatron_trace.train.loop import load_record, train
    from megatron_trace.train.setup_run import setup_run

    torch.set_num_threads(1)
    os.environ["MT_TEST_ANNOTATOR_KEY"] = "unused"
    out = {}
    for name, rundir, extra, kill in runs:
        cfg = load_config("configs/tiny_cpu.yaml", [f"run.dir={rundir}", *OVERRIDES, *extra])
        logs: list[str] = []

        class H(logging.Handler):
            def emit(self, record, _logs=logs):
                _logs.append(f"{record.levelname} {record.name}: {record.getMessage()}")

        handler = H(level=logging.WARNING)
        logging.getLogger("megatron_trace").addHandler(handler)
        run = None
        try:
            run = setup_run(cfg)
            run.verify = pseudo_verify
            fleet = run.gen.fleet
            if kill is not None:
                url, pid, at = kill
                victim = fleet.engines[fleet.names.index(url)]
                real, calls = victim.generate, [0]

                def dying(*args, _real=real, _calls=calls, _victim=victim, _pid=pid, _at=at, **kwargs):
                    _calls[0] += 1
                    if _calls[0] == _at:
                        os.kill(_pid, signal.SIGKILL)
                        deadline = time.monotonic() + 20
                        while _victim.health() and time.monotonic() < deadline:
                            time.sleep(0.05)
                    return _real(*args, **kwargs)

                victim.generate = dying
            threads_before = {t.name for t in threading.enumerate()}
            history = train(run, steps=STEPS)
            versions = [[s.weight_version for s in load_record(os.path.join(rundir, "records",
                                                                             f"step_{k:06d}.pt"))["samples"]]
                        for k in range(STEPS)]
            out[name] = {"history": history, "versions": versions, "logs": logs,
                         "producer_left": "rollout-producer" in {t.name for t in threading.enumerate()} - threads_before,
                         "fleet": {"alive": list(fleet.alive),
                                   "weight_group": [e.base_url for e in run.gen.sync_target.engines]},
                         "server_versions": [e.request("GET", "/get_weight_version")["weight_version"]
                                             for e, alive in zip(fleet.engines, fleet.alive) if alive]}
            run.close()
        except Exception:
            out[name] = {"error": traceback.format_exc(), "logs": logs}
            if run is not None:
                with contextlib.suppress(Exception):
                    run.close()
        finally:
            logging.getLogger("megatron_trace").removeHandler(handler)
    return out


def _remote(urls):
    return ["rollout.placement=remote", "rollout.remote.urls=[" + ",".join(f'"{u}"' for u in urls) + "]",
            "rollout.remote.master_address=127.0.0.1", "rollout.remote.backend=gloo", "rollout.max_retries=2",
            "rollout.request_timeout_s=120", "rollout.remote.health_timeout_s=2"]


@pytest.fixture(scope="module")
def runs(servers, tmp_path_factory):
    urls = [u for _, u in servers]
    proc0, url0 = servers[0]
    root = tmp_path_factory.mktemp("async_loop")
    dead_api = ["annotate.kind=api", "annotate.api.base_url=http://127.0.0.1:9/v1", "annotate.api.max_retries=0",
                "annotate.api.api_key_env=MT_TEST_ANNOTATOR_KEY", "annotate.api.timeout_s=2"]
    plan = [("plain", _remote(urls), None),
            ("sync", _remote(urls) + ["rollout.async.max_age=0"], None),
            ("async", _remote(urls) + ["rollout.async.max_age=1"], None),
            ("drop", _remote(urls) + ["rollout.async.max_age=1", "rollout.async.update_every=2"], None),
            ("annotator_down", _remote(urls) + ["rollout.async.max_age=1", *dead_api], None),
            # the 2nd request to server 0 comes from the producer while step 0 trains
            ("kill", _remote(urls) + ["rollout.async.max_age=1"], (url0, proc0.pid, 2))]
    mp = pytest.MonkeyPatch()
    if os.path.exists("/sys/class/net/lo"):
        mp.setenv("GLOO_SOCKET_IFNAME", "lo")
    try:
        res = run_on_ranks(_rank, 1, [(n, str(root / n), ov, k) for n, ov, k in plan], timeout_s=500)[0]
    finally:
        mp.undo()
    return res, urls


def _result(out, name):
    r = out[name]
    if "error" in r:
        pytest.fail(f"the {name} run raised:\n{r['error']}\nlog:\n" + "\n".join(r["logs"]), pytrace=False)
    return r


def _comparable(m):
    return {k: v for k, v in m.items() if not any(s in k for s in LAYOUT_KEYS)}


def test_max_age_0_is_the_synchronous_remote_loop(runs):
    out, _ = runs
    plain, sync = _result(out, "plain"), _result(out, "sync")
    for step, (a, b) in enumerate(zip(plain["history"], sync["history"])):
        a, b = _comparable(a), _comparable(b)
        assert set(a) == set(b), (step, set(a) ^ set(b))
        for k in a:
            assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), (step, k, a[k], b[k])
        assert not any(k.startswith("async/") for k in sync["history"][step])
    assert sync["versions"] == [[k] * 8 for k in range(STEPS)]  # every batch from the current weights


def test_one_step_off_samples_carry_the_previous_version(runs):
    out, _ = runs
    r = _result(out, "async")
    assert r["versions"][0] == [0] * 8
    for k in range(1, STEPS):
        assert r["versions"][k] == [k - 1] * 8, k  # generated from w_{k-1} while step k-1 trained
    for k, m in enumerate(r["history"]):
        assert m["async/age_max"] == (0 if k == 0 else 1) and m["async/dropped"] == 0
        assert m["async/pause_s"] >= 0 and m["async/trainer_idle_s"] >= 0
        # finite wherever the synchronous run's are (a column with no tokens that step is NaN in both)
        finite = {key for key, v in out["sync"]["history"][k].items() if isinstance(v, float) and math.isfinite(v)}
        assert all(math.isfinite(m[key]) for key in finite if key in m and not key.startswith(LAYOUT_KEYS)), k
        assert all(math.isfinite(m[key]) for key in m if key.startswith(("loss/", "ppo/", "mismatch/")))
        assert m["rollout/failed_prompts"] == 0
    assert r["server_versions"] == [str(STEPS)] * 2  # the last sync reached both servers
    assert not r["producer_left"]  # the producer thread ended with the run


def test_a_batch_older_than_max_age_is_dropped_and_regenerated(runs):
    out, _ = runs
    r = _result(out, "drop")
    # update_every=2: the fleet gets w_2 and w_4 only. Batch 2 was started at step 1 from w_0 (2
    # versions old at step 2): dropped and regenerated from w_2. Batch 3 starts at step 2 from w_2.
    assert [m["async/dropped"] for m in r["history"]] == [0, 0, 8, 0]
    assert r["versions"] == [[0] * 8, [0] * 8, [2] * 8, [2] * 8]
    assert r["history"][2]["async/regenerations"] == 1
    assert any("dropped a batch of 8 samples generated from weights v0" in line for line in r["logs"])
    assert "sync/seconds" not in r["history"][0] and "sync/seconds" in r["history"][1]


def test_annotator_down_falls_back_to_grpo(runs):
    out, _ = runs
    r = _result(out, "annotator_down")
    warm = [m for m in r["history"] if m["kl/lambda"] > 0]
    assert warm
    for m in warm:
        assert m["annotate/ok"] == 0 and sum(v for k, v in m.items() if k.startswith("annotate/")
                                             and k != "annotate/ok" and isinstance(v, int | float)) > 0
        assert m["route/span_coverage"] == 0  # nothing routed: every token trains on GRPO
        assert math.isfinite(m["loss/total"])


def test_server_killed_while_the_producer_generates(runs):
    out, urls = runs
    r = _result(out, "kill")
    assert len(r["history"]) == STEPS
    assert all(m["rollout/failed_prompts"] == 0 for m in r["history"])
    assert sum(m["dispatch/retries"] for m in r["history"]) >= 1
    assert r["fleet"] == {"alive": [False, True], "weight_group": urls[1:]}
    assert all(len(v) == 8 for v in r["versions"])  # nothing lost

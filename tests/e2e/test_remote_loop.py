"""The TRACE loop with `rollout.placement=remote` on CPU: one gloo trainer rank (spawned with
`run_on_ranks`) sends its rollouts to two `tests/sglang_fixture_server.py` processes (SGLang's
0.5.6 HTTP protocol on an `hf` engine), broadcasts its weights to both over gloo after every
step, and survives one of them being SIGKILLed in the middle of a step.

The servers start from a model of the trainer's architecture and vocabulary (the char tokenizer's)
but with other random weights: only the trainer's start-up broadcast makes them match. Per-prompt
seeds make a prompt's samples independent of the engine that serves it, so with one torch thread
everywhere the remote run, the run behind `sglang-router` and the run that loses a server all
train exactly like the colocated `hf` run.

The four runs (colocated, remote, router, remote losing server 0) are trained one after the
other in ONE spawned rank by the module fixture `runs` (a spawn costs seconds of imports on a
2-core machine); the tests check its results. Every process is started here and stopped by PID
in the fixtures' teardown (the killed server is reaped there too).
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from megatron_trace.parallel import run_on_ranks
from megatron_trace.rollout import HFEngine, SamplingParams
from megatron_trace.rollout.sglang import RemoteSGLangEngine

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fixture_processes import (  # noqa: E402
    char_task_model,
    pseudo_verify,
    start_fixture_servers,
    start_router,
    stop_processes,
)

pytestmark = pytest.mark.dist

STEPS = 2
SEED = 1234  # configs/tiny_cpu.yaml: the trainer's random actor is make_random_hf_model(arch, seed=SEED)
SERVER_SEED = 4321  # the servers' initial weights: anything but the trainer's
OVERRIDES = ["rollout.max_new_tokens=12", "rollout.prompts_per_step=4", "rollout.n=2", "schedule.warmup_steps=1",
             "schedule.decay_steps=2", "optim.lr=0.05", "optim.optimizer=sgd", "loss.variant=trace_both",
             "annotate.max_segment_chars=4", "log.tensorboard=false", "optim.micro_batch_size=4",
             "checkpoint.every=1000", f"seed={SEED}"]
# How the work was spread over engines, and wall-clock figures: placement-dependent by design.
LAYOUT_KEYS = ("time", "seconds", "dispatch/", "memory/", "sync/")
PROBE_PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
PROBE_SEEDS = [11, 22, 33]
PROBE_PARAMS = SamplingParams(n=2, temperature=1.0, max_new_tokens=8)



class _Records:
    """A logging handler that keeps the messages (caplog does not reach a spawned rank)."""

    def __init__(self):
        import logging

        self.messages: list[str] = []
        outer = self

        class H(logging.Handler):
            def emit(self, record):
                outer.messages.append(f"{record.levelname} {record.name}: {record.getMessage()}")

        self.handler = H(level=logging.INFO)
        self.logger = logging.getLogger("megatron_trace")

    def __enter__(self):
        import logging

        self._level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self._level)


def _rank(runs):
    """One trainer rank; runs: [(run_dir, overrides, kill, probe_urls)] trained one after the
    other in this process. kill=(url, pid): the first generate sent to that server SIGKILLs it
    first. After each run, probe_urls are sampled (PROBE_*) to show what weights they hold.
    Returns per run {history, weights (exported HF), logs, fleet, probes, served}, or {error,
    logs} for a run that raised (the next runs still go)."""
    import contextlib
    import signal
    import time
    import traceback

    from megatron_trace.config import load_config
    from megatron_trace.models.convert import export_hf_stream
    from megatron_trace.train.loop import train
    from megatron_trace.train.setup_run import setup_run

    torch.set_num_threads(1)  # as the servers: CPU kernels may split sums by thread count
    out = []
    for rundir, extra, kill, probe_urls in runs:
        cfg = load_config("configs/tiny_cpu.yaml", [f"run.dir={rundir}", *OVERRIDES, *extra])
        t0 = time.perf_counter()
        served = [_served(u) for u in probe_urls]
        with _Records() as rec:
            run = None
            try:
                run = setup_run(cfg)
                run.verify = pseudo_verify
                fleet = run.gen.fleet
                if kill is not None:
                    url, pid = kill
                    victim = fleet.engines[fleet.names.index(url)]
                    real, calls = victim.generate, [0]

                    def dying(*args, _real=real, _calls=calls, _victim=victim, _pid=pid, **kwargs):
                        _calls[0] += 1
                        if _calls[0] == 1:  # mid-step: the request is on its way to this server
                            os.kill(_pid, signal.SIGKILL)
                            deadline = time.monotonic() + 20
                            while _victim.health() and time.monotonic() < deadline:
                                time.sleep(0.05)
                        return _real(*args, **kwargs)

                    victim.generate = dying
                history = train(run, steps=STEPS)
                weights = {k: v.detach().clone() for k, v in export_hf_stream(run.ddp, run.groups)}
                summary = None
                if fleet is not None:
                    summary = {"names": list(fleet.names), "alive": list(fleet.alive),
                               "weight_group": [e.base_url for e in run.gen.sync_target.engines]}
                run.close()
            except Exception:  # reported by this run's test; the other runs still count
                out.append({"error": traceback.format_exc(), "logs": rec.messages})
                if run is not None:
                    with contextlib.suppress(Exception):
                        run.close()
                continue
        served = {u: _served(u) - n for u, n in zip(probe_urls, served)}  # /generate requests answered
        probes = {}
        for url in probe_urls:
            eng = RemoteSGLangEngine(url, timeout_s=60)
            probes[url] = (eng.generate(PROBE_PROMPTS, PROBE_PARAMS, seeds=PROBE_SEEDS),
                           eng.request("GET", "/get_weight_version"))
        out.append({"history": history, "weights": weights, "logs": rec.messages, "fleet": summary,
                    "probes": probes, "served": served, "seconds": time.perf_counter() - t0})
    return out


def _remote(urls, router_url=None):
    ov = ["rollout.placement=remote", "rollout.remote.urls=[" + ",".join(f'"{u}"' for u in urls) + "]",
          "rollout.remote.master_address=127.0.0.1", "rollout.remote.backend=gloo", "rollout.max_retries=2",
          "rollout.request_timeout_s=120", "rollout.remote.health_timeout_s=2"]
    if router_url:
        ov.append(f"rollout.remote.router_url={router_url}")
    return ov


def _comparable(m):
    return {k: v for k, v in m.items() if not any(s in k for s in LAYOUT_KEYS)}


# The engine-vs-trainer log-prob gaps (about 1e-7) depend on the engines' last bits: the
# colocated engine's model (built from a config, then synced) and a server's (loaded from disk)
# hold equal weights, yet the prefill's last-position head (`logits_to_keep=1`) rounds a few
# logits differently between them (measured: without logits_to_keep they agree bit for bit).
ENGINE_BITS = ("mismatch/",)


def _same_metrics(a, b, step, exact=True):
    a, b = _comparable(a), _comparable(b)
    assert set(a) == set(b), (step, set(a) ^ set(b))
    for k in b:
        loose = not exact or k.startswith(ENGINE_BITS)
        tol = dict(rel_tol=1e-6, abs_tol=1e-7) if loose else dict(rel_tol=0.0, abs_tol=0.0)
        same = (math.isnan(a[k]) and math.isnan(b[k])) or math.isclose(a[k], b[k], **tol)
        assert same, (step, k, a[k], b[k])


def _served(url: str) -> int:
    return RemoteSGLangEngine(url, timeout_s=30).server_info()["internal_states"][0]["fixture_generate_requests"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server_hf_dir(tmp_path_factory):
    """An HF dir of the trainer's actor shape (tiny Qwen3, the char tokenizer's vocabulary and
    EOS) with other random weights."""
    # The trainer sends no stop ids: a server stops on its model config's EOS, so the dir must
    # carry the tokenizer's (the colocated hf engine is built with eos_token_ids=[tok.eos_token_id]).
    path = char_task_model(str(tmp_path_factory.mktemp("server_model")), seed=SERVER_SEED)
    return path


@pytest.fixture(scope="module")
def fixture_servers(server_hf_dir):
    """[(proc, url)] of two fixture servers; stopped by PID at the end of the module."""
    procs = start_fixture_servers(2, server_hf_dir)
    try:
        yield procs
    finally:
        stop_processes(procs)



@pytest.fixture(scope="module")
def runs(fixture_servers, tmp_path_factory):
    """Every run in ONE spawned rank (a spawn costs seconds of imports), in this order:
    colocated hf; remote on both servers; remote behind sglang-router (if installed); remote
    with server 0 SIGKILLed during step 0's rollouts. Returns ({name: run result}, urls)."""
    urls = [u for _, u in fixture_servers]
    (proc0, url0), _ = fixture_servers
    root = tmp_path_factory.mktemp("remote_loop")
    router = router_url = None
    try:
        import sglang_router  # noqa: F401

        router, router_url = start_router(urls)
    except ImportError:
        pass
    # The colocated engine batches one prompt's n rows at a time, as the fixture server does.
    plan = [("colocated", ["rollout.hf_batch_prompts=1"], None, []), ("remote", _remote(urls), None, urls)]
    if router_url:
        plan.append(("router", _remote(urls, router_url), None, urls))
    plan.append(("kill", _remote(urls), (url0, proc0.pid), urls[1:]))
    mp = pytest.MonkeyPatch()
    if os.path.exists("/sys/class/net/lo"):  # the rank inherits it: gloo stays on loopback
        mp.setenv("GLOO_SOCKET_IFNAME", "lo")
    try:
        res = run_on_ranks(_rank, 1, [(str(root / name), ov, kill, probe) for name, ov, kill, probe in plan],
                           timeout_s=400)[0]
    finally:
        mp.undo()
        if router is not None:
            stop_processes([router])
    return dict(zip([p[0] for p in plan], res)), urls


def _result(out, name):
    r = out[name]
    if "error" in r:
        pytest.fail(f"the {name} run raised:\n{r['error']}\nlog:\n" + "\n".join(r["logs"]), pytrace=False)
    return r


def _assert_probes(result, weights, hf_dir, version):
    """Sampling through each probed server equals, bit for bit, a local hf engine holding the
    trainer's final `weights` (and differs from one with the servers' initial weights)."""
    # one prompt per batch, as the fixture server batches: then bit-identical, not only to rounding
    local = HFEngine.from_pretrained(hf_dir, device="cpu", dtype=torch.float32, batch_prompts=1)
    before = local.generate(PROBE_PROMPTS, PROBE_PARAMS, seeds=PROBE_SEEDS)
    assert local.update_weights(weights.items()) >= len(weights) - 1  # the tied lm_head is skipped
    ref = local.generate(PROBE_PROMPTS, PROBE_PARAMS, seeds=PROBE_SEEDS)
    assert [s.logprobs for s in ref] != [s.logprobs for s in before]
    assert result["probes"]
    for url, (got, wv) in result["probes"].items():
        assert [s.token_ids for s in got] == [s.token_ids for s in ref], url
        assert [s.logprobs for s in got] == [s.logprobs for s in ref], url  # bit-identical
        assert wv == {"weight_version": str(version)}, url


# --------------------------------------------------------------------------- tests


def test_remote_loop_trains_on_both_servers(runs, server_hf_dir, one_thread):
    out, urls = runs
    r = _result(out, "remote")
    hist = r["history"]
    assert len(hist) == STEPS
    for step, m in enumerate(hist):
        assert m["rollout/failed_prompts"] == 0, (step, r["logs"])
        assert m["dispatch/engines_used"] == 2, step  # both servers served prompts at every step
        assert m["dispatch/dead_engines"] == 0 and m["dispatch/retries"] == 0, step
        assert m["rollout/response_len_mean"] > 0
    assert r["fleet"] == {"names": urls, "alive": [True, True], "weight_group": urls}
    assert all(n >= STEPS for n in r["served"].values()), r["served"]
    # the servers hold the trainer's final weights (weight version = steps), synced by broadcast
    _assert_probes(r, r["weights"], server_hf_dir, version=STEPS)


def test_remote_rollouts_equal_colocated(runs):
    """Per-prompt seeds: the remote servers sample exactly what the colocated hf engine samples
    (same weights, one thread each), so every algorithm metric and the final weights match bit
    for bit."""
    out, _ = runs
    hist, colo = _result(out, "remote")["history"], _result(out, "colocated")["history"]
    assert len(colo) == STEPS and colo[0]["dispatch/engines_used"] == 1
    for k in ("rollout/response_len_mean", "rollout/truncated_frac", "reward/mean"):
        assert hist[0][k] == colo[0][k], k
    assert any(k.startswith("reward/") for k in hist[0])
    for step in range(STEPS):
        _same_metrics(hist[step], colo[step], step)
    for k, v in _result(out, "colocated")["weights"].items():
        assert torch.equal(_result(out, "remote")["weights"][k], v), k


def test_router_in_front_of_the_servers(runs, server_hf_dir, one_thread):
    """Rollouts through a real sglang-router (round robin over both servers); the weights still
    go to each server by broadcast."""
    out, urls = runs
    if "router" not in out:
        pytest.skip("sglang-router is not installed (pip install sglang-router)")
    r, colo = _result(out, "router"), _result(out, "colocated")
    assert r["fleet"]["names"] != urls and len(r["fleet"]["names"]) == 1 and r["fleet"]["weight_group"] == urls
    for step, m in enumerate(r["history"]):
        assert m["rollout/failed_prompts"] == 0, (step, r["logs"])
        assert m["dispatch/engines_used"] == 1  # the fleet sees one engine: the router
        # Same tokens and rewards; the log-probs may differ in the last bits (a router request is
        # one sample: a batch of 1 on the server instead of the prompt's n rows), hence a tolerance
        # here (mismatch/k3_kl was 2.8e-14 vs 2.1e-14 at step 0).
        _same_metrics(m, colo["history"][step], step, exact=False)
    for k, v in colo["weights"].items():
        torch.testing.assert_close(r["weights"][k], v, rtol=1e-5, atol=1e-6)
    assert all(n > 0 for n in r["served"].values()), r["served"]  # the router used both servers
    _assert_probes(r, r["weights"], server_hf_dir, version=STEPS)


def test_server_killed_mid_step(runs, fixture_servers, server_hf_dir, one_thread):
    """Server 0 is SIGKILLed as the first rollout request of step 0 goes to it: the request is
    retried on server 1, server 0 leaves the rotation and, at the next weight sync, the weight
    group (rebuilt with server 1 alone). Training goes on exactly as the colocated run."""
    out, urls = runs
    (proc0, url0), (_, url1) = fixture_servers
    r, colo = _result(out, "kill"), _result(out, "colocated")
    assert proc0.wait(timeout=10) == -9  # reaped here: the test started it
    hist, logs = r["history"], r["logs"]
    assert len(hist) == STEPS
    m0, m1 = hist
    assert m0["rollout/failed_prompts"] == 0, logs
    assert m0["dispatch/dead_engines"] == 1 and m0["dispatch/retries"] >= 1, m0
    assert m0["dispatch/engines_used"] == 1  # server 1 served every prompt
    assert m1["rollout/failed_prompts"] == 0 and m1["dispatch/dead_engines"] == 0
    assert m1["dispatch/engines_used"] == 1 and m1["dispatch/retries"] == 0
    # step 0: two engines in rotation, one did all the work; step 1: the dead one takes no part
    assert m0["dispatch/engine_token_imbalance"] == 2.0 and m1["dispatch/engine_token_imbalance"] == 1.0
    assert r["fleet"] == {"names": urls, "alive": [False, True], "weight_group": [url1]}
    text = "\n".join(logs)
    assert f"rollout engine {url0} failed its health check; taken out of rotation" in text, text
    assert f"weight sync: server(s) {url0} are down; rebuilding the weight group with 1 live server(s)" in text, text
    for step in range(STEPS):
        _same_metrics(hist[step], colo["history"][step], step)
    for k, v in colo["weights"].items():  # the retried prompts sampled the same
        assert torch.equal(r["weights"][k], v), k
    _assert_probes(r, r["weights"], server_hf_dir, version=STEPS)


def _tp2_rank(rundir, urls):
    import torch.distributed as dist

    from megatron_trace.config import load_config
    from megatron_trace.train.loop import train
    from megatron_trace.train.setup_run import setup_run

    cfg = load_config("configs/tiny_cpu.yaml", [f"run.dir={rundir}", *OVERRIDES, "parallel.tp=2", *_remote(urls),
                                                "rollout.remote.weight_sync=none"])
    run = setup_run(cfg)
    run.verify = pseudo_verify
    history = train(run, steps=1)
    run.close()
    return dist.get_rank(), history


def test_remote_tp2_without_weight_sync_finishes(fixture_servers, tmp_path, monkeypatch):
    """rollout.remote.weight_sync=none at tp=2: every rank of replica 0 knows from the config that
    there is no sync (rank 0 used to skip it while rank 1 waited in the export's all-gather)."""
    import time

    if os.path.exists("/sys/class/net/lo"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    urls = [u for _, u in fixture_servers]
    t0 = time.monotonic()
    res = dict(run_on_ranks(_tp2_rank, 2, str(tmp_path / "run"), urls, timeout_s=240))
    m = res[0][0]
    assert m["rollout/failed_prompts"] == 0 and m["dispatch/engines_used"] >= 1
    assert not any(k.startswith("sync/") for k in m)  # nothing was pushed
    assert time.monotonic() - t0 < 200

"""The rank spawner and CPU mode, in real spawned processes."""

import time

import pytest
import torch

from megatron_trace.parallel import RankFailure, run_on_ranks


def _allreduce_rank(x):
    import torch.distributed as dist

    from megatron_trace.parallel import initialize

    groups = initialize(tp=2)
    t = torch.tensor([float(dist.get_rank() + 1)]) * x
    dist.all_reduce(t, group=groups.tp)
    return dist.get_rank(), groups.tp_rank, t.item()


def test_results_come_back_by_rank():
    res = run_on_ranks(_allreduce_rank, 2, 10.0)
    assert res == [(0, 0, 30.0), (1, 1, 30.0)]


def _what_the_rank_sees(name):
    import os
    import sys

    return os.environ.get(name), os.getcwd(), "megatron.core" in sys.modules, os.environ["RANK"]


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_both_start_methods_give_ranks_the_callers_environment_and_folder(method, monkeypatch, tmp_path):
    """A forked rank would see the fork server's environment: the caller's, at the call, must
    reach it (a test's monkeypatched variable, a benchmark's allocator setting)."""
    monkeypatch.setenv("MT_TEST_MARKER", f"set-after-start-{method}")
    monkeypatch.chdir(tmp_path)
    res = run_on_ranks(_what_the_rank_sees, 2, "MT_TEST_MARKER", start_method=method)
    assert [r[0] for r in res] == [f"set-after-start-{method}"] * 2 and [r[3] for r in res] == ["0", "1"]
    assert all(r[1] == str(tmp_path) for r in res)
    assert all(r[2] for r in res) == (method == "forkserver")  # preloaded in the server; spawn starts bare
    monkeypatch.setenv("MT_SPAWN_METHOD", "fork")
    with pytest.raises(ValueError, match="MT_SPAWN_METHOD='fork'"):
        run_on_ranks(_what_the_rank_sees, 1, "X")


def _fail_on_rank1():
    import os

    if os.environ["RANK"] == "1":
        raise ValueError("boom on rank 1")
    time.sleep(600)  # a peer stuck where it cannot notice the failure (e.g. inside a collective)
    return "unreachable"


def test_failure_is_reported_and_peers_are_killed():
    t0 = time.time()
    with pytest.raises(RankFailure) as err:
        run_on_ranks(_fail_on_rank1, 2, timeout_s=120)
    msg = str(err.value)
    assert "rank 1: ValueError: boom on rank 1" in msg and "Traceback" in msg
    assert "rank 0: killed after a peer failed" in msg
    assert time.time() - t0 < 60


def _sleep_then_answer(seconds):
    time.sleep(seconds)
    return "done"


def test_a_deadline_is_the_callers_choice(monkeypatch):
    """run_on_ranks kills past its deadline; `launch` (training, SFT, the demo) sets none, so a
    CPU run longer than the old 600 s default is not killed (a demo's SFT under load was)."""
    import megatron_trace.parallel.spawn as spawn

    with pytest.raises(RankFailure, match="rank 0: timed out after 2s"):
        run_on_ranks(_sleep_then_answer, 1, 30, timeout_s=2)
    assert run_on_ranks(_sleep_then_answer, 1, 0.1, timeout_s=None) == ["done"]
    seen = {}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(spawn, "run_on_ranks", lambda fn, ws, *a, **kw: seen.update(kw) or ["ok"])
    assert spawn.launch(_sleep_then_answer, 1, 0) == ["ok"] and seen == {"timeout_s": None}


def _cpu_mode_rank():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_trace.parallel import cpu_mode, initialize

    g = initialize(seed=5)
    out = {"enabled": cpu_mode.is_enabled(), "device": str(g.device)}
    out["zeros"] = torch.zeros(2, device="cuda").device.type
    out["dot_cuda"] = torch.ones(1).cuda().device.type
    out["to_cuda"] = torch.ones(1).to("cuda").device.type
    out["current"] = str(torch.cuda.current_device())
    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    with tracker.fork():
        b = torch.rand(3)
    out["outer_untouched"] = torch.equal(before, torch.get_rng_state())
    out["stream_advances"] = not torch.equal(a, b)
    # The model-parallel stream uses Megatron's offset: seed + 2718 + tp_rank.
    out["seeded_like_megatron"] = torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(5 + 2718)))
    return out


def test_cpu_mode_maps_cuda_and_tracks_rng():
    (r,) = run_on_ranks(_cpu_mode_rank, 1)
    assert r == {
        "enabled": True, "device": "cpu", "zeros": "cpu", "dot_cuda": "cpu", "to_cuda": "cpu", "current": "cpu",
        "outer_untouched": True, "stream_advances": True, "seeded_like_megatron": True,
    }


def _refuse_with_cuda():
    import torch

    from megatron_trace.parallel import cpu_mode

    torch.cuda.is_available = lambda: True  # pretend this is a GPU machine
    try:
        cpu_mode.enable()
    except RuntimeError as exc:
        return str(exc)
    return "enabled"


def test_cpu_mode_refuses_on_cuda_machines():
    (msg,) = run_on_ranks(_refuse_with_cuda, 1)
    assert "CUDA" in msg and msg != "enabled"

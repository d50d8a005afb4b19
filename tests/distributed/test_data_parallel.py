"""Data parallelism end to end: a 3-step TRACE loop at dp=2 (two gloo ranks, one colocated `hf`
engine each) equals the dp=1 run on the same global batch, and the rollouts do not depend on
how many engines served them."""

import math
import zlib

import pytest

from megatron_trace.parallel import run_on_ranks

OVERRIDES = ["rollout.max_new_tokens=16", "rollout.prompts_per_step=4", "rollout.n=2", "schedule.warmup_steps=1",
             "schedule.decay_steps=2", "optim.lr=0.05", "optim.optimizer=sgd", "loss.variant=trace_both",
             "annotate.max_segment_chars=4", "log.tensorboard=false", "optim.micro_batch_size=4"]

# How the work was spread over engines, ranks and micro-batches, and wall-clock figures:
# layout-dependent by design. Everything else (rewards, routes, losses, grad norms, sync sizes)
# must match.
LAYOUT_KEYS = ("time", "seconds", "dispatch/", "memory/", "layout/")


def _pseudo_verify(items):
    # A random policy never solves the task; a text hash gives mixed, deterministic rewards.
    return ["correct" if zlib.crc32(text.encode()) % 3 == 0 else "wrong" for text, _ in items]


def _rank(dp, rundir, extra=()):
    import torch.distributed as dist

    from megatron_trace.config import load_config
    from megatron_trace.models.convert import export_hf_stream
    from megatron_trace.train.loop import train
    from megatron_trace.train.setup_run import setup_run

    cfg = load_config("configs/tiny_cpu.yaml", [f"parallel.dp={dp}", f"run.dir={rundir}", *OVERRIDES, *extra])
    run = setup_run(cfg)
    run.verify = _pseudo_verify
    engines = int(run.gen.engine is not None)
    history = train(run, steps=3)
    weights = {k: v.clone() for k, v in export_hf_stream(run.ddp, run.groups)}
    run.close()
    return history, weights, engines, dist.get_rank()


def _comparable(m):
    return {k: v for k, v in m.items() if not any(s in k for s in LAYOUT_KEYS)}


@pytest.fixture(scope="module")
def dp1(tmp_path_factory):
    return run_on_ranks(_rank, 1, 1, str(tmp_path_factory.mktemp("dp1")))[0]


PACKED = ["optim.pack_sequences=true", "optim.max_tokens_per_micro_batch=48"]


@pytest.mark.dist
@pytest.mark.parametrize("placement, extra", [("colocated", []), ("rank0", []), ("colocated", PACKED)],
                         ids=["colocated", "rank0", "colocated-packed-budget"])
def test_dp2_loop_equals_dp1(dp1, placement, extra, tmp_path):
    """dp=2 equals dp=1; with packing and a token budget on too (the dp=1 run pads 4 rollouts per
    micro-batch), so the 3-step loop is also the packed-vs-padded check."""
    ref_hist, ref_w, _, _ = dp1
    results = run_on_ranks(_rank, 2, 2, str(tmp_path / "run"), [f"rollout.placement={placement}", *extra])
    engines = 2 if placement == "colocated" else 1  # one per replica, or global rank 0's only
    assert sum(r[2] for r in results) == engines and results[0][2] == 1
    hist, w, _, _ = results[0]
    for k, v in ref_w.items():
        assert (w[k] - v).abs().max().item() <= 1e-5, k
    assert any(m["loss/kl"] != 0 for m in ref_hist)
    for step, (a, b) in enumerate(zip(hist, ref_hist)):
        # every engine generated at every step
        assert a["dispatch/engines_used"] == engines and b["dispatch/engines_used"] == 1
        if extra:
            assert a["layout/padding_frac"] == 0.0 < b["layout/padding_frac"]
        a, b = _comparable(a), _comparable(b)
        assert set(a) == set(b), set(a) ^ set(b)
        for k in b:
            same = (math.isnan(a[k]) and math.isnan(b[k])) or math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6)
            assert same, (step, k, a[k], b[k])


def _record_handoff(dp, rundir):
    """dp ranks with train.offload_during_rollout: record each engine's calls, and whether the
    optimizer state and grad buffers are released while the engine generates."""
    import torch.distributed as dist

    from megatron_trace.config import load_config
    from megatron_trace.models.convert import export_hf_stream
    from megatron_trace.train.loop import train
    from megatron_trace.train.setup_run import setup_run

    cfg = load_config("configs/tiny_cpu.yaml", [f"parallel.dp={dp}", f"run.dir={rundir}", *OVERRIDES,
                                                "train.offload_during_rollout=true"])
    run = setup_run(cfg)
    run.verify = _pseudo_verify
    eng, calls = run.gen.engine, []

    def state_bytes():
        opt = run.optimizer
        inner = [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]
        return sum(v.untyped_storage().nbytes() for o in inner for st in o.state.values() for v in st.values()
                   if hasattr(v, "untyped_storage") and v.numel() > 1)

    def wrap(name):
        real = getattr(eng, name)

        def rec(*a, **kw):
            tags = a[0] if a and name in ("sleep", "wake") else kw.get("tags")
            calls.append((name, tuple(tags) if tags else None, state_bytes() if name == "generate" else None))
            return real(*a, **kw)

        setattr(eng, name, rec)

    for name in ("generate", "sleep", "wake", "update_weights", "finish_sync"):
        wrap(name)
    history = train(run, steps=3)
    weights = {k: v.clone() for k, v in export_hf_stream(run.ddp, run.groups)}
    run.close()
    return history, weights, calls, dist.get_rank()


@pytest.mark.dist
def test_memory_handoff_order_and_offload_keep_the_numbers(dp1, tmp_path):
    ref_hist, ref_w, _, _ = dp1
    results = run_on_ranks(_record_handoff, 2, 2, str(tmp_path / "run"))
    hist, w, _, _ = results[0]
    for k, v in ref_w.items():  # off-loading the optimizer state changes nothing
        assert (w[k] - v).abs().max().item() <= 1e-5, k
    assert all(m["memory/offloaded_optimizer_gb"] > 0 and m["memory/released_grad_buffers_gb"] > 0 for m in hist)
    assert all("memory/engine_released_gb" in m and "memory/engine_restored_weights_gb" in m for m in hist)
    for _, _, calls, rank in results:  # both replicas' engines
        kinds = [c[0] for c in calls]
        # per step: generate ... -> sleep(all) -> wake(weights) -> update_weights+ -> finish_sync -> wake(kv cache)
        steps, cur = [], []
        for c in calls:
            cur.append(c)
            if c[0] == "wake" and c[1] and "kv_cache" in c[1]:
                steps.append(cur)
                cur = []
        assert len(steps) == 3 and not cur, kinds
        for k, step in enumerate(steps):
            names = [c[0] for c in step]
            i_sleep = names.index("sleep")
            assert set(names[:i_sleep]) == {"generate"} and step[i_sleep][1] is None  # sleep(None): every tag
            assert names[i_sleep + 1] == "wake" and step[i_sleep + 1][1] == ("weights",)
            assert set(names[i_sleep + 2:-2]) == {"update_weights"} and names[-2] == "finish_sync"
            assert step[-1][1] == ("kv_cache", "cuda_graph")
            if k > 0:  # from the second rollout on, the optimizer state is off the device
                assert all(c[2] == 0 for c in step if c[0] == "generate"), (rank, k)

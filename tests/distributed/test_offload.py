"""`train.offload_during_rollout` (train/offload.py) releases only the optimizer's own memory.

With Megatron's distributed optimizer and fp32 params, the optimizer's param-group tensors are
shard views into DDP's parameter buffer: releasing their storage freed the whole model and the
weight sync read freed memory (SIGSEGV). The dist test runs the TRACE loop at dp=2 with the
distributed optimizer and off-load and asks for the same weights, bit for bit, as without
off-load. The unit test checks the per-storage bookkeeping on a plain torch Adam.
"""

import types
import zlib

import pytest
import torch

from megatron_trace.parallel import run_on_ranks
from megatron_trace.train.offload import TrainerOffload

OVERRIDES = ["parallel.dp=2", "optim.distributed_optimizer=true", "model.dtype=float32", "rollout.max_new_tokens=12",
             "rollout.prompts_per_step=2", "rollout.n=2", "optim.micro_batch_size=2", "log.tensorboard=false",
             "annotate.max_segment_chars=4", "schedule.warmup_steps=1", "schedule.decay_steps=2", "optim.lr=0.01"]


def _pseudo_verify(items):
    # A random policy never solves the task; a text hash gives mixed, deterministic rewards.
    return ["correct" if zlib.crc32(text.encode()) % 3 == 0 else "wrong" for text, _ in items]


def _rank(rundir, offload):
    from megatron_trace.config import load_config
    from megatron_trace.models.convert import export_hf_stream
    from megatron_trace.train.loop import train
    from megatron_trace.train.setup_run import setup_run

    cfg = load_config("configs/tiny_cpu.yaml", [f"run.dir={rundir}", f"train.offload_during_rollout={offload}",
                                                *OVERRIDES])
    run = setup_run(cfg)
    run.verify = _pseudo_verify
    init = {k: v.clone() for k, v in export_hf_stream(run.ddp, run.groups)}
    history = train(run, steps=3)
    weights = {k: v.clone() for k, v in export_hf_stream(run.ddp, run.groups)}
    run.close()
    return history, weights, init


@pytest.mark.dist
def test_distributed_optimizer_offload_keeps_the_weights(tmp_path):
    ref_hist, ref_w, init = run_on_ranks(_rank, 2, str(tmp_path / "ref"), False)[0]
    hist, w, _ = run_on_ranks(_rank, 2, str(tmp_path / "offload"), True)[0]
    assert set(w) == set(ref_w) and any(not torch.equal(ref_w[k], v) for k, v in init.items())  # it trained
    for k, v in ref_w.items():
        assert torch.equal(w[k], v), (k, (w[k] - v).abs().max().item())
    assert [m["loss/total"] for m in hist] == [m["loss/total"] for m in ref_hist]
    for m in hist:
        assert m["memory/offloaded_optimizer_gb"] > 0 and m["memory/released_grad_buffers_gb"] > 0
        # the fp32 param shards stay in DDP's param buffer, and say so
        assert m["memory/offload_skipped_shared_gb"] > 0


def test_offload_works_per_storage_and_round_trips():
    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        pbuf = torch.randn(16)  # a "DDP parameter buffer"
        gbuf = torch.randn(8)  # a "DDP grad buffer"
        flat = torch.randn(20)  # master copies: two views of one storage
        extra = [torch.nn.Parameter(flat[:8]), torch.nn.Parameter(flat[8:]),
                 torch.nn.Parameter(pbuf[2:6]),  # a distributed-optimizer shard view into the param buffer
                 torch.nn.Parameter(gbuf[:4])]  # (never in practice) a view into the grad buffer
        ddp = types.SimpleNamespace(parameters=model.parameters,
                                    buffers=[types.SimpleNamespace(param_data=pbuf, grad_data=gbuf)])
        opt = torch.optim.Adam([*model.parameters(), *extra], lr=0.1)
        return model, ddp, opt, flat, pbuf, gbuf, extra

    def step(opt, params, k):
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, 0.1 * (i + 1) * (k + 1))
        opt.step()

    ref = build()
    model, ddp, opt, flat, pbuf, gbuf, extra = build()
    for k in range(2):
        step(ref[2], [*ref[0].parameters(), *ref[-1]], k)
        step(opt, [*model.parameters(), *extra], k)
    state = {id(p): {n: v.clone() for n, v in st.items()} for p, st in opt.state.items()}
    flat_before, pbuf_before, model_before = flat.clone(), pbuf.clone(), [p.clone() for p in model.parameters()]

    off = TrainerOffload(ddp, types.SimpleNamespace(optimizer=opt))
    m = off.offload()
    # first, as plain numbers (reading a released buffer would crash the test process): the model's
    # storages, its parameter buffer included, keep their memory
    kept = [t.untyped_storage().nbytes() for t in (pbuf, *model.parameters())]
    assert kept == [16 * 4, 12 * 4, 3 * 4], "off-load released the model's memory"
    assert len(off._host) == 1 + 2 * 6  # flat once (two views), exp_avg and exp_avg_sq of the 6 params
    assert flat.untyped_storage().nbytes() == 0 and extra[0].untyped_storage().nbytes() == 0
    assert all(v.untyped_storage().nbytes() == 0 for st in opt.state.values() for n, v in st.items() if n != "step")
    moved_bytes = 20 * 4 + 2 * 4 * (12 + 3 + 8 + 12 + 4 + 4)
    assert m["memory/offloaded_optimizer_gb"] * 2**30 == moved_bytes
    assert m["memory/offload_skipped_shared_gb"] * 2**30 == 4 * 4 + 4 * 4  # the param-buffer and grad-buffer views
    assert m["memory/released_grad_buffers_gb"] * 2**30 == 8 * 4 and len(off._grad_sizes) == 1
    # the model and its parameter buffer are untouched while off-loaded
    assert torch.equal(pbuf, pbuf_before) and torch.equal(extra[2], pbuf[2:6])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), model_before))
    assert off.offload() == {}

    off.reload()
    assert torch.equal(flat, flat_before) and torch.equal(gbuf, torch.zeros(8))
    ptr = flat.untyped_storage().data_ptr()
    assert extra[0].untyped_storage().data_ptr() == extra[1].untyped_storage().data_ptr() == ptr
    assert torch.equal(extra[0], flat[:8]) and torch.equal(extra[1], flat[8:])
    for p, st in opt.state.items():
        assert all(torch.equal(v, state[id(p)][n]) for n, v in st.items())
    # ... and the optimizer goes on exactly as one that was never off-loaded
    ref[5].zero_()  # the grad buffer is zeroed on reload, by design
    step(ref[2], [*ref[0].parameters(), *ref[-1]], 2)
    step(opt, [*model.parameters(), *extra], 2)
    for a, b in zip([*model.parameters(), *extra], [*ref[0].parameters(), *ref[-1]]):
        assert torch.equal(a, b)

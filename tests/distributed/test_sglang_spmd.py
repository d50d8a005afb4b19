"""Weight updates into a colocated SGLang engine at TP=2 follow SGLang's SPMD path, checked against
the pinned wheel's own code (`tests/sglang_wheel.py` runs its serializer, its `SafeUnpickler`, its
`LocalSerializedTensor`/`_unwrap_tensor` and the body of its `Engine.update_weights_from_tensor`).

Two gloo ranks stand for the two GPUs of one replica: rank r is trainer TP rank r and also engine
TP worker r. `sync_weights(..., per_rank=...)` makes each rank serialise its own copy of every
tensor; rank 0's engine passes the gathered handles to the wheel's `update_weights_from_tensor`,
which builds one payload per worker. Each rank then does what SGLang's worker r does with payload
r (`MultiprocessingSerializer.deserialize`, `_unwrap_tensor(tensor, tp_rank=r)`), and must get
back exactly the storage it serialised itself (on CPU, torch maps a shared storage reopened in the
process that shared it to the same storage): no worker reads another rank's copy. On a GPU that
is the difference between a handle to the worker's own GPU and a copy across GPUs.
"""

import os
import sys

import pytest

from megatron_trace.parallel import run_on_ranks

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sglang_wheel  # noqa: E402

pytestmark = pytest.mark.dist


def _rank(hf_dir, wheel, tests_dir):
    sys.path.insert(0, tests_dir)
    import sglang_wheel as w
    import torch
    import torch.distributed as dist

    info = w.install(wheel)
    from sglang.srt.model_executor.model_runner import _unwrap_tensor
    from sglang.srt.utils import MultiprocessingSerializer

    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.models.convert import export_hf_stream
    from megatron_trace.parallel import initialize
    from megatron_trace.parallel.host import HostGroups
    from megatron_trace.rollout.sglang import SGLangEngine, serialize_local
    from megatron_trace.sync import PerRankSync, sync_weights

    groups = initialize(tp=2, device="cpu")
    rank = dist.get_rank()
    model = load_hf(hf_dir, groups)
    host = HostGroups.build(groups.mp, groups.tp, timeout_minutes=5)
    mine = []  # this rank's serialised copies (kept alive, as the sync keeps them until the engine read them)

    def serialize(t):
        mine.append(t)
        return serialize_local(t)

    engine = SGLangEngine(w.WheelEngine(info["engine_update_weights_from_tensor"], tp_size=2)) if rank == 0 else None
    report = sync_weights(model, groups, engine, version=1, bucket_bytes=64 * 1024,
                          per_rank=PerRankSync(host.gather_tp, host.barrier_tp, serialize))
    payloads = host.broadcast(engine.engine.payloads if engine is not None else None)
    got = {}
    for payload in payloads:  # SGLang's TpModelWorker r: deserialize payload r, unwrap for tp_rank r
        assert len(payload) == 2
        for name, tensor in MultiprocessingSerializer.deserialize(payload[rank]):
            got[name] = _unwrap_tensor(tensor, tp_rank=rank, device="cpu")
    own = {t.untyped_storage().data_ptr() for t in mine}
    full = {k: v.clone() for k, v in export_hf_stream(model, groups)}
    return {"rank": rank, "names": sorted(got) == sorted(full), "buckets": report.num_buckets,
            "equal": all(torch.equal(got[k], full[k]) for k in full),
            "own_copies": sum(t.untyped_storage().data_ptr() in own for t in got.values()), "tensors": len(got),
            "patched": info["patch_calls"][0], "fields": info["io_fields"]}


def test_each_tp_worker_loads_its_own_rank_copy(hf_dirs):
    wheel = sglang_wheel.wheel_path()
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = run_on_ranks(_rank, 2, hf_dirs["untied"], wheel, tests_dir, timeout_s=300)
    for r in res:
        assert {"serialized_named_tensors", "load_format", "flush_cache"} <= set(r["fields"])
        assert r["buckets"] > 1 and r["names"] and r["equal"], r
        assert r["own_copies"] == r["tensors"] > 0, r  # worker r opened only rank r's handles
        assert r["patched"] > 0, r  # SGLang's reduction patch is applied before serialising, on every rank

"""Actor (TP=1, TP=2, PP=2, one optimizer step) -> hf engine sync; verify catches corruption."""

import pytest

from megatron_trace.parallel import run_on_ranks
from megatron_trace.sync.check import run_check


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_synced_engine_matches_actor(tp, pp, tmp_path):
    res = run_check(tp, pp, "hf", device="cpu", workdir=str(tmp_path))
    assert res["tp"] == tp and res["pp"] == pp and res["device"] == "cpu" and res["grad_norm"] > 0
    assert res["max_abs_logit_diff"] <= 1e-4, res
    assert res["max_abs_logprob_diff"] <= 1e-4, res
    assert res["sync_tensors"] == 24 and res["sync_bytes"] > 0  # tiny tied model: 24 HF tensors


def _corrupt_rank(hf_dir):
    import torch.distributed as dist

    from megatron_trace.models.checkpoint import load_hf
    from megatron_trace.models.hf_io import make_random_hf_model
    from megatron_trace.parallel import initialize
    from megatron_trace.rollout import HFEngine
    from megatron_trace.sync import WeightSyncError, sync_weights

    groups = initialize(tp=2)
    model = load_hf(hf_dir, groups)
    engine = HFEngine(make_random_hf_model(model.arch, seed=5)) if dist.get_rank() == 0 else None

    def corrupt(stream):
        for name, t in stream:
            yield name, (t + 0.01 if name == "model.layers.1.mlp.down_proj.weight" else t)

    good = sync_weights(model, groups, engine, version=1, verify=True, bucket_bytes=100_000)
    try:
        sync_weights(model, groups, engine, version=2, verify=True, stream_filter=corrupt)
    except WeightSyncError as exc:
        return good.max_abs_logit_diff, good.num_buckets, str(exc)
    return good.max_abs_logit_diff, good.num_buckets, None


@pytest.mark.dist
def test_verify_detects_a_corrupted_tensor(tmp_path):
    from megatron_trace.models.hf_io import make_random_hf_model
    from megatron_trace.models.qwen3 import QWEN3_SIZES

    make_random_hf_model(QWEN3_SIZES["tiny"], str(tmp_path / "hf"))
    results = run_on_ranks(_corrupt_rank, 2, str(tmp_path / "hf"))
    for diff, buckets, err in results:  # every rank raises together
        assert diff <= 1e-4 and buckets > 1
        assert err is not None and "differ from the actor" in err


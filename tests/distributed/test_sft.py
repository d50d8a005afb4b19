"""SFT on the Megatron machinery: TP=2, PP=2 and DP=2 equal one process; the export, the held-out
report and the cache."""

import json
import math

import pytest
from safetensors.torch import load_file

from megatron_trace.parallel import run_on_ranks

OVERRIDES = ["sft.steps=3", "sft.batch_size=6", "sft.lr=0.002", "sft.warmup_steps=1", "sft.privileged_frac=0.5",
             "optim.micro_batch_size=2", "log.progress=false"]


def _rank(rundir, tp, pp, heldout, extra=()):
    from megatron_trace.config import load_config
    from megatron_trace.train.sft import run_sft

    cfg = load_config("configs/tiny_cpu.yaml", [f"run.dir={rundir}", f"parallel.tp={tp}", f"parallel.pp={pp}",
                                                f"sft.heldout={heldout}", *OVERRIDES, *extra])
    return run_sft(cfg)


def _losses(rundir):
    return [json.loads(x)["sft/loss"] for x in open(rundir / "sft_metrics.jsonl")]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_single")
    report = run_on_ranks(_rank, 1, str(d), 1, 1, 8)[0]
    return d, report


@pytest.mark.dist
def test_sft_learns_exports_and_reports(single):
    d, report = single
    losses = _losses(d)
    assert len(losses) == 3 and losses[-1] < losses[0] and report["final_loss"] == losses[-1]
    assert (d / "hf" / "config.json").exists() and (d / "hf" / "tokenizer.json").exists()
    assert report["num_heldout"] == 8 and 0.0 <= report["heldout_accuracy"] <= 1.0
    assert math.isfinite(report["ref_logprob_student"]) and math.isfinite(report["ref_logprob_teacher"])
    again = run_on_ranks(_rank, 1, str(d), 1, 1, 8)[0]  # same config: reused, not retrained
    assert again["cached"] and again["config_key"] == report["config_key"]


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp, dp, extra", [(2, 1, 1, ()), (1, 2, 1, ()), (1, 1, 2, ()),
                                               (2, 1, 1, ("loss.fused_head=true",))],
                         ids=["tp2", "pp2", "dp2", "tp2-fused-head"])
def test_sft_matches_single_process(single, tp, pp, dp, extra, tmp_path):
    """tp2-fused-head: the cross-entropy through the fused LM head (no logits) at TP=2 against
    the single process's, which goes through the output layer's logits."""
    d, _ = single
    run_on_ranks(_rank, tp * pp * dp, str(tmp_path), tp, pp, 0, extra)
    for a, b in zip(_losses(tmp_path), _losses(d)):
        assert math.isclose(a, b, rel_tol=1e-5), (a, b)
    ref, got = load_file(str(d / "hf" / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(ref) == set(got)
    for k in ref:
        assert (ref[k] - got[k]).abs().max().item() <= 1e-5, k

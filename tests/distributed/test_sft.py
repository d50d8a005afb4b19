"""SFT on the Megatron machinery: TP=2, PP=2 and DP=2 equal one process; the export, the held-out
report and the cache."""

import hashlib
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
    assert report["weights_sha256"] == hashlib.sha256((d / "hf" / "model.safetensors").read_bytes()).hexdigest()
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


_BURN = """
import threading, torch
torch.set_num_threads(2)
a = torch.randn(384, 384)
def spin():
    x = a
    while True:
        x = (x @ a).tanh()
for _ in range(2):
    threading.Thread(target=spin, daemon=True).start()
threading.Event().wait()
"""


@pytest.mark.dist
def test_sft_is_bit_reproducible_across_processes_and_load(tmp_path):
    """The demo's base must not depend on what else the machine does: the same short SFT in two
    fresh processes, the second while another process keeps both cores busy with matmuls, gives
    bitwise-identical weights and loss curves."""
    import subprocess
    import sys

    from conftest import REPO

    def sft(run_dir):
        cmd = [sys.executable, "-m", "megatron_trace.cli", "sft", "--config", "configs/tiny_cpu_sft.yaml",
               f"run.dir={run_dir}", "sft.steps=12", "sft.heldout=0", "log.progress=false"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights = sorted((run_dir / "hf").glob("*.safetensors"))
        assert weights
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in weights)).hexdigest()
        return digest, (run_dir / "sft_metrics.jsonl").read_text()

    quiet = sft(tmp_path / "quiet")
    burner = subprocess.Popen([sys.executable, "-c", _BURN])
    try:
        loaded = sft(tmp_path / "loaded")
        assert burner.poll() is None  # the load was there the whole time
    finally:
        burner.kill()
        burner.wait()
    assert loaded == quiet

"""The conversion tools as a user runs them: subprocesses that launch their own gloo ranks."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, hf_logits
from safetensors.torch import load_file


def _tool(name, *args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def _last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.dist
def test_convert_tp2_then_back_to_hf_loads_in_transformers(hf_dirs, token_batch, tmp_path):
    src = hf_dirs["untied"]
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf_out")
    res = _last_json(_tool("convert_hf_to_megatron.py", "--hf-dir", src, "--out", ckpt, "--tp", "2"))
    assert res["tp"] == 2 and res["dtype"] == "float32"
    meta = json.load(open(os.path.join(ckpt, "megatron_trace.json")))
    assert meta["saved_with"] == {"tp": 2, "pp": 1} and meta["hf_config"]["model_type"] == "qwen3"
    _tool("convert_megatron_to_hf.py", "--ckpt", ckpt, "--out", out, "--tp", "2")  # export at TP=2 too
    # Through disk and a TP=2 dist checkpoint, every tensor comes back bit for bit.
    original, written = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert set(written) == set(original) and all(torch.equal(written[k], v) for k, v in original.items())
    # transformers loads the export, and since the round trip is exact, so are the logits.
    assert torch.equal(hf_logits(out, token_batch), hf_logits(src, token_batch))
    assert os.path.exists(os.path.join(out, "generation_config.json"))  # carried through the checkpoint


@pytest.mark.dist
@pytest.mark.parametrize("layout", [("2", "1"), ("1", "2")], ids=["tp2", "pp2"])
def test_check_parity_prints_one_json_line(hf_dirs, layout):
    proc = _tool("check_parity.py", "--hf-dir", hf_dirs["tied"], "--tp", layout[0], "--pp", layout[1])
    res = _last_json(proc)
    assert (res["tp"], res["pp"]) == (int(layout[0]), int(layout[1]))
    assert 0 <= res["max_abs_logit_diff"] <= 1e-4 and res["ok"] and res["argmax_agreement"] == 1.0


def test_converter_refuses_mismatched_config(hf_dirs, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dirs["tied"], bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["head_dim"] = 64
    json.dump(cfg, open(bad / "config.json", "w"))
    proc = _tool("convert_hf_to_megatron.py", "--hf-dir", str(bad), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2
    assert "head_dim" in proc.stderr and "q_proj" in proc.stderr
    assert not (tmp_path / "o").exists()  # refused before writing anything


def test_dry_run_validates_and_writes_nothing(hf_dirs, tmp_path):
    res = _last_json(_tool("convert_hf_to_megatron.py", "--hf-dir", hf_dirs["tied"], "--out", str(tmp_path / "o"),
                           "--tp", "2", "--pp", "2", "--dry-run"))
    assert res["dry_run"] and res["padded_vocab_size"] == 1024 and res["layers_per_stage"] == 1
    assert not (tmp_path / "o").exists()
    bad = _tool("convert_hf_to_megatron.py", "--hf-dir", hf_dirs["tied"], "--out", str(tmp_path / "o"),
                "--pp", "3", "--dry-run", check=False)
    assert bad.returncode == 2 and "--pp 3" in bad.stderr

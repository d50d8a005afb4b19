"""tools/gpu_smoke.sh without a GPU: it parses, names every part, and its stdout is JSON Lines only
(one object per part) on the paths that run here: TransformerEngine missing (THD packing skipped
with the reason) and megatron-core missing (the install from the offline wheelhouse)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = os.path.join(REPO, "tools", "gpu_smoke.sh")
PARTS = ("env", "install", "handoff", "optim_ckpt", "thd_packing", "routed_loss", "fused_head", "pytest_gpu",
         "weight_sync", "train_fp32", "train_bf16", "bench_step")


def _json_lines(stdout):
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert all(isinstance(x, dict) and "part" in x and "ok" in x and "rc" in x for x in lines), stdout
    return {x["part"]: x for x in lines}


def test_script_parses_and_names_every_part():
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True).returncode == 0
    text = open(SCRIPT).read()
    for part in PARTS:
        assert f"emit {part} " in text, part
    assert "pip install --no-index --find-links" in text and "tests/gpu/test_thd_packing.py" in text
    assert "tools/bench_routed_loss.py --device cuda" in text and "memory/" in text
    assert "tools/bench_fused_head.py --device cuda" in text and "--tokens 8192" in text
    assert "timeout -k 10" in text  # every part runs under a time limit


@pytest.mark.slow
def test_thd_part_is_skipped_with_a_reason_without_transformer_engine(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_SMOKE_PARTS="thd_packing")
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parts = _json_lines(proc.stdout)
    assert set(parts) == {"env", "thd_packing"}
    assert parts["env"]["megatron.core"] and parts["env"]["torch"]
    thd = parts["thd_packing"]
    assert thd["skipped"] is True and thd["ok"] is None and "transformer_engine" in thd["reason"]
    assert (tmp_path / "out" / "summary.jsonl").read_text().splitlines() == proc.stdout.splitlines()


@pytest.mark.slow
def test_install_part_runs_when_megatron_core_is_missing(tmp_path):
    """megatron.core hidden -> a venv (--system-site-packages, which sees this interpreter's packages)
    and `pip install --no-index --find-links WHEELHOUSE megatron-trace` into it. (Here pip finds the
    project already installed; tests/e2e/test_wheelhouse.py installs a real wheelhouse.)"""
    fake = tmp_path / "fake" / "megatron"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    (tmp_path / "wheelhouse").mkdir()
    env = dict(os.environ, PYTHON=sys.executable, GPU_SMOKE_PARTS="none", PYTHONPATH=str(tmp_path / "fake"),
               WHEELHOUSE=str(tmp_path / "wheelhouse"), GPU_SMOKE_VENV=str(tmp_path / "venv"), PIP_FIND_LINKS="",
               PIP_CONFIG_FILE=os.devnull)
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=300)
    parts = _json_lines(proc.stdout)
    assert list(parts) == ["install", "env"], proc.stdout
    inst = parts["install"]
    assert inst["into"] == f"venv {tmp_path / 'venv'} (--system-site-packages)" and inst["rc"] == 0, inst
    log = open(inst["log"]).read()
    assert f"Looking in links: {tmp_path / 'wheelhouse'}" in log and "megatron-trace" in log, log[-2000:]
    assert parts["env"]["python_executable"] == str(tmp_path / "venv" / "bin" / "python")
    assert parts["env"]["torch"]  # the interpreter's own torch, through the venv

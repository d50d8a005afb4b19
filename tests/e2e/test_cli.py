"""The `megatron-trace` console script as installed by `make`."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def _cli(*args, cwd=REPO):
    exe = shutil.which("megatron-trace", path=os.path.dirname(sys.executable))
    assert exe, "the console script must be installed next to the interpreter"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_models_lists_every_size():
    proc = _cli("models")
    assert proc.returncode == 0
    rows = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"tiny", "0.6b", "1.7b", "4b", "8b", "14b", "32b"}
    assert rows["8b"] == "8.191B"


def test_unknown_subcommand_fails_loudly():
    proc = _cli("nope")
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


@pytest.mark.dist
def test_demo_runs_end_to_end(tmp_path):
    proc = _cli("demo", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(tmp_path / "demo" / "demo_report.json"))
    assert report["parity"]["max_abs_logit_diff"] <= 1e-4 and report["convert"]["tp"] == 2
    assert os.path.exists(tmp_path / "demo" / "hf_roundtrip" / "model.safetensors")


@pytest.mark.dist
def test_train_runs_and_refuses_to_overwrite_a_run(tmp_path):
    args = ["train", "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"), "train.steps=2",
            "rollout.max_new_tokens=8", "rollout.prompts_per_step=2", f"run.dir={tmp_path / 'run'}"]
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1] and all("reward/accuracy" in r and "kl/lambda" in r for r in rows)
    again = _cli(*args)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 2  # nothing overwritten

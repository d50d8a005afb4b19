"""The `megatron-trace` console script as installed by `make`."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tests"))
from fixture_processes import run_in_session  # noqa: E402


def _cli(*args, cwd=REPO):
    exe = shutil.which("megatron-trace", path=os.path.dirname(sys.executable))
    assert exe, "the console script must be installed next to the interpreter"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_models_lists_every_size():
    proc = _cli("models")
    assert proc.returncode == 0
    rows = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()[1:-1]}
    assert set(rows) == {"tiny", "demo", "demo-s", "demo-m", "demo-l", "0.6b", "1.7b", "4b", "8b", "14b", "32b"}
    assert rows["8b"] == "8.191B" and rows["demo-m"] == rows["demo"] == "915.840K"


def test_unknown_subcommand_fails_loudly():
    proc = _cli("nope")
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


@pytest.mark.dist
def test_smoke_runs_end_to_end(tmp_path):
    proc = _cli("smoke", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(tmp_path / "demo" / "smoke_report.json"))
    assert report["parity"]["max_abs_logit_diff"] <= 1e-4 and report["convert"]["tp"] == 2
    assert os.path.exists(tmp_path / "demo" / "hf_roundtrip" / "model.safetensors")


def _train(run_dir, env=None, steps=4):
    """Run `megatron-trace train` in its own session; afterwards kill whatever it left behind
    (`fixture_processes.run_in_session`)."""
    args = ["train", "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"), f"train.steps={steps}",
            "checkpoint.every=2", "rollout.max_new_tokens=8", "rollout.prompts_per_step=2", "log.progress=false",
            f"run.dir={run_dir}"]
    exe = shutil.which("megatron-trace", path=os.path.dirname(sys.executable))
    log = f"{run_dir}.log"
    os.makedirs(os.path.dirname(log), exist_ok=True)
    rc = run_in_session([exe, *args], log, env={**os.environ, **(env or {})})
    return subprocess.CompletedProcess(args, rc, "", open(log).read())


def _final_weights(run_dir, out):
    from safetensors.torch import load_file

    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_megatron_to_hf.py"), "--ckpt",
                           os.path.join(run_dir, "checkpoints", "step_000004", "model"), "--out", out],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return load_file(os.path.join(out, "model.safetensors"))


def _rows(run_dir):
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if "time" not in k and "seconds" not in k} for r in rows]


def _same_rows(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            assert x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]), (x["step"], k, x[k], y[k])  # NaN == NaN


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("run_full")
    proc = _train(d / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d / "run", _final_weights(str(d / "run"), str(d / "hf"))


@pytest.mark.dist
@pytest.mark.parametrize("fault", ["MT_FAULT_KILL_AFTER_SAVE", "MT_FAULT_KILL_DURING_SAVE"])
def test_kill_and_resume_is_bit_identical(uninterrupted, tmp_path, fault):
    full_dir, full_w = uninterrupted
    at = "2" if fault == "MT_FAULT_KILL_AFTER_SAVE" else "4"
    crashed = _train(tmp_path / "run", env={fault: at})
    assert crashed.returncode != 0  # SIGKILLed
    latest = open(tmp_path / "run" / "checkpoints" / "latest").read().strip()
    assert latest == "step_000002"  # a save killed midway never becomes "latest"
    resumed = _train(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    w = _final_weights(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert set(w) == set(full_w) and all(torch.equal(w[k], full_w[k]) for k in w)
    _same_rows(_rows(tmp_path / "run"), _rows(full_dir))  # same metrics for every step, resumed ones included
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", "step_000002", "step_000004"]


def test_train_rejects_bad_config_before_any_work(tmp_path):
    proc = _cli("train", "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"), "optim.lr=0",
                f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "'optim.lr'" in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.dist
def test_a_cpu_run_prints_no_warning_the_user_cannot_act_on(tmp_path):
    """dp=2 with the distributed optimizer used to print, at every step, torch's deprecation of
    the collectives megatron-core calls and the non-leaf `.grad` read of its zero_grad
    (megatron_trace/parallel/megatron_compat.py removes both); the console keeps our own lines."""
    exe = shutil.which("megatron-trace", path=os.path.dirname(sys.executable))
    args = ["train", "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"), "train.steps=2", "parallel.dp=2",
            "optim.distributed_optimizer=true", "rollout.max_new_tokens=8", "rollout.prompts_per_step=2",
            "log.progress=false", f"run.dir={tmp_path / 'run'}"]
    log = str(tmp_path / "run.log")
    rc = run_in_session([exe, *args], log, env=dict(os.environ))
    out = open(log).read()
    assert rc == 0, out[-3000:]
    assert "Warning" not in out, out[-3000:]
    assert "[train] done" in out

"""`make wheelhouse` yields an installable offline set: a fresh venv (no system site packages) with only
torch installed takes the project from the wheelhouse with `pip install --no-index --find-links`, and
`megatron-trace smoke` and a one-step `megatron-trace train` (without tensorboard, which is an extra)
then run. This is what a GPU machine with torch but no package index does (tools/gpu_smoke.sh).

The wheelhouse is built once (pip resolves from the index reachable here, through its cache); torch
comes from the CPU wheel the Makefile installs (torch==2.13.0, pinned through the CPU lock so that pip
never picks a CUDA build)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

LIMIT_MIB = 60
TORCH_FAMILY = ("torch-", "sympy-", "networkx-", "jinja2-", "filelock-", "fsspec-", "typing_extensions-",
                "setuptools-", "mpmath-", "markupsafe-", "nvidia_", "triton-", "cuda_")
OPTIONAL = ("datasets", "pyarrow", "pandas", "tensorboard", "matplotlib", "nemo_run", "leptonai", "ray")


def _run(cmd, timeout, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def offline_venv(tmp_path_factory):
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the CPU torch wheel and constraints/cpu-py311.txt are for CPython 3.11")
    root = tmp_path_factory.mktemp("wheelhouse")
    wh = root / "wheelhouse"
    py = "{}.{}".format(*sys.version_info[:2])
    _run(["make", "--no-print-directory", "wheelhouse", f"PY={py}", f"WHEELHOUSE={wh}", f"PYTHON={sys.executable}"],
         900, cwd=REPO)
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], 300)
    vpy = str(venv / "bin" / "python")
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    _run([vpy, "-m", "pip", "install", "--quiet", "-c", os.path.join(REPO, "constraints", "cpu-py311.txt"),
          "torch==2.13.0"], 900)
    # offline: no index, no find-links or constraints from pip's configuration, only the wheelhouse
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    _run([vpy, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wh), "megatron-trace"], 900,
         env=env)
    return {"wheelhouse": wh, "venv": venv, "python": vpy, "root": root}


def test_wheelhouse_fits_and_holds_no_torch(offline_venv):
    wh = offline_venv["wheelhouse"]
    wheels = sorted(f for f in os.listdir(wh) if f.endswith(".whl"))
    total = sum(os.path.getsize(wh / f) for f in os.listdir(wh))
    print(f"wheelhouse: {len(wheels)} wheels, {total / 2**20:.1f} MiB")
    assert total <= LIMIT_MIB * 2**20
    assert not [w for w in wheels if w.lower().startswith(TORCH_FAMILY)]
    names = {w.split("-")[0].lower() for w in wheels}
    assert {"megatron_trace", "megatron_core", "omegaconf", "math_verify", "transformers", "psutil"} <= names
    manifest = json.loads((wh / "manifest.json").read_text())
    assert manifest["python_version"] == "{}.{}".format(*sys.version_info[:2])
    assert "torch" in {e.split("==")[0].lower() for e in manifest["excluded_torch_family"]}


def test_offline_install_runs_smoke_and_train(offline_venv):
    vpy, root = offline_venv["python"], offline_venv["root"]
    bin_dir = os.path.dirname(vpy)
    # the venv has the core set only, and the package comes from the wheel, not this checkout
    code = ("import importlib.util, json, sys, megatron_trace; print(json.dumps({'file': megatron_trace.__file__, "
            "'present': [m for m in sys.argv[1:] if importlib.util.find_spec(m)]}))")
    probe = _run([vpy, "-c", code, *OPTIONAL], 120, cwd=str(root))
    got = json.loads(probe.stdout)
    assert got["present"] == [] and str(offline_venv["venv"]) in got["file"], got
    smoke = _run([os.path.join(bin_dir, "megatron-trace"), "smoke", "--out", str(root / "smoke")], 600,
                 cwd=str(root))
    assert "(ok)" in smoke.stdout and (root / "smoke" / "smoke_report.json").exists()
    # a real step of the loop (rollouts, math grading, update, checkpoint): TensorBoard logging is on by
    # default and its package is missing here, so the run warns once and goes on
    run_dir = root / "run"
    train = _run([os.path.join(bin_dir, "megatron-trace"), "train", "--config",
                  os.path.join(REPO, "configs", "tiny_cpu.yaml"), "train.steps=1", "checkpoint.every=1",
                  "log.progress=false", f"run.dir={run_dir}"], 600, cwd=str(root))
    assert "megatron-trace[tensorboard]" in train.stderr
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] >= 0 and not (run_dir / "tb").exists()

"""NeMo-Run launchers: real sbatch scripts rendered through SlurmExecutor + Experiment.dryrun
(no cluster, no ssh), the sweep, the local torchrun command, and one real local torchrun launch
at TP=2 on CPU; every recipe config carries the paper's defaults."""

import glob
import os
import subprocess
import sys

import pytest
from conftest import REPO

from megatron_trace.config import load_config

IMG = "nvcr.io/nvidia/pytorch:25.01-py3"


def _launch(script, *args, timeout=300):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, os.path.join("launch", script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def test_slurm_dry_run_renders_the_8b_recipe_on_two_nodes(tmp_path):
    out = _launch("slurm.py", "--config", "configs/qwen3_8b_trace_fkl.yaml", "--account", "acct", "--partition",
                  "batch", "--nodes", "2", "--gpus-per-node", "8", "--container-image", IMG, "--mounts",
                  "/lustre:/lustre", "--time", "06:00:00", "--dry-run", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    script = (tmp_path / "qwen3_8b_trace_fkl_sbatch.sh").read_text()
    assert script == out.stdout.strip() + "\n" or script.strip() in out.stdout
    for needle in ["#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --account=acct",
                   "#SBATCH --partition=batch", "#SBATCH --time=06:00:00", f"--container-image {IMG}",
                   "--container-mounts /lustre:/lustre", "head_node_ip=$(srun",
                   "torchrun --rdzv-backend c10d --rdzv-endpoint $head_node_ip:29500",
                   "--nnodes 2 --nproc-per-node 8 --node-rank $SLURM_NODEID",
                   "-m megatron_trace.cli train --config configs/qwen3_8b_trace_fkl.yaml",
                   "export PYTHONPATH=/nemo_run/code"]:
        assert needle in script, needle
    resolved = load_config(str(tmp_path / "qwen3_8b_trace_fkl.resolved.yaml"))
    assert (resolved.parallel.tp, resolved.cluster.nodes, resolved.loss.variant) == (2, 2, "trace_fkl")


def test_sweep_dry_run_renders_one_job_per_size_and_variant(tmp_path):
    out = _launch("sweep.py", "--sizes", "0p6b,8b", "--variants", "grpo,trace_rkl", "--account", "acct",
                  "--partition", "batch", "--container-image", IMG, "--dry-run", "--out", str(tmp_path),
                  "train.steps=50")
    assert out.returncode == 0, out.stderr[-3000:]
    scripts = sorted(glob.glob(str(tmp_path / "*_sbatch.sh")))
    assert [os.path.basename(s) for s in scripts] == [f"qwen3_{s}_{v}_sbatch.sh" for s in ("0p6b", "8b")
                                                      for v in ("grpo", "trace_rkl")]
    for path in scripts:
        text = open(path).read()
        name = os.path.basename(path)[: -len("_sbatch.sh")]
        nodes = 1 if "0p6b" in name else 2
        assert f"#SBATCH --nodes={nodes}" in text and f"--nnodes {nodes} --nproc-per-node 8" in text
        assert f"-m megatron_trace.cli train --config configs/{name}.yaml train.steps=50" in text
        assert load_config(str(tmp_path / f"{name}.resolved.yaml")).train.steps == 50
    bad = _launch("sweep.py", "--sizes", "7b", "--variants", "grpo", "--account", "a", "--partition", "p",
                  "--container-image", IMG, "--dry-run", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "--sizes" in bad.stderr and "7b" in bad.stderr
    typo = _launch("slurm.py", "--config", "configs/qwen3_8b_grpo.yaml", "--account", "a", "--partition", "p",
                   "--container-image", IMG, "--dry-run", "--out", str(tmp_path / "typo"), "optim.lrr=1")
    assert typo.returncode != 0 and "optim.lrr" in typo.stderr and "did you mean 'optim.lr'" in typo.stderr


def test_local_dry_run_prints_the_torchrun_command():
    out = _launch("local.py", "--config", "configs/tiny_cpu.yaml", "--nproc", "2", "--dry-run", "parallel.tp=2")
    assert out.returncode == 0, out.stderr[-3000:]
    cmd = out.stdout.strip().splitlines()[-1]
    assert cmd.startswith("torchrun ") and "--nnodes 1 --nproc-per-node 2" in cmd
    assert cmd.endswith("-m megatron_trace.cli train --config configs/tiny_cpu.yaml parallel.tp=2")


@pytest.mark.dist
def test_local_launch_trains_under_torchrun_at_tp2(tmp_path):
    out = _launch("local.py", "--config", "configs/tiny_cpu.yaml", "--nproc", "2", "parallel.tp=2", "train.steps=1",
                  "rollout.max_new_tokens=8", "rollout.prompts_per_step=2", "eval.every=0", "log.progress=false",
                  f"run.dir={tmp_path / 'run'}", timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"train/num_rollouts": 8.0' in lines[0]


RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "qwen3_*.yaml")))


def test_every_size_has_every_variant():
    names = {os.path.basename(p) for p in RECIPES}
    assert names == {f"qwen3_{s}_{v}.yaml" for s in ("0p6b", "1p7b", "4b", "8b", "14b", "32b")
                     for v in ("grpo", "trace_fkl", "trace_rkl", "all_token_fkl")}


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipes_carry_the_paper_defaults(path):
    c = load_config(path)
    variant = os.path.basename(path)[len("qwen3_"):-len(".yaml")].split("_", 1)[1]
    assert c.loss.variant == variant
    assert (c.loss.eps_low, c.loss.eps_high, c.loss.entry_clip, c.annotate.coverage_cap) == (0.2, 0.28, 0.05, 0.25)
    assert c.schedule.lambda0 == (0.0 if variant == "grpo" else 0.5)
    assert (c.schedule.warmup_steps, c.schedule.decay_steps) == (10, 30)
    assert (c.teacher.mode, c.teacher.sync_every) == ("snapshot", 10)
    assert (c.eval.temperature, c.eval.top_p, c.eval.top_k, c.eval.thinking) == (0.6, 0.95, 20, True)
    assert (c.rollout.engine, c.annotate.kind, c.model.dtype, c.parallel.device) == ("sglang", "api", "bfloat16", "cuda")
    assert (c.cluster.nodes * c.cluster.gpus_per_node) % (c.parallel.tp * c.parallel.pp) == 0
    assert c.model.hf_dir.endswith("Qwen3-" + c.model.size.upper())

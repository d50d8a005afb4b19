"""NeMo-Run launchers: real sbatch scripts rendered through SlurmExecutor + Experiment.dryrun
(no cluster, no ssh), the sweep over every recipe (all ranks start: tp x pp x dp = the job's
GPUs, one colocated engine per DP replica), CPU / no-container cluster profiles, the paths and
layouts the launchers resolve or refuse, the local torchrun command, and real local torchrun
launches on CPU at TP=2 and at DP=2; every recipe config carries the paper's defaults. Real
submissions to a real Slurm cluster: tests/e2e/test_slurm_cluster.py."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from megatron_trace.config import load_config

IMG = "nvcr.io/nvidia/pytorch:25.01-py3"
SIZES = ("0p6b", "1p7b", "4b", "8b", "14b", "32b")
VARIANTS = ("grpo", "trace_fkl", "trace_rkl", "all_token_fkl")
LAYOUT = re.compile(r"\[(?:slurm|sweep|local)\] (\S+): layout tp=(\d+) pp=(\d+) dp=(\d+) \((\d+) ranks = [^)]*\), "
                    r"engines=(\d+) \(")


def _layouts(stderr: str) -> dict[str, tuple[int, ...]]:
    """run name -> (tp, pp, dp, ranks, engines) from the launchers' layout lines."""
    return {m.group(1): tuple(int(g) for g in m.groups()[1:]) for m in LAYOUT.finditer(stderr)}


def _torchrun_ranks(script: str) -> int:
    """nnodes x nproc-per-node of the torchrun line in a rendered sbatch script."""
    m = re.search(r"torchrun .*--nnodes (\d+) --nproc-per-node (\d+) ", script)
    assert m, script[-2000:]
    return int(m.group(1)) * int(m.group(2))


def _launch(script, *args, timeout=300, cwd=REPO, env=None):
    """env: variables to set; None unsets one."""
    env = {k: v for k, v in {**os.environ, "COLUMNS": "200", **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def test_slurm_dry_run_renders_the_8b_recipe_on_two_nodes(tmp_path):
    out = _launch("slurm.py", "--config", "configs/qwen3_8b_trace_fkl.yaml", "--account", "acct", "--partition",
                  "batch", "--nodes", "2", "--gpus-per-node", "8", "--container-image", IMG, "--mounts",
                  "/lustre:/lustre", "--time", "06:00:00", "--dry-run", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    script = (tmp_path / "qwen3_8b_trace_fkl_sbatch.sh").read_text()
    assert script == out.stdout.strip() + "\n" or script.strip() in out.stdout
    assert script.splitlines()[1].startswith("# megatron-trace --dry-run: for inspection only (not submittable)")
    for needle in ["#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --account=acct",
                   "#SBATCH --partition=batch", "#SBATCH --time=06:00:00", f"--container-image {IMG}",
                   "--container-mounts /lustre:/lustre", "#SBATCH --job-name=mt-qwen3_8b_trace_fkl",
                   "torchrun --rdzv-backend c10d --rdzv-endpoint $head_node_ip:29500",
                   "--nnodes 2 --nproc-per-node 8 --node-rank $SLURM_NODEID",
                   "-m megatron_trace.cli train --config /nemo_run/qwen3_8b_trace_fkl.yaml",
                   "export PYTHONPATH=/nemo_run/code"]:
        assert needle in script, needle
    # one torchrun per node; the rendezvous host is the allocation's first node, from Slurm, set
    # after NeMo-Run's `hostname --ip-address` probe (which can give 127.0.0.1) and before torchrun
    assert script.count("torchrun ") == 1 and "#SBATCH --ntasks-per-node=1" in script
    rdzv = 'head_node_ip=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'
    assert script.index("hostname --ip-address") < script.index(rdzv) < script.index("torchrun ")
    assert "--exclusive" not in script and "source " not in script  # exclusive is opt-in; the image has the env
    resolved = load_config(str(tmp_path / "qwen3_8b_trace_fkl.resolved.yaml"))
    assert (resolved.parallel.tp, resolved.cluster.nodes, resolved.loss.variant) == (2, 2, "trace_fkl")
    assert (resolved.cluster.account, resolved.cluster.container_image) == ("acct", IMG)
    assert resolved.run.dir == os.path.join(REPO, "runs", "qwen3_8b_trace_fkl")  # absolute, from the launcher's cwd
    assert (resolved.parallel.dp, resolved.rollout.placement) == (None, "colocated")  # dp derived
    # every GPU is a rank: 2 x 8 = tp 2 x pp 1 x dp 8, one colocated SGLang engine per replica
    assert _layouts(out.stderr) == {"qwen3_8b_trace_fkl": (2, 1, 8, 16, 8)}, out.stderr[-2000:]
    assert "engines=8 (colocated sglang, one per DP replica, tp_size=2" in out.stderr
    assert _torchrun_ranks(script) == 2 * 1 * 8


def test_sweep_dry_run_renders_every_recipe_with_all_ranks_started(tmp_path):
    """Every GPU recipe as a job: nodes x gpus_per_node torchrun ranks = tp x pp x dp, dp an
    integer (derived, parallel.dp null), one colocated engine per DP replica."""
    out = _launch("sweep.py", "--sizes", ",".join(SIZES), "--variants", ",".join(VARIANTS), "--account", "acct",
                  "--partition", "batch", "--container-image", IMG, "--dry-run", "--out", str(tmp_path),
                  "train.steps=50")
    assert out.returncode == 0, out.stderr[-3000:]
    scripts = sorted(glob.glob(str(tmp_path / "*_sbatch.sh")))
    assert sorted(os.path.basename(s) for s in scripts) == sorted(f"qwen3_{s}_{v}_sbatch.sh" for s in SIZES
                                                                  for v in VARIANTS)
    layouts = _layouts(out.stderr)
    assert len(layouts) == len(SIZES) * len(VARIANTS), out.stderr[-3000:]
    for path in scripts:
        text = open(path).read()
        name = os.path.basename(path)[: -len("_sbatch.sh")]
        c = load_config(str(tmp_path / f"{name}.resolved.yaml"))
        assert c.train.steps == 50 and c.parallel.dp is None and c.rollout.placement == "colocated"
        # the cell: train on the resolved copy, then evaluate checkpoints/best, in the same job
        assert f"-m megatron_trace.cli cell --config /nemo_run/{name}.yaml --stage all\n" in text
        assert f"#SBATCH --gpus-per-node={c.cluster.gpus_per_node}" in text and f"--container-image {IMG}" in text
        world = c.cluster.nodes * c.cluster.gpus_per_node
        assert f"#SBATCH --nodes={c.cluster.nodes}" in text
        assert f"--nnodes {c.cluster.nodes} --nproc-per-node {c.cluster.gpus_per_node}" in text
        assert world % (c.parallel.tp * c.parallel.pp) == 0, name
        dp = world // (c.parallel.tp * c.parallel.pp)
        assert _torchrun_ranks(text) == world == c.parallel.tp * c.parallel.pp * dp, name
        assert layouts[name] == (c.parallel.tp, c.parallel.pp, dp, world, dp), (name, layouts[name])
        assert c.cluster.gpus_per_node % c.parallel.tp == 0, name  # a colocated engine stays on one node
    assert layouts["qwen3_8b_trace_fkl"][2:] == (8, 16, 8)  # the 8B recipe: dp=8, 8 engines
    bad = _launch("sweep.py", "--sizes", "7b", "--variants", "grpo", "--account", "a", "--partition", "p",
                  "--container-image", IMG, "--dry-run", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "--sizes" in bad.stderr and "7b" in bad.stderr
    typo = _launch("slurm.py", "--config", "configs/qwen3_8b_grpo.yaml", "--account", "a", "--partition", "p",
                   "--container-image", IMG, "--dry-run", "--out", str(tmp_path / "typo"), "optim.lrr=1")
    assert typo.returncode != 0 and "optim.lrr" in typo.stderr and "did you mean 'optim.lr'" in typo.stderr


@pytest.mark.parametrize("args,needles", [
    (["parallel.tp=3"], ["parallel.tp", "cluster.nodes x cluster.gpus_per_node = 16"]),
    (["parallel.dp=4"], ["parallel.dp", "16 GPUs", "parallel.dp=null"]),
    (["--gpus-per-node", "4", "parallel.tp=8"], ["parallel.tp=8", "cluster.gpus_per_node=4",
                                                 "rollout.placement=colocated"]),
], ids=["tp-does-not-divide", "dp-disagrees", "tp-group-straddles-nodes"])
def test_slurm_refuses_a_layout_whose_ranks_cannot_all_start(tmp_path, args, needles):
    out = _launch("slurm.py", "--config", "configs/qwen3_8b_trace_fkl.yaml", "--account", "a", "--partition", "p",
                  "--container-image", IMG, "--dry-run", "--out", str(tmp_path), *args)
    assert out.returncode != 0 and out.stderr.startswith("error: "), out.stderr[-2000:]
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)
    assert not glob.glob(str(tmp_path / "*_sbatch.sh"))


def test_slurm_dry_run_renders_a_cpu_job_without_a_container(tmp_path):
    """--gpus-per-node 0 --no-container: no GPU request, no container flags, no torchrun; one core
    per gloo rank (tp x pp x dp, or --cpus-per-node); the venv activated; site flags rendered."""
    out = _launch("slurm.py", "--config", "configs/tiny_cpu.yaml", "--partition", "batch", "--gpus-per-node", "0",
                  "--no-container", "--setup", "module load gcc", "--sbatch", "qos=low", "--sbatch=--requeue",
                  "--exclusive", "--dry-run", "--out", str(tmp_path), "parallel.dp=2", "train.steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    script = (tmp_path / "tiny_cpu_sbatch.sh").read_text()
    assert "for inspection only (not submittable)" in script.splitlines()[1]
    for needle in ["#SBATCH --cpus-per-task=2", "#SBATCH --nodes=1", "#SBATCH --partition=batch",
                   "#SBATCH --qos=low", "#SBATCH --requeue", "#SBATCH --exclusive", "#SBATCH --job-name=mt-tiny_cpu",
                   f"source {os.path.join(sys.prefix, 'bin', 'activate')}", "module load gcc",
                   "--kill-on-bad-exit=1 --cpus-per-task=2 python -m megatron_trace.cli train --config /",
                   "/tiny_cpu/tiny_cpu.yaml"]:
        assert needle in script, needle
    for absent in ["gpus", "gres", "--container", "torchrun", "--account", "/nemo_run"]:
        assert absent not in script, absent
    assert _layouts(out.stderr) == {"tiny_cpu": (1, 1, 2, 2, 2)}, out.stderr[-2000:]
    assert "2 ranks = 2 cores on 1 node" in out.stderr
    c = load_config(str(tmp_path / "tiny_cpu.resolved.yaml"))
    assert (c.parallel.device, c.parallel.dp, c.cluster.gpus_per_node, c.cluster.container_image) == ("cpu", 2, 0, None)
    assert c.cluster.sbatch == ["--qos=low", "--requeue"] and c.train.steps == 2
    # the cores asked for decide the ranks: dp = cpus / (tp x pp)
    out = _launch("slurm.py", "--config", "configs/tiny_cpu.yaml", "--cpus-per-node", "4", "--dry-run", "--out",
                  str(tmp_path / "four"), "parallel.tp=2", "cluster.venv=/opt/venvs/mt")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _layouts(out.stderr) == {"tiny_cpu": (2, 1, 2, 4, 2)}, out.stderr[-2000:]
    script = (tmp_path / "four" / "tiny_cpu_sbatch.sh").read_text()
    assert "#SBATCH --cpus-per-task=4" in script and "source /opt/venvs/mt/bin/activate" in script
    assert "--partition" not in script  # none given: the cluster's default partition


def test_sweep_dry_run_sweeps_the_variants_of_one_config(tmp_path):
    """--no-eval: train only (tiny_cpu.yaml keeps no best checkpoint, which a cell's evaluation
    needs: without --no-eval the sweep says so)."""
    refused = _launch("sweep.py", "--config", "configs/tiny_cpu.yaml", "--variants", "grpo", "--gpus-per-node", "0",
                      "--no-container", "--dry-run", "--out", str(tmp_path / "refused"))
    assert refused.returncode != 0 and "checkpoint.keep_best must be true" in refused.stderr
    assert "--no-eval" in refused.stderr
    out = _launch("sweep.py", "--config", "configs/tiny_cpu.yaml", "--variants", "grpo,all_token_fkl", "--no-eval",
                  "--gpus-per-node", "0", "--no-container", "--dry-run", "--out", str(tmp_path), "run.dir=/shared/tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "-m megatron_trace.cli train --config " in (tmp_path / "tiny_cpu_grpo_sbatch.sh").read_text()
    assert sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "*_sbatch.sh"))) == [
        "tiny_cpu_all_token_fkl_sbatch.sh", "tiny_cpu_grpo_sbatch.sh"]
    grpo = load_config(str(tmp_path / "tiny_cpu_grpo.resolved.yaml"))
    fkl = load_config(str(tmp_path / "tiny_cpu_all_token_fkl.resolved.yaml"))
    assert (grpo.loss.variant, grpo.schedule.lambda0, grpo.run.dir) == ("grpo", 0.0, "/shared/tiny_grpo")
    assert (fkl.loss.variant, fkl.schedule.kind, fkl.run.dir) == ("all_token_fkl", "constant", "/shared/tiny_all_token_fkl")
    assert "for inspection only, not submittable" in out.stdout


def test_sweep_dry_run_of_model_sizes_with_a_base_and_a_separate_evaluation(tmp_path):
    """--config with --sizes: model.size per cell, the SFT config resolved beside the run's, and
    with --eval-separate a one-node evaluation job that waits for its training job; sweep.json
    lists the cells for `megatron-trace report`."""
    out = _launch("sweep.py", "--config", "configs/tiny_scaling.yaml", "--sft-config", "configs/tiny_cpu_sft.yaml",
                  "--sizes", "demo-s,demo-l", "--variants", "grpo,trace_fkl", "--seeds", "1,2", "--eval-separate",
                  "--eval-final", "--gpus-per-node", "0", "--no-container", "--dry-run", "--out", str(tmp_path),
                  "run.dir=/shared/scaling/cell")
    assert out.returncode == 0, out.stderr[-3000:]
    cells = json.loads((tmp_path / "sweep.json").read_text())["cells"]
    assert len(cells) == 8 and {(c["size"], c["variant"], c["seed"]) for c in cells} == {
        (z, v, s) for z in ("demo-s", "demo-l") for v in ("grpo", "trace_fkl") for s in (1, 2)}
    name = "scaling_demo-l_trace_fkl_s2"
    assert {c["run_dir"] for c in cells if c["name"] == name} == {"cell_demo-l_trace_fkl_s2"}
    train, evaluate = (tmp_path / f"{name}_sbatch.sh").read_text(), (tmp_path / f"{name}_eval_sbatch.sh").read_text()
    assert re.search(rf"cell --config \S+/{name}.yaml --stage train --sft-config \S+/{name}.sft.yaml --eval-final", train)
    assert re.search(rf"cell --config \S+/{name}.yaml --stage eval --eval-final", evaluate)
    assert f"--dependency=afterok:<the job id of {name}>" in evaluate and "#SBATCH --nodes=1" in evaluate
    assert load_config(str(tmp_path / f"{name}.resolved.yaml")).model.size == "demo-l"
    sft = load_config(str(tmp_path / f"{name}.sft.yaml"))
    assert (sft.model.size, sft.seed, sft.sft.steps) == ("demo-l", 2, 500)
    bad = _launch("sweep.py", "--config", "configs/tiny_scaling.yaml", "--sizes", "demo-xl", "--variants", "grpo",
                  "--dry-run", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "unknown model size 'demo-xl'" in bad.stderr and "demo-l" in bad.stderr


@pytest.mark.parametrize("args,needles", [
    (["--config", "configs/qwen3_8b_grpo.yaml", "--gpus-per-node", "0", "--dry-run"],
     ["cluster.gpus_per_node=0", "parallel.device=cuda"]),
    (["--config", "configs/tiny_cpu.yaml", "--nodes", "2", "--dry-run"], ["CPU job runs on one node", "--nodes 1"]),
    (["--config", "configs/tiny_cpu.yaml", "--cpus-per-node", "3", "parallel.tp=2", "--dry-run"],
     ["does not divide the job's 3 rank(s)", "cluster.cpus_per_node=3"]),
    (["--config", "configs/tiny_cpu.yaml", "--sbatch=qos=x", "--dry-run"], []),
    # a real submission refuses relative inputs that do not exist here, naming what to set
    (["--config", "configs/qwen3_0p6b_grpo.yaml", "--partition", "p"], ["model.hf_dir=models/Qwen3-0.6B",
                                                                         "set MT_MODELS"]),
    (["--config", "configs/tiny_cpu.yaml", "--no-container", "--venv", "/nonexistent/venv"],
     ["/nonexistent/venv/bin/activate does not exist"]),
], ids=["cuda-without-gpus", "cpu-on-two-nodes", "cpus-tp-mismatch", "sbatch-flag-ok", "relative-models",
        "missing-venv"])
def test_slurm_refuses_a_profile_that_cannot_run(tmp_path, args, needles):
    out = _launch("slurm.py", *[os.path.join(REPO, a) if a.startswith("configs/") else a for a in args], "--out",
                  str(tmp_path), cwd=tmp_path, env={"MT_MODELS": None, "MT_DATA": None, "MT_RUNS": None})
    if not needles:  # a control: the flag spelled with "=" is accepted
        assert out.returncode == 0, out.stderr[-2000:]
        assert "#SBATCH --qos=x" in (tmp_path / "tiny_cpu_sbatch.sh").read_text()
        return
    assert out.returncode != 0 and "error: " in out.stderr, out.stderr[-2000:]
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)
    assert "submitted" not in out.stdout


def test_relative_paths_and_mt_variables_resolve_on_the_submitting_side(tmp_path):
    (tmp_path / "models" / "Qwen3-0.6B").mkdir(parents=True)
    (tmp_path / "data" / "openthoughts_math").mkdir(parents=True)
    out = _launch("slurm.py", "--config", os.path.join(REPO, "configs", "qwen3_0p6b_grpo.yaml"), "--container-image",
                  IMG, "--dry-run", "--out", str(tmp_path / "out"), cwd=tmp_path,
                  env={"MT_RUNS": "shared/runs", "MT_MODELS": "models", "MT_DATA": "data"})
    assert out.returncode == 0, out.stderr[-3000:]
    c = load_config(str(tmp_path / "out" / "qwen3_0p6b_grpo.resolved.yaml"))
    assert c.run.dir == str(tmp_path / "shared" / "runs" / "qwen3_0p6b_grpo")
    assert c.model.hf_dir == str(tmp_path / "models" / "Qwen3-0.6B")
    assert c.data.source == str(tmp_path / "data" / "openthoughts_math" / "train.jsonl")
    assert "MT_RUNS=shared/runs -> " + str(tmp_path / "shared" / "runs") in out.stderr


def test_plan_layout_counts_engines_by_placement_and_refuses_bad_sizes():
    sys.path.insert(0, os.path.join(REPO, "launch"))
    from layout import plan_layout

    recipe = os.path.join(REPO, "configs", "qwen3_8b_trace_fkl.yaml")
    remote = load_config(recipe, ["rollout.placement=remote", "rollout.remote.urls=[http://h1:30000,http://h2:30000]"])
    lay = plan_layout(remote, 16, "2 nodes x 8 GPUs", gpus_per_node=8, nodes=2)
    assert (lay.dp, lay.engines) == (8, 0) and "remote: 2 server(s)" in lay.line()
    rank0 = load_config(recipe, ["rollout.placement=rank0"])
    assert plan_layout(rank0, 16, "x").engines == 1
    cpu = load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"), ["parallel.tp=2"])
    lay = plan_layout(cpu, 4, "--nproc 4")
    assert (lay.tp, lay.pp, lay.dp, lay.engines) == (2, 1, 2, 2)
    assert lay.line() == "layout tp=2 pp=1 dp=2 (4 ranks = --nproc 4), engines=2 (colocated hf, one per DP replica)"
    with pytest.raises(SystemExit, match=r"parallel.tp=2 x parallel.pp=1 = 2 does not divide the job's 3 rank"):
        plan_layout(cpu, 3, "--nproc 3")
    with pytest.raises(SystemExit, match=r"parallel.dp=3 disagrees .* give dp=2"):
        plan_layout(load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"), ["parallel.tp=2", "parallel.dp=3"]),
                    4, "--nproc 4")


def test_local_dry_run_prints_the_torchrun_command():
    out = _launch("local.py", "--config", "configs/tiny_cpu.yaml", "--nproc", "2", "--dry-run", "parallel.tp=2")
    assert out.returncode == 0, out.stderr[-3000:]
    cmd = out.stdout.strip().splitlines()[-1]
    assert cmd.startswith("torchrun ") and "--nnodes 1 --nproc-per-node 2" in cmd
    assert cmd.endswith("-m megatron_trace.cli train --config configs/tiny_cpu.yaml parallel.tp=2")
    assert _layouts(out.stderr) == {"tiny_cpu": (2, 1, 1, 2, 1)}, out.stderr[-2000:]
    # parallel.dp on CPU: tp x pp x dp gloo ranks with no --nproc
    out = _launch("local.py", "--config", "configs/tiny_cpu.yaml", "--dry-run", "parallel.dp=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--nnodes 1 --nproc-per-node 2" in out.stdout.strip().splitlines()[-1]
    assert _layouts(out.stderr) == {"tiny_cpu": (1, 1, 2, 2, 2)}, out.stderr[-2000:]
    for args, needle in [(["--nproc", "3", "parallel.tp=2"], "parallel.tp=2 x parallel.pp=1 = 2 does not divide"),
                         (["--nproc", "4", "parallel.dp=3"], "parallel.dp=3 disagrees")]:
        bad = _launch("local.py", "--config", "configs/tiny_cpu.yaml", "--dry-run", *args)
        assert bad.returncode != 0 and needle in bad.stderr, bad.stderr[-2000:]


@pytest.mark.dist
@pytest.mark.parametrize("layout,expect", [(["--nproc", "2", "parallel.tp=2"], (2, 1, 1, 2, 1)),
                                           (["parallel.dp=2"], (1, 1, 2, 2, 2))], ids=["tp2", "dp2"])
def test_local_launch_trains_under_torchrun(tmp_path, layout, expect):
    """Two gloo ranks either way: one TP=2 replica, or (nproc = tp x pp x parallel.dp) two DP
    replicas with an engine each."""
    out = _launch("local.py", "--config", "configs/tiny_cpu.yaml", *layout, "train.steps=1",
                  "rollout.max_new_tokens=8", "rollout.prompts_per_step=2", "eval.every=0", "log.progress=false",
                  f"run.dir={tmp_path / 'run'}", timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert _layouts(out.stderr) == {"tiny_cpu": expect}, out.stderr[-2000:]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"train/num_rollouts": 8.0' in lines[0]


RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "qwen3_*.yaml")))


# Recipes beyond the size x variant grid: the 8B self-OPD baselines, the 1.7B localisation
# ablation and the teacher-context ablations (launch/sweep.py --ablation), name -> loss.variant.
EXTRA_RECIPES = {"qwen3_8b_all_token_rkl": "all_token_rkl", "qwen3_8b_opsd": "opsd", "qwen3_8b_srpo_like": "srpo_like",
                 "qwen3_1p7b_ablation_all_token": "all_token_rkl", "qwen3_1p7b_ablation_random25": "random_mask",
                 "qwen3_1p7b_ablation_inverted25": "inverted_mask", "qwen3_1p7b_ablation_trace_rkl": "trace_rkl",
                 "qwen3_1p7b_teacher_type_only": "trace_rkl", "qwen3_1p7b_teacher_nothink": "trace_rkl"}


@pytest.mark.parametrize("ablation, n", [("localisation", 4), ("baselines", 6), ("teacher", 3)])
def test_sweep_ablation_renders_its_set(tmp_path, ablation, n):
    """--ablation NAME submits the recipes of its set, each resolved with its own variant."""
    sys.path.insert(0, os.path.join(REPO, "launch"))
    from sweep import ABLATIONS

    out = _launch("sweep.py", "--ablation", ablation, "--partition", "batch", "--container-image", IMG, "--dry-run",
                  "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    names = sorted(os.path.basename(f)[:-len("_sbatch.sh")] for f in glob.glob(str(tmp_path / "*_sbatch.sh")))
    assert names == sorted(ABLATIONS[ablation]) and len(names) == n
    for name in names:
        c = load_config(str(tmp_path / f"{name}.resolved.yaml"))
        assert c.loss.variant == (EXTRA_RECIPES.get(name) or name[len("qwen3_"):].split("_", 1)[1])
    bad = _launch("sweep.py", "--ablation", ablation, "--variants", "grpo", "--partition", "batch", "--dry-run")
    assert bad.returncode != 0 and "--ablation" in bad.stderr


def test_every_size_has_every_variant():
    names = {os.path.basename(p) for p in RECIPES}
    assert names == {f"qwen3_{s}_{v}.yaml" for s in SIZES for v in VARIANTS} | {f"{n}.yaml" for n in EXTRA_RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipes_carry_the_paper_defaults(path):
    c = load_config(path)
    name = os.path.basename(path)[:-len(".yaml")]
    variant = EXTRA_RECIPES.get(name) or name[len("qwen3_"):].split("_", 1)[1]
    assert c.loss.variant == variant
    assert (c.loss.eps_low, c.loss.eps_high, c.loss.entry_clip, c.annotate.coverage_cap) == (0.2, 0.28, 0.05, 0.25)
    assert c.schedule.lambda0 == (0.0 if variant == "grpo" else 0.5)
    assert (c.schedule.warmup_steps, c.schedule.decay_steps) == (10, 30)
    distil_throughout = variant.startswith("all_token") or variant in ("opsd", "srpo_like")
    assert c.schedule.kind == ("constant" if distil_throughout and "ablation" not in name else "anneal")
    # the paper's evaluation: four math benchmarks and GPQA-Diamond (out of domain)
    assert c.eval.benchmarks == ["math500", "aime24", "aime25", "amc23", "gpqa_diamond"]
    assert c.checkpoint.keep_best and c.checkpoint.best_metric is None  # eval/val/avg@k, the validation split
    assert c.annotate.api.model is None and c.annotate.api.base_url == "https://api.openai.com/v1"
    assert c.loss.mask_coverage == (0.25 if variant in ("random_mask", "inverted_mask") else "matched")
    if "ablation" in name:  # every arm distils with the RKL action
        from megatron_trace.loss import ROUTE_VARIANTS

        assert (c.loss.action or ROUTE_VARIANTS[variant].action) == "rkl"
    assert c.teacher.context == ("type_only" if name.endswith("type_only") else "solution_and_type")
    assert (c.data.thinking, c.teacher.thinking) == ((False, True) if name.endswith("nothink") else (True, None))
    assert c.loss.entry_clip_mode == "none"  # measured: the only mode that keeps the lift above GRPO's
    assert (c.train.key_token_lift, c.train.lift_annotate) == (4, True)  # the lift for every variant
    assert (c.teacher.mode, c.teacher.sync_every) == ("snapshot", 10)
    assert c.optim.mini_batches == 4 and c.rollout.prompts_per_step * c.rollout.n == 512  # 4 PPO updates of 128
    assert (c.eval.temperature, c.eval.top_p, c.eval.top_k, c.eval.thinking) == (0.6, 0.95, 20, True)
    assert (c.rollout.engine, c.annotate.kind, c.model.dtype, c.parallel.device) == ("sglang", "api", "bfloat16", "cuda")
    assert (c.cluster.nodes * c.cluster.gpus_per_node) % (c.parallel.tp * c.parallel.pp) == 0
    assert (c.parallel.dp, c.rollout.placement) == (None, "colocated") and 0 < c.rollout.mem_fraction_static < 1
    assert c.model.hf_dir.endswith("Qwen3-" + c.model.size.upper())

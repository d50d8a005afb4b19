"""The Slurm launchers against a real one-node Slurm cluster (tests/slurm_cluster.py: Debian's
slurm-wlm 22.05 + munge, partition `batch`, no GPUs, no pyxis): `launch/slurm.py --wait` and a
two-variant `launch/sweep.py --wait` submit tiny CPU jobs with no container from an environment
without the project's venv on PATH (PATH=/usr/bin:/bin, the launcher run by the venv's python),
and the jobs COMPLETE with both training steps in metrics.jsonl; a 2 x 2 sweep of the CPU scaling
config trains and evaluates every cell, is reported, and is skipped when submitted again; a dp=2 job runs 2 gloo ranks on
2 requested cores; a failing job makes --wait exit non-zero. Skipped, with the reason, only
where the Slurm/munge binaries are missing (tools/install_slurm.sh, run by .ci/run, installs them)."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tests"))
from slurm_cluster import SlurmCluster, missing  # noqa: E402

pytestmark = pytest.mark.slow
# small and quick: 8 new tokens, 2 prompts x 4 rollouts, no evaluation, no checkpoint before the end
TINY = ["train.steps=2", "rollout.max_new_tokens=8", "rollout.prompts_per_step=2", "eval.every=0",
        "log.progress=false", "checkpoint.every=100"]
# the code the job runs: the working tree (default) in a git checkout, else the installed package
CODE = ["--code", "worktree" if os.path.exists(os.path.join(REPO, ".git")) else "installed"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    absent = missing()
    if absent:
        pytest.skip(f"Slurm is not installed ({', '.join(absent)} missing): tools/install_slurm.sh installs "
                    "slurm-wlm and munge (Debian), as .ci/run does")
    c = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _launch(cluster, cwd, script, *args, timeout=300):
    """Run a launcher as a user would from a shell without the venv: a minimal PATH, the venv's
    python by absolute path, the cluster's SLURM_CONF."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(cwd)), "LANG": "C.UTF-8",
           "NEMORUN_HOME": str(cwd / ".nemo_run"), **cluster.env}
    t0 = time.time()
    out = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args], capture_output=True,
                         text=True, timeout=timeout, cwd=cwd, env=env)
    print(f"{script} took {time.time() - t0:.1f}s")
    return out


def _submitted(stdout: str) -> dict[str, dict[str, str]]:
    """run name -> {"id", "run dir", "config", "script", "task log", "status", "cancel", ...} from
    the launchers' report."""
    jobs, cur = {}, None
    for line in stdout.splitlines():
        m = re.match(r"\[(?:slurm|sweep)\] submitted (\S+): job (\d+) ", line)
        if m:
            cur = jobs[m.group(1)] = {"name": m.group(1), "id": m.group(2)}
            continue
        m = re.match(r"\[(?:slurm|sweep)\]   ([a-z ]+):\s+(.*)$", line)
        if m and cur is not None:
            cur[m.group(1)] = m.group(2)
    return jobs


def _steps(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _jobcomp(cluster, job_id: str) -> str:
    """The final state jobcomp/filetxt recorded for the job."""
    for line in open(cluster.jobcomp):
        if f"JobId={job_id} " in line:
            return re.search(r"JobState=(\S+)", line).group(1)
    return "absent"


def _check_completed(cluster, job, out):
    assert f"job {job['id']} ({job['name']}) ended COMPLETED (exit code 0)" in out.stdout, out.stdout[-3000:]
    assert cluster.job(job["id"])["JobState"] == "COMPLETED"
    assert _jobcomp(cluster, job["id"]) == "COMPLETED"
    # the printed follow-up commands work against the cluster
    assert job["status"] == f"squeue -j {job['id']}"
    for cmd in (job["status"], job["finished"].split("   ")[0]):
        res = subprocess.run(cmd.split(), capture_output=True, text=True, env={**os.environ, **cluster.env})
        assert res.returncode == 0, (cmd, res.stderr)
    assert job["cancel"] == f"scancel {job['id']}"
    assert os.path.exists(job["task log"]) and os.path.exists(job["config"]) and os.path.exists(job["script"])


def test_slurm_launcher_runs_a_cpu_job_without_container_or_venv_on_path(cluster, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    out = _launch(cluster, tmp_path, "slurm.py", "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"),
                  "--partition", "batch", "--nodes", "1", "--gpus-per-node", "0", "--no-container", "--wait", *CODE,
                  *TINY, f"run.dir={run_dir}")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    jobs = _submitted(out.stdout)
    assert list(jobs) == ["tiny_cpu"], out.stdout
    job = jobs["tiny_cpu"]
    _check_completed(cluster, job, out)
    assert [row["step"] for row in _steps(run_dir)] == [0, 1]
    # a CPU job: no GPU request (gres), no container flags, the venv activated, 1 core for 1 rank
    script = open(job["script"]).read()
    assert "gpus" not in script and "gres" not in script and "--container" not in script, script
    assert f"source {os.path.join(sys.prefix, 'bin', 'activate')}" in script
    assert "#SBATCH --cpus-per-task=1" in script and "#SBATCH --job-name=mt-tiny_cpu" in script
    assert "-m megatron_trace.cli train --config " + job["config"] in script
    assert cluster.job(job["id"])["NumCPUs"] == "1"
    # the resolved config travelled with the job, and its run.dir is where the results are
    assert job["run dir"] == str(run_dir) and f"dir: {run_dir}" in open(job["config"]).read()
    assert job["task log"].startswith(str(run_dir / "slurm")), job  # logs under the run's folder


# a sweep cell, small: a 20-step SFT base, 2 RL steps with the best checkpoint kept, 5 held-out problems
CELL = ["sft.steps=20", "sft.batch_size=8", "sft.heldout=0", "data.arith.num_ops=1", "data.arith.num_train=50",
        "train.steps=2", "checkpoint.every=1", "eval.every=1", "eval.limit=2", "eval.arith_n=5", "eval.k=2",
        "rollout.prompts_per_step=2", "rollout.n=4", "rollout.max_new_tokens=16", "eval.max_new_tokens=16",
        "train.key_token_lift=0", "log.progress=false"]


def test_sweep_trains_and_evaluates_every_cell_then_reports_and_skips_them(cluster, tmp_path):
    """2 sizes x 2 variants x 1 seed of the CPU scaling config: every job trains its cell (the
    variants of a size share one SFT base) and evaluates checkpoints/best; `megatron-trace report`
    has the 4 cells; the same sweep command again submits nothing."""
    base = tmp_path / "sweep" / "cell"
    sweep = ["sweep.py", "--config", os.path.join(REPO, "configs", "tiny_scaling.yaml"), "--sft-config",
             os.path.join(REPO, "configs", "tiny_cpu_sft.yaml"), "--sizes", "demo-s,demo-m", "--variants",
             "grpo,trace_fkl", "--partition", "batch", "--gpus-per-node", "0", "--no-container", "--wait", *CODE,
             *CELL, f"run.dir={base}"]
    out = _launch(cluster, tmp_path, *sweep, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    jobs = _submitted(out.stdout)
    names = [f"scaling_{z}_{v}" for z in ("demo-s", "demo-m") for v in ("grpo", "trace_fkl")]
    assert sorted(jobs) == sorted(names), out.stdout
    for name, job in jobs.items():
        _check_completed(cluster, job, out)
        assert "cell --config " in open(job["script"]).read()
        run_dir = tmp_path / "sweep" / ("cell_" + name[len("scaling_"):])
        assert job["run dir"] == str(run_dir)
        assert json.loads((run_dir / "eval" / "best" / "eval.json").read_text())["benchmarks"]["arith"]["num_problems"] == 5
    assert sorted(os.listdir(tmp_path / "sweep" / "sft")) == ["demo-m_s1234", "demo-s_s1234"]
    report = subprocess.run([sys.executable, "-m", "megatron_trace.cli", "report", str(tmp_path / "sweep"), "--out",
                             str(tmp_path / "report")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert report.returncode == 0, report.stderr[-3000:]
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {(s, v) for s, cells in rep["cells"].items() for v in cells} == {
        (z, v) for z in ("demo-s", "demo-m") for v in ("grpo", "trace_fkl")}
    assert all(r["status"] == "ok" for r in rep["runs"]) and len(rep["runs"]) == 4
    again = _launch(cluster, tmp_path, *sweep)
    assert again.returncode == 0 and "every cell is finished (4); nothing to submit" in again.stdout, again.stderr
    assert not _submitted(again.stdout)


@pytest.mark.dist
def test_slurm_launcher_runs_two_dp_ranks_in_one_job(cluster, tmp_path):
    """parallel.dp=2 on CPU: one job asks for 2 cores and megatron-trace spawns 2 gloo ranks, one
    rollout engine each. run.dir is relative: resolved against the submitting folder. The code is
    the package installed in the venv (--code installed: nothing packaged)."""
    out = _launch(cluster, tmp_path, "slurm.py", "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"),
                  "--partition", "batch", "--gpus-per-node", "0", "--no-container", "--wait", "--code", "installed",
                  *TINY, "parallel.dp=2", "run.dir=runs/dp2")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "layout tp=1 pp=1 dp=2 (2 ranks = 2 cores on 1 node), engines=2" in out.stderr, out.stderr[-2000:]
    job = _submitted(out.stdout)["tiny_cpu"]
    _check_completed(cluster, job, out)
    assert cluster.job(job["id"])["NumCPUs"] == "2"
    assert "--cpus-per-task=2" in open(job["script"]).read()
    rows = _steps(tmp_path / "runs" / "dp2")  # relative run.dir, made absolute on the submitting side
    assert [row["step"] for row in rows] == [0, 1]
    assert all(row["dispatch/engines_used"] == 2.0 for row in rows), rows
    assert os.listdir(os.path.join(os.path.dirname(job["config"]), "code")) == []  # nothing packaged


def test_wait_exits_with_a_failed_jobs_status(cluster, tmp_path):
    out = _launch(cluster, tmp_path, "slurm.py", "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"),
                  "--partition", "batch", "--gpus-per-node", "0", "--no-container", "--wait", *CODE, *TINY,
                  f"run.dir={tmp_path / 'bad'}", "model.ckpt=/nonexistent/checkpoint")
    assert out.returncode not in (0, None), (out.stdout + out.stderr)[-4000:]
    job = _submitted(out.stdout)["tiny_cpu"]
    assert re.search(r"ended FAILED \(exit code [1-9]\d*\)", out.stdout), out.stdout[-3000:]
    assert cluster.job(job["id"])["JobState"] == "FAILED" and _jobcomp(cluster, job["id"]) == "FAILED"


@pytest.mark.dist
def test_slurm_job_starts_its_own_fleet_and_trains_asynchronously(cluster, tmp_path):
    """--rollout-nodes 1 on the one-node CPU cluster: the job makes a fresh key, starts a fixture
    server with it (cluster.rollout_server_cmd) next to the trainer, waits for /health, trains 3
    one-step-off steps through it and completes. The key (recorded by a test-only wrapper around
    the server, outside the run) is in neither the rendered job script nor any file of the run:
    logs, metrics, config."""
    from fixture_processes import SERVER, fleet_config, free_base_port

    seen = tmp_path / "secret" / "key_seen_by_the_server"
    seen.parent.mkdir()
    wrapper = tmp_path / "secret" / "record_key_then_serve.py"
    wrapper.write_text("import os, sys\n"
                       f"open({str(seen)!r}, 'w').write(os.environ['MT_FLEET_API_KEY'])\n"
                       f"os.execv(sys.executable, [sys.executable, {SERVER!r}, *sys.argv[1:]])\n")
    config = fleet_config(tmp_path, rollout_nodes=1, port=free_base_port(),
                          server_prefix=f"{sys.executable} {wrapper}")
    run_dir = tmp_path / "run"
    out = _launch(cluster, tmp_path, "slurm.py", "--config", config, "--partition", "batch", "--nodes", "1",
                  "--gpus-per-node", "0", "--no-container", "--rollout-nodes", "1", "--setup",
                  "export GLOO_SOCKET_IFNAME=lo", "--wait", *CODE, f"run.dir={run_dir}", timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "remote: a fleet in the job, 1 server(s) on the job's node" in out.stderr
    job = _submitted(out.stdout)["tiny_cpu"]
    _check_completed(cluster, job, out)
    assert cluster.job(job["id"])["NumCPUs"] == "2"  # the trainer's rank and the server
    rows = _steps(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2] and [r["async/age_max"] for r in rows] == [0, 1, 1]
    script = open(job["script"]).read()
    assert "fleet-job --config" in script and "{ set +x; } 2>/dev/null" in script
    key = seen.read_text()
    assert len(key) >= 32
    for root, _, files in os.walk(run_dir):  # the job folder (script, logs) lives in the run's
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert key.encode() not in fh.read(), os.path.join(root, f)
    assert "[fleet] 1 server(s) healthy" in open(job["task log"]).read()

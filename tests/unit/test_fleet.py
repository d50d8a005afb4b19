"""A rollout fleet inside the job (`megatron_trace/fleet/`, `cluster.rollout_nodes`): where its
servers go, what the trainer is told, the config's refusals, the key wrappers' refusals, the
health wait's errors, the memory plan of both sides, and the launcher's rendered job."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

from megatron_trace.config import load_config
from megatron_trace.config.load import ConfigError
from megatron_trace.fleet import serve
from megatron_trace.fleet.job import (
    API_KEY_ENV,
    KEY_LINES,
    _trainer_command,
    plan_fleet,
    router_command,
    server_command,
    trainer_overrides,
    wait_for_health,
)

FLEET = ["rollout.placement=remote", "model.hf_dir=/models/qwen3-8b", "rollout.async.max_age=1"]


def _gpu_cfg(*extra):
    return load_config(os.path.join(REPO, "configs", "qwen3_8b_trace_fkl.yaml"),
                       [*FLEET, "cluster.nodes=3", "cluster.rollout_nodes=1", "rollout.server_tp=2", *extra])


def test_gpu_fleet_takes_the_first_nodes_and_the_trainer_the_rest():
    cfg = _gpu_cfg()
    plan = plan_fleet(cfg, ["n0", "n1", "n2"], cpu=False)
    assert [(s.host, s.port, s.gpu) for s in plan.servers] == [("n0", 30001, 0), ("n0", 30002, 2), ("n0", 30003, 4),
                                                               ("n0", 30004, 6)]
    assert plan.router.url == "http://n0:30000" and plan.trainer_hosts == ["n1", "n2"]
    over = trainer_overrides(plan, cfg.rollout.remote.master_address)
    assert "rollout.remote.master_address=n1" in over  # the weight broadcast from the first trainer node
    assert "rollout.remote.master_address=n1" not in trainer_overrides(plan, "10.0.0.5")  # the config's stays
    assert over[0] == 'rollout.remote.urls=["http://n0:30001","http://n0:30002","http://n0:30003","http://n0:30004"]'
    assert f"rollout.remote.api_key_env={API_KEY_ENV}" in over and "rollout.remote.router_url=http://n0:30000" in over
    # the trainer's config takes the overrides
    assert load_config(os.path.join(REPO, "configs", "qwen3_8b_trace_fkl.yaml"), [*FLEET, *over]).rollout.remote.urls
    cmd = server_command(cfg, plan.servers[1])
    assert cmd[:6] == ["python", "-m", "megatron_trace.fleet.serve", "server", "--api-key-env", API_KEY_ENV]
    for flag, value in (("--model-path", "/models/qwen3-8b"), ("--port", "30002"), ("--tp-size", "2"),
                        ("--base-gpu-id", "2"), ("--mem-fraction-static", "0.85"), ("--host", "0.0.0.0")):
        assert cmd[cmd.index(flag) + 1] == value, flag
    assert "--api-key" not in cmd  # the key's name only, never the key
    router = router_command(cfg, plan)
    assert router[router.index("--worker-urls") + 1:router.index("--worker-urls") + 5] == plan.urls
    torchrun = _trainer_command(cfg, "/nemo_run/x.yaml", plan, node=2, extra=[])
    for arg in ("--nnodes=2", "--nproc-per-node=8", "--node-rank=1", "--rdzv-endpoint=n1:29500"):
        assert arg in torchrun, arg
    assert torchrun[torchrun.index("megatron_trace.cli") + 1] == "train"


def test_cpu_fleet_runs_beside_the_trainer():
    cfg = load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"),
                      [*FLEET, "cluster.gpus_per_node=0", "cluster.rollout_nodes=2", "cluster.rollout_port=31000"])
    plan = plan_fleet(cfg, ["vm"], cpu=True)
    assert plan.urls == ["http://vm:31001", "http://vm:31002"] and plan.router.url == "http://vm:31000"
    assert plan.trainer_hosts == ["vm"]
    assert _trainer_command(cfg, "c.yaml", plan, node=0, extra=["train.steps=3"])[1:5] == \
        ["-m", "megatron_trace.cli", "train", "--config"]
    one = load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"),
                      [*FLEET, "cluster.gpus_per_node=0", "cluster.rollout_nodes=1"])
    assert plan_fleet(one, ["vm"], cpu=True).router is None  # one server: no router


@pytest.mark.parametrize("extra, needle", [
    (["cluster.rollout_nodes=1", "rollout.placement=colocated"], "set rollout.placement=remote"),
    (["cluster.rollout_nodes=1", "rollout.placement=remote", "model.hf_dir=null", "rollout.engine=hf"],
     "set model.hf_dir"),
    (["cluster.rollout_nodes=2", "rollout.placement=remote", "model.hf_dir=/m", "cluster.nodes=2"],
     "leaves no node to train on"),
    (["cluster.rollout_nodes=1", "rollout.placement=remote", "model.hf_dir=/m", "cluster.nodes=2",
      "rollout.server_tp=3"], "'rollout.server_tp'=3 does not divide cluster.gpus_per_node=8"),
    (["cluster.rollout_server_cmd=serve --port {prot}"], "placeholders are among"),
    (["rollout.placement=remote"], "or a fleet started in the job"),
])
def test_fleet_config_refusals_name_the_key(extra, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(os.path.join(REPO, "configs", "qwen3_8b_trace_fkl.yaml"), extra)


def test_serve_wrappers_refuse_a_key_on_the_command_line_and_a_missing_key(monkeypatch):
    monkeypatch.delenv("MT_TEST_FLEET_KEY", raising=False)
    with pytest.raises(SystemExit, match="MT_TEST_FLEET_KEY: the variable is not set"):
        serve.main(["server", "--api-key-env", "MT_TEST_FLEET_KEY", "--", "--model-path", "m"])
    monkeypatch.setenv("MT_TEST_FLEET_KEY", "k")
    with pytest.raises(SystemExit):
        serve.main(["router", "--api-key-env", "MT_TEST_FLEET_KEY", "--", "--api-key", "k"])


def test_the_key_is_redacted_from_the_arguments_repr():
    import dataclasses

    @dataclasses.dataclass
    class Args:  # as SGLang's ServerArgs and the router's RouterArgs: dataclasses, logged with repr
        model_path: str
        api_key: str | None = None

    args = Args("m")
    args.api_key = "s3cret-key"
    serve.hide_key(args, "s3cret-key")
    assert "s3cret-key" not in repr(args) and "s3cret-key" not in f"{args=}" and "s3cret-key" not in str(args)
    assert "model_path='m'" in repr(args) and args.api_key == "s3cret-key"


def test_health_wait_names_silent_servers_and_dead_processes(tmp_path):
    with pytest.raises(RuntimeError, match=r"1 of 1 rollout server\(s\) did not answer /health within 0.3 s "
                                           r"\(cluster.rollout_start_timeout_s\): http://127.0.0.1:9"):
        wait_for_health(["http://127.0.0.1:9"], 0.3, poll_s=0.1)
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", "print('bad model path'); raise SystemExit(3)"], stdout=f)
    proc.wait()
    proc.log_path = str(log)
    with pytest.raises(RuntimeError, match="exited with code 3 before the fleet was up(.|\n)*bad model path"):
        wait_for_health(["http://127.0.0.1:9"], 30, [proc], poll_s=0.1)


def test_plan_covers_the_fleet_and_the_trainer_left():
    from megatron_trace.plan import plan_memory

    plan = plan_memory(_gpu_cfg())
    assert plan.layout["dp"] == 8  # 2 trainer nodes x 8 GPUs / tp 2, not 3 nodes
    f = plan.to_dict()["fleet"]
    assert (f["servers"], f["server_tp"], f["nodes"]) == (4, 2, 1)
    from megatron_trace.models.qwen3 import QWEN3_SIZES
    from megatron_trace.plan.params import GB

    assert f["weights_gb"] == pytest.approx(QWEN3_SIZES["8b"].num_params * 2 / 2 / GB, abs=0.01)  # bf16 over tp 2
    assert f["kv_cache_tokens"] > 0 and f["fits"]
    assert "rollout fleet (cluster.rollout_nodes): 4 server(s) x 2 GPU(s)" in plan.table()
    tiny = plan_memory(_gpu_cfg("cluster.rollout_mem_fraction=0.1", "rollout.server_tp=1"))
    assert not tiny.fleet["fits"] and not tiny.fits  # 0.1 x 80 GB cannot hold 16 GB of weights


def _launch(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", "slurm.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def test_slurm_dry_run_renders_a_job_with_its_own_fleet(tmp_path):
    out = _launch("--config", "configs/qwen3_8b_trace_fkl.yaml", "--partition", "batch", "--nodes", "3",
                  "--rollout-nodes", "1", "--container-image", "nvcr.io/x:y", "--dry-run", "--out", str(tmp_path),
                  *FLEET)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("layout tp=2 pp=1 dp=8 (16 ranks = 2 nodes x 8 GPUs (+1 rollout node)), engines=0 (remote: a fleet in "
            "the job, 8 server(s) of 1 GPU(s) on the job's first 1 node(s), behind sglang-router)") in out.stderr
    script = (tmp_path / "qwen3_8b_trace_fkl_sbatch.sh").read_text()
    for needle in ["#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                   "python -m megatron_trace.cli fleet-job --config /nemo_run/qwen3_8b_trace_fkl.yaml", *KEY_LINES]:
        assert needle in script, needle
    assert "torchrun" not in script  # the trainer nodes start it themselves
    # the key is made with tracing off, and only there
    assert script.index("{ set +x; } 2>/dev/null") < script.index(f"export {API_KEY_ENV}=") < \
        script.index("\nset -x", script.index(f"export {API_KEY_ENV}="))
    out = _launch("--config", "configs/tiny_cpu.yaml", "--partition", "batch", "--gpus-per-node", "0",
                  "--no-container", "--rollout-nodes", "2", "--dry-run", "--out", str(tmp_path / "cpu"), *FLEET)
    assert out.returncode == 0, out.stderr[-3000:]
    script = (tmp_path / "cpu" / "tiny_cpu_sbatch.sh").read_text()
    assert "#SBATCH --cpus-per-task=3" in script  # 1 trainer rank + 2 servers
    assert "-m megatron_trace.cli fleet-job --config" in script

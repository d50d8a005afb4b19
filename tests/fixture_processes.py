"""TEST HELPERS: start and stop the processes the remote-rollout tests talk to, by PID.

  char_task_model(path, seed, size) -> path          a random HF model for the arithmetic task's servers
  start_fixture_servers(n, hf_dir) -> [(proc, url)]   n `tests/sglang_fixture_server.py` servers
  start_router(worker_urls) -> (proc, url)            PyPI `sglang-router` in front of them
  fleet_config(tmp, K, port) -> path                  a tiny config whose in-job fleet is K fixture servers
  run_in_session(cmd, log) -> returncode             a command in its own session, killed whole afterwards
  pseudo_verify(items)                               mixed, deterministic rewards for a random policy
  stop_processes(procs)                               SIGTERM, then SIGKILL what is left
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from sglang_fixture_server import READY  # the line the server prints once it serves

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SERVER = os.path.join(HERE, "sglang_fixture_server.py")


def _child_env() -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's sockets on the loopback interface
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(k, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _get_ok(url: str, timeout: float = 2.0) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def char_task_model(path: str, seed: int, size: str = "tiny") -> str:
    """Save a random HF Qwen3 of `size` with the char tokenizer's vocabulary and EOS (the trainer
    sends no stop ids: a server stops on its model config's EOS) to `path`; returns path."""
    import dataclasses

    from megatron_trace.models.hf_io import make_random_hf_model
    from megatron_trace.models.qwen3 import get_arch
    from megatron_trace.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = make_random_hf_model(dataclasses.replace(get_arch(size), vocab_size=len(tok)), seed=seed)
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    return path


def start_fixture_servers(n: int, hf_dir: str, *, timeout_s: float = 120.0, log_dir: str | None = None,
                          api_key_env: str | None = None, extra_args: list[str] | None = None):
    """Start n fixture servers on 127.0.0.1 (free ports) and wait until each answers /health.
    Returns [(proc, url)]; each proc has `.log_path`. Stops what it started if one fails.
    api_key_env: the servers require the key this variable of the test's environment holds.
    extra_args: more flags for every server (e.g. --max-batch-rows 16)."""
    log_dir = log_dir or tempfile.mkdtemp(prefix="sglang_fixture_")
    procs = []
    try:
        for i in range(n):
            log_path = os.path.join(log_dir, f"server{i}.log")
            with open(log_path, "wb") as log:
                key_args = ["--api-key-env", api_key_env] if api_key_env else []
                proc = subprocess.Popen([sys.executable, SERVER, "--model-path", hf_dir,
                                         "--host", "127.0.0.1", "--port", "0", *key_args, *(extra_args or [])],
                                        stdout=log, stderr=subprocess.STDOUT, env=_child_env(), cwd=REPO)
            proc.log_path = log_path
            procs.append(proc)
        out, deadline = [], time.monotonic() + timeout_s
        for proc in procs:
            url = None
            while url is None:
                for line in _tail(proc.log_path, 1 << 20).splitlines():
                    if line.startswith(READY):
                        url = line.split()[1]
                if url is None:
                    if proc.poll() is not None:
                        raise RuntimeError(f"fixture server exited with {proc.returncode}:\n{_tail(proc.log_path)}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"fixture server not ready in {timeout_s} s:\n{_tail(proc.log_path)}")
                    time.sleep(0.1)
            while not _get_ok(url + "/health"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url}/health not OK in {timeout_s} s:\n{_tail(proc.log_path)}")
                time.sleep(0.1)
            out.append((proc, url))
        return out
    except BaseException:
        stop_processes(procs)
        raise


def start_router(worker_urls, *, policy: str = "round_robin", timeout_s: float = 60.0, log_dir: str | None = None):
    """PyPI `sglang-router` in front of worker_urls on 127.0.0.1 (a free port). Returns (proc, url)
    once a worker is reachable through it; proc has `.log_path`."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_dir = log_dir or tempfile.mkdtemp(prefix="sglang_router_")
    log_path = os.path.join(log_dir, "router.log")
    cmd = [sys.executable, "-c", "import sys; from sglang_router.cli import main; sys.argv[0] = 'sglang-router'; "
           "sys.exit(main())", "launch", "--worker-urls", *worker_urls, "--host", "127.0.0.1", "--port", str(port),
           "--policy", policy, "--log-level", "warn"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), cwd=REPO)
    proc.log_path = log_path
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while not _get_ok(url + "/health"):
            if proc.poll() is not None:
                raise RuntimeError(f"sglang-router exited with {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"sglang-router not healthy in {timeout_s} s:\n{_tail(log_path)}")
            time.sleep(0.2)
    except BaseException:
        stop_processes([proc])
        raise
    return proc, url


def stop_processes(procs, timeout_s: float = 10.0) -> None:
    """SIGTERM each process we started (by its PID), then SIGKILL the ones still alive; procs may
    be (proc, url) pairs."""
    from megatron_trace.fleet.job import stop_processes as stop

    stop([p[0] if isinstance(p, tuple) else p for p in procs], timeout_s)


def fleet_config(tmp_path, rollout_nodes: int, port: int, steps: int = 3, server_prefix: str | None = None) -> str:
    """A tiny CPU config (tiny_cpu.yaml, one-step-off, remote) whose fleet in the job is fixture
    servers, written as YAML (the command has braces); returns its path. server_prefix: what
    starts a server instead of `python tests/sglang_fixture_server.py` (it gets the same flags)."""
    import pathlib

    tmp_path = pathlib.Path(tmp_path)
    hf = char_task_model(str(tmp_path / "hf"), seed=4321)
    prefix = server_prefix or f"{sys.executable} {SERVER}"
    server = prefix + " --model-path {model} --host {host} --port {port} --api-key-env {api_key_env}"
    path = tmp_path / "fleet.yaml"
    path.write_text(f"""include: [{os.path.join(REPO, 'configs', 'tiny_cpu.yaml')}]
model: {{hf_dir: {hf}}}
rollout:
  placement: remote
  max_new_tokens: 8
  prompts_per_step: 2
  async: {{max_age: 1}}
  remote: {{master_address: 127.0.0.1, backend: gloo}}
train: {{steps: {steps}}}
eval: {{every: 0}}
log: {{progress: false}}
checkpoint: {{every: 100}}
cluster:
  gpus_per_node: 0
  rollout_nodes: {rollout_nodes}
  rollout_port: {port}
  rollout_server_cmd: "{server}"
run: {{dir: {tmp_path / 'run'}}}
""")
    return str(path)


def free_base_port() -> int:
    """A port P such that P..P+3 are free (a fleet's router and servers)."""
    import socket

    for base in range(31000, 60000, 37):
        ok = True
        for p in range(base, base + 4):
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports")


def pseudo_verify(items):
    """A random policy never solves the task; a hash of the text gives mixed, deterministic rewards."""
    import zlib

    return ["correct" if zlib.crc32(text.encode()) % 3 == 0 else "wrong" for text, _ in items]


def run_in_session(cmd: list[str], log_path: str, *, env: dict | None = None, cwd: str = REPO,
                   timeout_s: float = 600) -> int:
    """Run cmd in its own session with its output in log_path; afterwards kill whatever is left of
    the session. A SIGKILLed rank cannot stop the multiprocessing manager that Megatron's
    checkpoint writer started, and that orphan keeps inherited pipes open: hence a file, not a
    pipe, and the whole session killed once the command returns. Returns its exit code."""
    import signal

    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

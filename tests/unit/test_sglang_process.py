"""What a colocated `sglang.Engine` does to the trainer's process, and what `SGLangEngine` undoes.

SGLang 0.5.6 (`entrypoints/engine.py`) sets CUDA_DEVICE_MAX_CONNECTIONS=8 and
CUDA_MODULE_LOADING=AUTO, sets NCCL_CUMEM_ENABLE / NCCL_NVLS_ENABLE where unset, forces the spawn
start method, installs a SIGQUIT handler that kills the process tree, and its `shutdown` (also
registered with atexit) kills every child of the process. `_FakeSGLang` below does exactly those
things (from the wheel's `Engine.__init__`, `_set_envs_and_config` and `shutdown`) and starts two
sleeping "scheduler" processes. Each scenario runs in its own Python process, next to an unrelated
child of that process (the verifier pool, a checkpoint writer), which must survive.
"""

import json
import os
import subprocess
import sys
import textwrap

import psutil
import pytest

from megatron_trace.parallel.env import RANK_ENV, set_process_env

FAKE_SGLANG = textwrap.dedent('''
    import atexit, multiprocessing as mp, os, signal, subprocess, sys, types
    import psutil

    class Engine:
        def __init__(self, **server_args):
            if "NCCL_CUMEM_ENABLE" not in os.environ:
                os.environ["NCCL_CUMEM_ENABLE"] = "0"
            if "NCCL_NVLS_ENABLE" not in os.environ:
                os.environ["NCCL_NVLS_ENABLE"] = "0"
            os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "8"
            os.environ["CUDA_MODULE_LOADING"] = "AUTO"
            signal.signal(signal.SIGQUIT, lambda s, f: self._kill_tree(include_parent=True))
            mp.set_start_method("spawn", force=True)
            atexit.register(self.shutdown)
            self.procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]

        def _kill_tree(self, include_parent=False):
            for c in psutil.Process().children(recursive=True):
                c.kill()
            if include_parent:
                os.kill(os.getpid(), signal.SIGKILL)

        def shutdown(self):
            self._kill_tree(include_parent=False)

    sys.modules["sglang"] = types.SimpleNamespace(Engine=Engine)
''')

SCENARIO = textwrap.dedent('''
    import json, os, signal, subprocess, sys
    import psutil
    exec(open(sys.argv[1]).read())
    from megatron_trace.rollout.sglang import SGLangEngine

    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # as parallel.env.set_process_env leaves it on every rank
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    out = {"other": other.pid}
    eng = SGLangEngine.launch("/model", tp_size=1)
    out["engine_procs"] = eng.processes
    out["env_after_launch"] = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    out["module_loading"] = os.environ.get("CUDA_MODULE_LOADING")
    out["sigquit_ours"] = signal.getsignal(signal.SIGQUIT) == eng._on_child_failure
    eng.shutdown()
    out["engine_alive_after_shutdown"] = [psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                          for p in out["engine_procs"]]
    out["other_alive_after_shutdown"] = other.poll() is None
    mode = sys.argv[2]
    if mode == "sigquit":
        eng = SGLangEngine.launch("/model", tp_size=1)
        out["engine_procs"] = eng.processes
        try:
            os.kill(os.getpid(), signal.SIGQUIT)  # what a failing scheduler sends its parent
            out["raised"] = None
        except RuntimeError as exc:
            out["raised"] = str(exc)
        out["other_alive_after_sigquit"] = other.poll() is None
    elif mode == "exit":
        eng = SGLangEngine.launch("/model", tp_size=1)  # never shut down: atexit does it
        out["engine_procs"] = eng.processes
    print("RESULT " + json.dumps(out), flush=True)
''')


def _run(tmp_path, mode):
    fake, script = tmp_path / "fake_sglang.py", tmp_path / "scenario.py"
    fake.write_text(FAKE_SGLANG)
    script.write_text(SCENARIO)
    proc = subprocess.run([sys.executable, str(script), str(fake), mode], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout + proc.stderr
    return json.loads(line[len("RESULT "):])


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(pid):
    try:
        psutil.Process(pid).kill()
    except psutil.NoSuchProcess:
        pass


@pytest.mark.parametrize("mode", ["shutdown", "sigquit", "exit"])
def test_engine_shutdown_and_sigquit_stop_only_the_engines_processes(tmp_path, mode):
    out = _run(tmp_path, mode)
    try:
        assert len(out["engine_procs"]) == 2
        assert out["env_after_launch"] == "1"  # the trainer keeps its own setting; SGLang forced 8
        assert out["module_loading"] is None
        assert out["sigquit_ours"]
        assert out["engine_alive_after_shutdown"] == [False, False] and out["other_alive_after_shutdown"]
        if mode == "sigquit":
            assert out["raised"] and "SGLang engine failed" in out["raised"]
            assert out["other_alive_after_sigquit"]
        # after the process ended (atexit ran): the engine's processes are gone, the other child lives
        assert not any(_alive(p) for p in out["engine_procs"])
        assert _alive(out["other"])
    finally:
        _kill(out["other"])
        for p in out["engine_procs"]:
            _kill(p)


def _initialize_until_the_group(names):
    """In a fresh process (CPU mode stays on for a process's life): the settings initialize()
    has made when it reaches init_process_group."""
    from megatron_trace.parallel import state

    for k in names:
        os.environ.pop(k, None)
    seen = {}

    def fake_init(*args, **kwargs):
        seen.update({k: os.environ.get(k) for k in names})
        raise RuntimeError("stop here")

    state._init_process_group = fake_init
    try:
        state.initialize(device="cpu")
    except RuntimeError as exc:
        assert "stop here" in str(exc)
    os.environ["NCCL_NVLS_ENABLE"] = "1"  # a value the launcher exported is kept
    return seen, set_process_env(use_cuda=False)


def test_rank_env_is_set_before_the_process_group():
    """initialize() sets the same NCCL/CUDA settings on every rank before init_process_group (the
    engine owner must not be the only rank with SGLang's values)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        seen, kept = pool.apply(_initialize_until_the_group, (list(RANK_ENV),))
    assert seen["NCCL_CUMEM_ENABLE"] == "0" and seen["NCCL_NVLS_ENABLE"] == "0"
    assert kept == {"NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "1"}

"""Run a function on N local ranks (gloo on CPU), collecting each rank's return value.

Used by the tests and by the `tools/` scripts that launch their own ranks when they are not
started under torchrun. The function must be importable (defined at module level): the ranks are
new processes that unpickle it.

How ranks start (`MT_SPAWN_METHOD`): `spawn` (the default) makes each rank a fresh interpreter;
`forkserver` forks each rank from one server process of this interpreter that has torch,
megatron-core and transformers imported already, so a start costs about 0.2 s instead of 4-5 s
(measured on 2 cores). The test suite uses it (tests/conftest.py): it starts ranks hundreds of
times. Either way every rank gets the caller's environment as it is at the call (a forked rank
would otherwise see the server's) and its working directory and sys.path.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["RankFailure", "free_port", "launch", "launch_layout", "resolve_dp", "run_on_ranks"]


class RankFailure(RuntimeError):
    """One or more spawned ranks raised, crashed or timed out."""


_PEER_GRACE_S = 10.0
SPAWN_METHODS = ("spawn", "forkserver")
# megatron_trace first: its __init__ filters the import-time notices of megatron-core on CPU
_PRELOAD = ["megatron_trace", "torch", "megatron.core", "transformers", "megatron_trace.parallel"]


def _context(method: str | None):
    method = method or os.environ.get("MT_SPAWN_METHOD", "spawn")
    if method not in SPAWN_METHODS:
        raise ValueError(f"MT_SPAWN_METHOD={method!r}: expected one of {', '.join(SPAWN_METHODS)}")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)  # read once, when the server starts
    return ctx


def _errored(out_dir: str, rank: int) -> bool:
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return False
    try:
        with open(path, "rb") as f:
            return pickle.load(f)[0] == "error"
    except (EOFError, pickle.UnpicklingError):  # still being written
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world_size: int, init_file: str, out_dir: str, env: dict, args, kwargs) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MT_INIT_METHOD=f"file://{init_file}",
    )
    # Two cores shared by N ranks: oversubscribed intra-op threads only slow everything down.
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    result_path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        value = fn(*args, **kwargs)
        payload = ("ok", value)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent with the traceback
        payload = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown must not mask the real result
            pass
    with open(result_path + ".tmp", "wb") as f:
        pickle.dump(payload, f)
    os.replace(result_path + ".tmp", result_path)  # atomic: the parent polls for this file


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float | None = 600.0,
    start_method: str | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Spawn `world_size` processes running `fn(*args, **kwargs)`; return their results by rank.

    Each child sees RANK/WORLD_SIZE and `MT_INIT_METHOD` (a file:// rendezvous, so there are no
    port races); `megatron_trace.parallel.initialize` picks those up. Raises `RankFailure` with
    every failing rank's traceback if any rank raises, dies or exceeds `timeout_s` (None: no
    wall-clock limit; a rank stuck in a collective still fails by the group's own time-out).
    start_method: "spawn" or "forkserver" (None: `MT_SPAWN_METHOD`, else spawn; see the module
    docstring); a caller that measures a fresh process's memory passes "spawn".
    """
    ctx = _context(start_method)
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="mt_ranks_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_rank_main, args=(fn, r, world_size, init_file, tmp, env, args, kwargs),
                        daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        failures: list[str] = []
        deadline = time.monotonic() + timeout_s if timeout_s is not None else float("inf")
        first_failure_at: float | None = None
        # Poll instead of joining in order: when one rank dies, its peers usually block in a
        # collective forever, so give them a short grace period and then kill them.
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if first_failure_at is None and any(p.exitcode not in (None, 0) or _errored(tmp, r) for r, p in enumerate(procs)):
                first_failure_at = now
            if now > deadline or (first_failure_at is not None and now - first_failure_at > _PEER_GRACE_S):
                for r, p in enumerate(procs):
                    if p.is_alive():
                        reason = f"timed out after {timeout_s:.0f}s" if now > deadline else "killed after a peer failed"
                        failures.append(f"rank {r}: {reason}")
                        p.kill()
                break
            time.sleep(0.05)
        for p in procs:
            p.join()
        results: list[Any] = []
        for r, p in enumerate(procs):
            path = os.path.join(tmp, f"rank{r}.pkl")
            if not os.path.exists(path):
                if not any(f.startswith(f"rank {r}:") for f in failures):
                    failures.append(f"rank {r}: exited with code {p.exitcode} and no result")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                failures.append(f"rank {r}: {value}")
                results.append(None)
            else:
                results.append(value)
        if failures:
            raise RankFailure(f"{len(failures)} of {world_size} ranks failed:\n" + "\n".join(failures))
        return results


def launch(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """Run `fn` on `world_size` ranks however this process was started.

    - Under torchrun (WORLD_SIZE set): call `fn` in this rank only; returns `[result]`.
    - Otherwise on CPU, or with a single rank: spawn local gloo ranks (`run_on_ranks`).
    - Otherwise (several CUDA ranks requested without a launcher): refuse with the command to use.
    """
    import torch

    if "WORLD_SIZE" in os.environ and "MT_INIT_METHOD" not in os.environ:
        launched = int(os.environ["WORLD_SIZE"])
        if launched != world_size:
            raise ValueError(f"started with WORLD_SIZE={launched} but the layout needs {world_size} ranks")
        return [fn(*args, **kwargs)]
    if world_size > 1 and torch.cuda.is_available():
        raise ValueError(
            f"this layout needs {world_size} GPU ranks: run it under "
            f"`torchrun --nproc-per-node {world_size} ...` (CPU runs spawn their own gloo ranks)"
        )
    # No wall-clock limit: a CPU training run (a demo's SFT on a slow laptop, a CPU sweep cell)
    # may take hours; a hung collective still fails by parallel.wait_timeout_minutes.
    return run_on_ranks(fn, world_size, *args, timeout_s=None, **kwargs)


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "MT_INIT_METHOD" not in os.environ


def resolve_dp(tp: int, pp: int, dp: int | None = None) -> int:
    """The data-parallel size of a run: WORLD_SIZE / (tp * pp) under torchrun, else `dp` or 1.

    A configured `dp` that disagrees with the launched WORLD_SIZE is an error, as is a WORLD_SIZE
    that tp * pp does not divide.
    """
    if dp is not None and dp < 1:
        raise ValueError(f"parallel.dp must be >= 1, got {dp}")
    if not _under_torchrun():
        return dp or 1
    world = int(os.environ["WORLD_SIZE"])
    if world % (tp * pp):
        raise ValueError(f"started with WORLD_SIZE={world}, which parallel.tp x parallel.pp = {tp} x {pp} "
                         "does not divide")
    derived = world // (tp * pp)
    if dp is not None and dp != derived:
        raise ValueError(f"config key 'parallel.dp'={dp} but WORLD_SIZE={world} with tp={tp}, pp={pp} gives "
                         f"dp={derived}; set parallel.dp=null (or {derived})")
    return derived


def launch_layout(fn: Callable[..., Any], tp: int, pp: int, dp: int | None, *args: Any, **kwargs: Any) -> list[Any]:
    """`launch` for a tp x pp x dp layout (dp from `resolve_dp`)."""
    return launch(fn, tp * pp * resolve_dp(tp, pp, dp), *args, **kwargs)

"""Run verifications in worker processes with a hard per-item time limit.

sympy (under math-verify) can hang inside C code on adversarial answers, where no signal or
thread timeout reaches it. Each item therefore runs in a separate worker process; a worker that
exceeds the limit is killed and replaced, and the item scores as a timeout. Workers come from a
forkserver that has already imported the verifier, so a replacement starts in milliseconds, and
the parent (which may hold CUDA or gloo state) is never forked.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import time
from collections.abc import Sequence
from multiprocessing.connection import wait

__all__ = ["TIMEOUT", "VerifyPool"]

TIMEOUT = "timeout"


def _worker(conn, fn_path: str) -> None:
    module, _, name = fn_path.rpartition(".")
    fn = getattr(importlib.import_module(module), name)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        idx, args = msg
        try:
            result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported as data, the worker keeps serving
            result = ("error", f"{type(exc).__name__}: {exc}"[:500])
        conn.send((idx, result))


class VerifyPool:
    """`pool.map(items)` -> results, each `fn(*item)` or `TIMEOUT` after `timeout_s`.

    fn_path: "module.function", importable in the workers (preloaded by the forkserver).
    """

    def __init__(self, fn_path: str, num_workers: int = 2, timeout_s: float = 5.0):
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"reward pool needs num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}")
        self.fn_path, self.num_workers, self.timeout_s = fn_path, num_workers, timeout_s
        methods = mp.get_all_start_methods()
        self._ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            self._ctx.set_forkserver_preload([fn_path.rpartition(".")[0]])
        self._workers: list[tuple[mp.Process, object]] = []
        self.num_timeouts = 0
        self.num_restarts = 0

    def _start(self):
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(target=_worker, args=(child, self.fn_path), daemon=True)
        p.start()
        child.close()
        return p, parent

    def __enter__(self) -> VerifyPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for _, conn in self._workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p, _ in self._workers:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
        self._workers = []

    def map(self, items: Sequence[tuple]) -> list:
        while len(self._workers) < min(self.num_workers, max(1, len(items))):
            self._workers.append(self._start())
        results: list = [None] * len(items)
        todo = list(range(len(items)))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (item index, deadline)
        while todo or busy:
            for slot in range(len(self._workers)):
                if slot not in busy and todo:
                    idx = todo.pop()
                    self._workers[slot][1].send((idx, items[idx]))
                    busy[slot] = (idx, time.monotonic() + self.timeout_s)
            conns = {self._workers[s][1]: s for s in busy}
            next_deadline = min(d for _, d in busy.values())
            ready = wait(list(conns), timeout=max(0.0, next_deadline - time.monotonic()))
            for conn in ready:
                slot = conns[conn]
                try:
                    idx, result = conn.recv()
                except (EOFError, OSError):  # the worker died (e.g. out of memory)
                    idx, result = busy[slot][0], ("error", "worker died")
                    self._replace(slot)
                results[idx] = result
                busy.pop(slot)
            now = time.monotonic()
            for slot, (idx, deadline) in list(busy.items()):
                if now >= deadline and self._workers[slot][1] not in ready:
                    results[idx] = TIMEOUT
                    self.num_timeouts += 1
                    self._replace(slot)
                    busy.pop(slot)
        return results

    def _replace(self, slot: int) -> None:
        p, conn = self._workers[slot]
        p.kill()
        p.join()
        conn.close()
        self._workers[slot] = self._start()
        self.num_restarts += 1

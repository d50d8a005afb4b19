"""A weight sync to a fleet of SGLang servers: ONE broadcast from trainer rank 0 to every
server's ranks.

`RemoteWeightGroup.connect(engines, master_address, master_port, ...)` builds the group (server i
joins as ranks 1 + sum of the previous servers' tp sizes) with SGLang's own recipe on the trainer
side (`sync.remote_group.init_custom_process_group`). `begin_sync()` makes every server abort what
it still runs, `push(bucket)` announces the bucket to every server and broadcasts it once, and
`finish_sync(version)` flushes every cache (retried while requests drain) and sets the version.
The group therefore stands in for the engine in `sync.sync_weights`.

With `pause_mode` set (asynchronous rollouts, `rollout.async.pause_mode`), generation is not
aborted but paused: `begin_sync` sends /pause_generation {mode} to every server, the broadcast
runs while the paused requests wait (SGLang skips its model-update lock when paused), then
`finish_sync` flushes the cache (not in `in_place` mode, where SGLang refuses while paused
requests hold KV), sets the version and sends /continue_generation. `last_pause_s` is the time
the servers stood paused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

import torch

from .protocol import DEFAULT_GROUP_NAME, EngineRequestError, _dtype_name
from .remote import RemoteSGLangEngine

__all__ = ["RemoteWeightGroup", "connect"]

log = logging.getLogger(__name__)


class RemoteWeightGroup:
    """Trainer rank 0 plus the ranks of every server, in one process group for weight broadcasts.

    Build it with `RemoteWeightGroup.connect(...)` (or the module-level `connect`) on the trainer
    rank that owns the rollout fleet. `push(bucket)` announces the bucket to every server and
    broadcasts each tensor once; `update_weights`/`finish_sync` make the group usable as the
    `engine` of `sync.sync_weights`.
    """

    def __init__(self, engines: Sequence[RemoteSGLangEngine], pg, *, group_name: str, backend: str,
                 world_size: int, rank_offsets: Sequence[int], timeout_s: float):
        self.engines = list(engines)
        self.pg = pg
        self.group_name = group_name
        self.backend = backend
        self.world_size = world_size
        self.rank_offsets = list(rank_offsets)
        self.timeout_s = timeout_s
        self.weight_version = min((e.weight_version for e in self.engines), default=0)
        self._lock = threading.Lock()
        # clients whose samples come from these servers without being members (an sglang-router's):
        # their weight version follows the group's, so that samples carry the right one
        self.followers: list = []
        self.pause_mode: str | None = None  # None: abort before a sync; else SGLang's pause mode
        self.last_pause_s = 0.0
        self._paused_at: float | None = None

    @classmethod
    def connect(cls, engines: Sequence[RemoteSGLangEngine], master_address: str, master_port: int, *,
                backend: str = "nccl", group_name: str = DEFAULT_GROUP_NAME, timeout_s: float = 600.0,
                tp_sizes: Sequence[int] | None = None) -> RemoteWeightGroup:
        """POST /init_weights_update_group to every server at once and join as rank 0.

        Server i gets rank_offset = 1 + the tp sizes of servers 0..i-1 (from /get_server_info
        unless `tp_sizes` is given); world_size = 1 + their sum. master_address:master_port must
        be reachable from the servers; this process hosts the rendezvous store there.
        """
        from ...sync.remote_group import init_custom_process_group

        engines = list(engines)
        if not engines:
            raise ValueError("RemoteWeightGroup.connect needs at least one server")
        sizes = [e.tp_size for e in engines] if tp_sizes is None else [int(s) for s in tp_sizes]
        if len(sizes) != len(engines):
            raise ValueError(f"{len(sizes)} tp sizes for {len(engines)} servers")
        offsets, nxt = [], 1
        for s in sizes:
            offsets.append(nxt)
            nxt += s
        world_size = nxt
        pool = ThreadPoolExecutor(max_workers=len(engines), thread_name_prefix="wgroup-connect")
        try:
            # A trainer that was killed left its group behind on the servers (a resumed run
            # reconnects under the same name): the server tears that one down first.
            for stale in list(pool.map(lambda e: _destroy_stale(e, group_name), engines)):
                if stale:
                    log.info("weight group %r: removed a stale group of that name on %s", group_name, stale)
            futs = [pool.submit(e.call, "/init_weights_update_group",
                                {"master_address": master_address, "master_port": int(master_port), "rank_offset": off,
                                 "world_size": world_size, "group_name": group_name, "backend": backend},
                                timeout=timeout_s + 30)
                    for e, off in zip(engines, offsets)]
            # rank 0's join runs in a daemon thread: if a server refuses, it would block until the
            # timeout, and a pool thread would hold up interpreter exit that long
            own = _in_daemon_thread(init_custom_process_group, backend, f"tcp://{master_address}:{int(master_port)}",
                                    world_size, 0, group_name, timedelta(seconds=timeout_s))
            # A server that refuses answers at once while rank 0 would wait for it until the
            # timeout: fail on the first refusal, naming the server.
            _wait_all(futs + [own], engines + [None], "/init_weights_update_group", fail_fast=True)
            pg = own.result()
        finally:
            pool.shutdown(wait=False)
        group = cls(engines, pg, group_name=group_name, backend=backend, world_size=world_size, rank_offsets=offsets,
                    timeout_s=timeout_s)
        for e in engines:
            e._member_of = group
        log.info("weight group %r: trainer rank 0 + %s (world %d, %s)", group_name,
                 ", ".join(f"{e.base_url} @ rank {o}" for e, o in zip(engines, offsets)), world_size, backend)
        return group

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, flush_cache: bool = False,
             weight_version: int | None = None) -> int:
        """Announce the bucket to every server (POST /update_weights_from_distributed, at once) and
        broadcast each tensor from rank 0 in that order; raises EngineRequestError naming every
        server that did not answer success."""
        if self.pg is None:
            raise RuntimeError(f"weight group {self.group_name!r} is closed")
        bucket = [(name, t.detach().contiguous()) for name, t in named_tensors]
        if not bucket:
            return 0
        if self.backend == "nccl":
            bucket = [(n, t if t.is_cuda else t.cuda()) for n, t in bucket]
        payload = {"names": [n for n, _ in bucket], "dtypes": [_dtype_name(t.dtype) for _, t in bucket],
                   "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                   "flush_cache": bool(flush_cache)}
        if weight_version is not None:
            payload["weight_version"] = str(weight_version)
        import torch.distributed as dist

        with self._lock:
            pool = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="wgroup-push")
            try:
                futs = [pool.submit(e.call, "/update_weights_from_distributed", payload, timeout=self.timeout_s)
                        for e in self.engines]
                try:
                    for _, t in bucket:
                        dist.broadcast(t, src=0, group=self.pg)
                except Exception as exc:
                    # a server that refused at once never joined the broadcast: name it if so
                    refused = [f"{e.base_url}: {f.exception()}" for e, f in zip(self.engines, futs)
                               if f.done() and f.exception() is not None]
                    raise RuntimeError(f"weight broadcast over group {self.group_name!r} failed: {exc}"
                                       + (f"; servers that refused: {'; '.join(refused)}" if refused else "")) from exc
                _wait_all(futs, self.engines, "/update_weights_from_distributed")
            finally:
                pool.shutdown(wait=False)
        if weight_version is not None:
            self._set_version(weight_version)
        return len(bucket)

    # the engine-like face used by sync.sync_weights
    def begin_sync(self) -> None:
        """Before the first bucket: every server aborts the requests it still runs, so that none
        holds its model-update lock while rank 0 waits in the broadcast; with `pause_mode`, every
        server pauses instead."""
        if self.pause_mode is None:
            self._on_every_server("begin_sync", "/abort_request")
            return
        self._paused_at = time.perf_counter()
        self._on_every_server("pause_generation", "/pause_generation", self.pause_mode)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        n = self.push(named_tensors)
        if version is not None:
            self.finish_sync(version)
        return n

    def finish_sync(self, version: int) -> None:
        """After the last bucket: flush every server's cache and set its weight version."""
        flush = self._paused_at is None or self.pause_mode != "in_place"
        try:
            self._on_every_server("finish_sync", "/flush_cache + /update_weight_version", version, flush)
            self._set_version(version)
        finally:
            if self._paused_at is not None:
                self._on_every_server("continue_generation", "/continue_generation")
                self.last_pause_s = time.perf_counter() - self._paused_at
                self._paused_at = None

    def _on_every_server(self, method: str, endpoint: str, *args) -> None:
        """engine.method(*args) on every server at once; raises naming every server that failed."""
        with ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix=f"wgroup-{method}") as pool:
            futs = [pool.submit(getattr(e, method), *args) for e in self.engines]
            _wait_all(futs, self.engines, endpoint)

    def _set_version(self, version: int) -> None:
        self.weight_version = version
        for e in self.engines + self.followers:
            e.weight_version = version

    def close(self) -> None:
        """POST /destroy_weights_update_group to every server and destroy rank 0's group."""
        if self.pg is None:
            return
        from ...sync.remote_group import destroy_custom_process_group

        errors = []
        for e in self.engines:
            try:
                e.call("/destroy_weights_update_group", {"group_name": self.group_name}, timeout=60)
            except EngineRequestError as exc:
                errors.append(exc)
            if e._member_of is self:
                e._member_of = None
            if e._own_group is self:
                e._own_group = None
        pg, self.pg = self.pg, None
        destroy_custom_process_group(pg)
        if errors:
            raise errors[0]

    def __enter__(self) -> RemoteWeightGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(engines: Sequence[RemoteSGLangEngine], master_address: str, master_port: int, backend: str = "nccl",
            group_name: str = DEFAULT_GROUP_NAME, *, timeout_s: float = 600.0,
            tp_sizes: Sequence[int] | None = None) -> RemoteWeightGroup:
    """`RemoteWeightGroup.connect`: one weight-update group from trainer rank 0 to all servers."""
    return RemoteWeightGroup.connect(engines, master_address, master_port, backend=backend, group_name=group_name,
                                     timeout_s=timeout_s, tp_sizes=tp_sizes)


def _destroy_stale(engine: RemoteSGLangEngine, group_name: str) -> str | None:
    """POST /destroy_weights_update_group; the server's URL if it had the group, else None."""
    try:
        engine.call("/destroy_weights_update_group", {"group_name": group_name}, timeout=60)
        return engine.base_url
    except EngineRequestError:  # "The group to be destroyed does not exist."
        return None


def _in_daemon_thread(fn, *args) -> Future:
    fut: Future = Future()

    def run():
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="wgroup-rank0").start()
    return fut


def _wait_all(futs, engines, endpoint: str, *, fail_fast: bool = False) -> None:
    """Wait for the futures and raise, naming every server that failed (a single failure passes
    through unchanged). fail_fast: stop waiting at the first failure (for calls that would block
    on the refusing server). Futures whose engine is None are local work."""
    from concurrent.futures import ALL_COMPLETED, FIRST_EXCEPTION, wait

    pending = set(futs)
    while pending:
        done, pending = wait(pending, return_when=FIRST_EXCEPTION if fail_fast else ALL_COMPLETED)
        if any(f.exception() is not None for f in done):
            break
    failed = [(e, f.exception()) for e, f in zip(engines, futs) if f.done() and f.exception() is not None]
    if not failed:
        return
    if len(failed) == 1:
        raise failed[0][1]
    local = [x for e, x in failed if e is None]
    if local:
        raise local[0]
    urls = ", ".join(e.base_url for e, _ in failed)
    detail = "; ".join(f"{e.base_url}" + (f" (HTTP {x.status})" if getattr(x, "status", None) else "")
                       + f": {getattr(x, 'detail', x)}" for e, x in failed)
    raise EngineRequestError(urls, endpoint, detail) from failed[0][1]

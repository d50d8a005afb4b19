"""Colocated SGLang: an `sglang.Engine` (0.5.6) in the process of a replica's engine owner.

One RL step, in SGLang's calls:
  1. resume_memory_occupation(tags=["weights"])                 wake(["weights"])
  2. update_weights_from_tensor(named_tensors=bucket, flush_cache=False)   per bucket (HF names;
     SGLang's loader fuses q/k/v and gate/up and applies its own TP slicing)
  3. flush_cache()                                               finish_sync(version)
  4. resume_memory_occupation(tags=["kv_cache"])                 wake(["kv_cache"])
  5. generate(input_ids=[[...]], sampling_params=[{...}], return_logprob=True)
     with skip_tokenizer_init=True: token ids in, `output_ids` and
     meta_info["output_token_logprobs"] = [(logprob, token_id, None), ...] out
  6. release_memory_occupation(tags=["kv_cache", "weights"])    sleep() before training
The engine is created with enable_memory_saver=True for 1/4/6.

**Weights at engine TP > 1 (SGLang's SPMD path).** `update_weights_from_tensor` serialises its
`named_tensors` once per TP worker, and each worker rebuilds them through CUDA IPC. Plain tensors
would be one set of handles to the owner's GPU, so workers 1..tp-1 would open a context on that
GPU and copy across. Instead, every trainer TP rank of the replica's first stage (which holds the
full tensors after `export_hf_stream`, on the GPU that engine worker r also uses) serialises its
own copy (`serialize_local`), the handles are gathered to the owner, and `update_weights_per_rank`
passes SGLang's `LocalSerializedTensor(values=[h_0, ..., h_{tp-1}])`: worker r opens h_r, a
handle to its own GPU (`model_runner._unwrap_tensor`). Nothing crosses GPUs.

**What the engine does to its host process, and what is undone** (`entrypoints/engine.py`):
`_set_envs_and_config` forces CUDA_DEVICE_MAX_CONNECTIONS=8 and CUDA_MODULE_LOADING=AUTO, sets
NCCL_CUMEM_ENABLE / NCCL_NVLS_ENABLE where unset, forces the spawn start method and installs a
SIGQUIT handler that kills the whole process tree, the trainer included; `Engine.shutdown` (also
registered with atexit) kills every child process of the trainer (the verifier pool,
checkpoint writers). Here: `parallel.env.set_process_env` has already set the NCCL variables and
the start method the same way on every rank; after the launch the variables are put back as they
were in the trainer (the engine's processes keep what they inherited), SIGQUIT stops only the
engine's processes and raises in the trainer, and `shutdown` stops exactly the processes the
launch started (the atexit hook is replaced by ours).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
from collections.abc import Iterable, Sequence

import torch

from ..base import Sample, SamplingParams
from .protocol import _expand, _tag_list, import_sglang, parse_output, refuse_if_asleep

__all__ = ["ENGINE_ENV", "SGLangEngine", "serialize_local"]

log = logging.getLogger(__name__)

# Variables SGLang 0.5.6's Engine sets in its host process.
ENGINE_ENV = ("CUDA_DEVICE_MAX_CONNECTIONS", "CUDA_MODULE_LOADING", "NCCL_CUMEM_ENABLE", "NCCL_NVLS_ENABLE")


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=False)}


def _stop_trees(pids: Sequence[int], timeout_s: float = 10.0) -> None:
    """SIGTERM each process and its descendants, then SIGKILL what is left after timeout_s."""
    import psutil

    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += p.children(recursive=True) + [p]
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)


def serialize_local(tensor: torch.Tensor) -> bytes:
    """This process's tensor as SGLang serialises it for a TP worker (a CUDA IPC handle on GPU; the
    device recorded by UUID, so a worker with other visible devices finds it). The tensor must stay
    alive until the engine has loaded it."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    monkey_patch_torch_reductions()
    return MultiprocessingSerializer.serialize(tensor.detach().contiguous())


class SGLangEngine:
    """In-process (colocated) `sglang.Engine`. `processes`: the PIDs its launch started."""

    def __init__(self, engine, processes: Sequence[int] = ()):
        self.engine = engine
        self.processes = list(processes)
        self.weight_version = 0
        self._asleep: set[str] = set()
        self._prev_sigquit = None

    @classmethod
    def launch(cls, model_path: str, *, tp_size: int = 1, base_gpu_id: int = 0, mem_fraction_static: float = 0.5,
               **server_args) -> SGLangEngine:
        """Start `sglang.Engine` on GPUs [base_gpu_id, base_gpu_id + tp_size). server_args go to
        SGLang's ServerArgs (e.g. dtype, enable_deterministic_inference, random_seed)."""
        sglang = import_sglang()
        kwargs = {"enable_memory_saver": True, "skip_tokenizer_init": True, **server_args}
        env = {k: os.environ.get(k) for k in ENGINE_ENV}
        before = _children()
        prev_sigquit = signal.getsignal(signal.SIGQUIT)
        engine = sglang.Engine(model_path=model_path, tp_size=tp_size, base_gpu_id=base_gpu_id,
                               mem_fraction_static=mem_fraction_static, **kwargs)
        started = sorted(_children() - before)
        atexit.unregister(engine.shutdown)  # it would kill every child of the trainer at exit
        for k, v in env.items():  # the trainer keeps its own settings; the engine's processes have theirs
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self = cls(engine, started)
        self._prev_sigquit = prev_sigquit
        signal.signal(signal.SIGQUIT, self._on_child_failure)
        atexit.register(self.shutdown)
        log.info("SGLang engine on GPUs %d..%d: processes %s", base_gpu_id, base_gpu_id + tp_size - 1, started)
        return self

    def _on_child_failure(self, signum, frame) -> None:
        # SGLang's children send SIGQUIT to their parent when they fail.
        log.error("a process of the colocated SGLang engine failed (SIGQUIT); stopping the engine's processes %s",
                  self.processes)
        self.shutdown()
        raise RuntimeError("the colocated SGLang engine failed (a scheduler or detokenizer process sent SIGQUIT); "
                           "see its log above")

    @property
    def asleep(self) -> bool:
        return bool(self._asleep)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Sample]:
        refuse_if_asleep(self._asleep, "the SGLang engine")
        rows, sps = _expand(prompts, params, seeds)
        if not rows:
            return []
        outs = self.engine.generate(input_ids=rows, sampling_params=sps, return_logprob=True)
        if isinstance(outs, dict):
            outs = [outs]
        return [parse_output(o, self.weight_version) for o in outs]

    def _load(self, named_tensors: list) -> None:
        res = self.engine.update_weights_from_tensor(named_tensors=named_tensors, flush_cache=False)
        if isinstance(res, tuple) and len(res) >= 2 and not res[0]:
            raise RuntimeError(f"sglang.Engine.update_weights_from_tensor failed: {res[1]}")

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        """Full HF-named tensors, handed to every TP worker as they are (fine at engine TP 1)."""
        bucket = list(named_tensors)
        self._load(bucket)
        if version is not None:
            self.finish_sync(version)
        return len(bucket)

    def update_weights_per_rank(self, named_handles: Sequence[tuple[str, Sequence[bytes]]]) -> int:
        """SGLang's SPMD path: (name, [handle of TP worker 0's copy, ..., of worker tp-1's]) per
        tensor, each from `serialize_local` on the trainer rank that shares that worker's GPU."""
        from sglang.srt.model_executor.model_runner import LocalSerializedTensor

        self._load([(name, LocalSerializedTensor(values=list(handles))) for name, handles in named_handles])
        return len(named_handles)

    def finish_sync(self, version: int) -> None:
        res = self.engine.flush_cache()
        if getattr(res, "success", True) is False:
            raise RuntimeError("sglang.Engine.flush_cache refused (requests still running?)")
        self.weight_version = version

    def sleep(self, tags: Sequence[str] | None = None) -> None:
        todo = [t for t in _tag_list(tags) if t not in self._asleep]
        if todo:
            self.engine.release_memory_occupation(tags=todo)
            self._asleep |= set(todo)

    def wake(self, tags: Sequence[str] | None = None) -> None:
        # SGLang's resume removes each tag from its released set and fails for one never released.
        todo = [t for t in _tag_list(tags) if t in self._asleep]
        if todo:
            self.engine.resume_memory_occupation(tags=todo)
            self._asleep -= set(todo)

    def shutdown(self) -> None:
        """Stop the processes this engine's launch started, and nothing else (SGLang's own
        `Engine.shutdown` kills every child of the trainer). Safe to call twice."""
        procs, self.processes = self.processes, []
        if procs:
            _stop_trees(procs)
        if self._prev_sigquit is not None:
            signal.signal(signal.SIGQUIT, self._prev_sigquit)
            self._prev_sigquit = None
        atexit.unregister(self.shutdown)

"""TEST FIXTURE: the state behind `tests/sglang_fixture_server.py` (see its docstring for the
protocol it mimics): the model and its lock, generation with SGLang's pause and abort semantics,
the weight-update groups and the released memory tags of one server."""

from __future__ import annotations

import os
import random
import threading
import time

_MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
GROUP_TIMEOUT_S = 120.0  # SGLang uses torch's default (30 min); a test should fail sooner
# SGLang 0.5.6 SamplingParams.__init__ keywords; anything else is a 400, as SGLang rejects it.
_SAMPLING_KEYS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "custom_params", "stream_interval", "logit_bias", "sampling_seed",
}


class BadRequest(Exception):
    pass


class FixtureState:
    """The model, its lock, the weight groups and the released memory tags of one server."""

    def __init__(self, model_path: str, host: str, max_batch_rows: int = 0):
        import torch

        from megatron_trace.rollout import HFEngine

        torch.set_num_threads(1)
        self.model_path = model_path
        self.host = host
        self.port = 0
        self.engine = HFEngine.from_pretrained(model_path, device="cpu", dtype=torch.float32)
        self.lock = threading.Lock()  # serialises model access (generate, weight loads)
        self.groups: dict[str, object] = {}
        self.group_devices: dict[str, str] = {}  # receive buffers: cuda for nccl groups
        self.released: set[str] = set()
        self.weight_version = "default"
        self.n_requests = 0
        self.in_flight = 0  # generate requests running (SGLang's model_update_lock readers)
        self.idle = threading.Condition()
        self.abort_epoch = 0  # bumped by /abort_request abort_all
        self.paused: str | None = None  # the /pause_generation mode while paused
        self.max_batch_rows = max_batch_rows  # 0: one batch per run of identical rows

    # ------------------------------------------------------------------ generate

    def generate(self, body: dict):
        from megatron_trace.rollout import SamplingParams

        if body.get("stream"):
            raise BadRequest("the test fixture does not stream")
        ids = body.get("input_ids")
        if ids is None:
            raise BadRequest("the test fixture needs input_ids (it runs with skip_tokenizer_init)")
        single = bool(ids) and isinstance(ids[0], int)
        rows = [ids] if single else ids
        if not rows or any(not r or not all(isinstance(t, int) for t in r) for r in rows):
            raise BadRequest("input_ids must be a non-empty list of token ids or a list of such lists")
        sps = body.get("sampling_params") or {}
        if isinstance(sps, dict):
            sps = [sps] * len(rows)
        if len(sps) != len(rows):
            raise BadRequest(f"{len(sps)} sampling_params for {len(rows)} inputs")
        parsed, delay = [], 0.0
        for sp in sps:
            unknown = set(sp) - _SAMPLING_KEYS
            if unknown:
                raise BadRequest(f"unknown sampling params {sorted(unknown)}")
            if sp.get("stop") or sp.get("stop_regex"):
                raise BadRequest("stop strings need a tokenizer; the fixture has none (skip_tokenizer_init)")
            if int(sp.get("n", 1)) != 1:
                raise BadRequest("the fixture takes n=1 per row (expand samples into rows)")
            top_k = int(sp.get("top_k", -1))
            params = SamplingParams(
                n=1, temperature=float(sp.get("temperature", 1.0)), top_p=float(sp.get("top_p", 1.0)),
                top_k=-1 if top_k <= 0 else top_k, max_new_tokens=int(sp.get("max_new_tokens", 128)),
                stop_token_ids=tuple(int(t) for t in (sp.get("stop_token_ids") or ())))
            seed = sp.get("sampling_seed")
            parsed.append((params, int(seed) if seed is not None else random.randrange(2**31 - 1)))
            delay = max(delay, float((sp.get("custom_params") or {}).get("fixture_delay_s", 0.0)))
        with self.idle:
            while self.paused:  # SGLang holds new requests at the door while paused
                self.idle.wait(0.05)
            self.in_flight += 1
            epoch = self.abort_epoch
        try:
            if delay and not self._wait_unless_aborted(delay, epoch):
                return self._aborted(rows, single)
            return self._sample(rows, parsed, single, body, epoch)
        finally:
            with self.idle:
                self.in_flight -= 1
                self.idle.notify_all()

    def _wait_unless_aborted(self, seconds: float, epoch: int) -> bool:
        """Sleep up to `seconds`; False as soon as /abort_request aborts everything."""
        deadline = time.monotonic() + seconds
        with self.idle:
            while self.abort_epoch == epoch:
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                self.idle.wait(min(left, 0.05))
        return False

    def _aborted(self, rows, single):
        outs = [{"output_ids": [], "meta_info": {"id": f"fixture-{os.getpid()}-aborted-{i}", "prompt_tokens": len(r),
                                                 "completion_tokens": 0, "output_token_logprobs": [],
                                                 "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
                                                 "weight_version": self.weight_version}}
                for i, r in enumerate(rows)]
        return outs[0] if single else outs

    def abort_all(self) -> None:
        with self.idle:
            self.abort_epoch += 1
            self.idle.notify_all()

    def pause(self, mode: str) -> None:
        if mode not in ("abort", "retract", "in_place"):
            raise BadRequest(f"Invalid mode: {mode!r}. Expected one of ['abort', 'retract', 'in_place'].")
        with self.idle:
            self.paused = mode
            self.idle.notify_all()
        if mode == "abort":  # SGLang aborts until no request holds the model-update lock
            self.abort_all()
            self.wait_idle()

    def resume(self) -> None:
        with self.idle:
            self.paused = None
            self.idle.notify_all()

    def _hold_while_paused(self, epoch: int) -> bool:
        """Between two groups of a batch: wait while paused; False once the batch was aborted."""
        with self.idle:
            while self.paused and self.abort_epoch == epoch:
                self.idle.wait(0.05)
            return self.abort_epoch == epoch

    def wait_idle(self) -> None:
        """SGLang's model-update writer lock: wait until no request is in flight."""
        with self.idle:
            while self.in_flight:
                self.idle.wait(0.05)

    def _sample(self, rows, parsed, single, body, epoch):
        samples, versions = [], []
        i = 0
        while i < len(rows):  # consecutive identical rows with identical params: one batch
            j = i + 1
            while j < len(rows) and parsed[j][0] == parsed[i][0] and (
                    j - i < self.max_batch_rows if self.max_batch_rows else rows[j] == rows[i]):
                j += 1
            if not self._hold_while_paused(epoch):
                return self._aborted(rows, single)
            with self.lock:
                if self.released:
                    raise BadRequest(f"memory released ({sorted(self.released)}): resume_memory_occupation first")
                samples += self.engine.generate_rows(rows[i:j], parsed[i][0], [s for _, s in parsed[i:j]])
                versions += [self.weight_version] * (j - i)
            i = j
        with self.lock:
            self.n_requests += 1
        outs = []
        for row, s, version in zip(rows, samples, versions):
            rid = f"fixture-{os.getpid()}-{self.n_requests}-{len(outs)}"
            fr = {"type": "stop", "matched": s.token_ids[-1]} if s.finish_reason == "stop" else \
                {"type": "length", "length": len(s.token_ids)}
            meta = {"id": rid, "finish_reason": fr, "prompt_tokens": len(row),
                    "completion_tokens": len(s.token_ids), "cached_tokens": 0, "weight_version": version}
            if body.get("return_logprob"):
                meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(s.logprobs, s.token_ids)]
            outs.append({"output_ids": s.token_ids, "meta_info": meta})
        return outs[0] if single else outs

    # ------------------------------------------------------------------ weights

    def init_group(self, body: dict):
        import torch.distributed as dist  # noqa: F401

        from megatron_trace.sync.remote_group import init_custom_process_group

        name = body.get("group_name", "weight_update_group")
        if name in self.groups:
            return False, f"group {name!r} exists"
        try:
            pg = init_custom_process_group(
                backend=body.get("backend", "nccl"),
                init_method=f"tcp://{body['master_address']}:{body['master_port']}",
                world_size=int(body["world_size"]), rank=int(body["rank_offset"]), group_name=name,
                timeout=GROUP_TIMEOUT_S)
        except Exception as exc:  # SGLang answers the failure, it does not crash
            return False, f"Failed to initialize custom process group: {exc}."
        self.groups[name] = pg
        self.group_devices[name] = "cuda" if body.get("backend", "nccl") == "nccl" else "cpu"
        return True, "Succeeded to initialize custom process group."

    def destroy_group(self, body: dict):
        import torch.distributed as dist

        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:
            return False, "The group to be destroyed does not exist."
        dist.destroy_process_group(self.groups.pop(name))
        return True, "Succeeded to destroy custom process group."

    def update_from_distributed(self, body: dict):
        import torch
        import torch.distributed as dist

        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:
            return False, f"Group {name} not in {list(self.groups)}. Please call `init_weights_update_group` first."
        if not self.paused:  # SGLang takes its model-update lock only when not paused
            self.wait_idle()  # before joining the broadcast, as SGLang's tokenizer manager does
        try:
            weights, handles = [], []
            for pname, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
                t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.group_devices.get(name, "cpu"))
                handles.append(dist.broadcast(t, src=0, group=self.groups[name], async_op=True))
                weights.append((pname, t))
            for h in handles:
                h.wait()
            with self.lock:
                self.engine.update_weights(weights)
        except Exception as exc:
            return False, (f"Failed to update parameter online: {exc}. The full weights of the ModelRunner are "
                           "partially updated. Please discard the whole weights.")
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        return True, "Succeeded to update parameter online."

    def update_from_disk(self, body: dict):
        from safetensors.torch import load_file

        path = body["model_path"]
        try:
            tensors = {}
            for f in sorted(os.listdir(path)):
                if f.endswith(".safetensors"):
                    tensors.update(load_file(os.path.join(path, f)))
            if not tensors:
                return False, f"no safetensors under {path}"
            with self.lock:
                self.engine.update_weights(tensors.items())
        except Exception as exc:
            return False, f"Failed to update weights from disk: {exc}"
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        return True, "Succeeded to update model weights."

    def memory(self, body: dict, release: bool):
        tags = body.get("tags") or list(_MEMORY_TAGS)
        unknown = set(tags) - set(_MEMORY_TAGS)
        if unknown:
            raise BadRequest(f"unknown memory tags {sorted(unknown)}")
        with self.lock:  # SGLang asserts an idle scheduler
            if release:
                self.released |= set(tags)
            else:
                missing = set(tags) - self.released
                if missing:  # SGLang's scheduler would fail on offload_tags.remove(tag)
                    raise BadRequest(f"cannot resume {sorted(missing)}: not released")
                self.released -= set(tags)

    def server_info(self) -> dict:
        return {"model_path": self.model_path, "tokenizer_path": None, "host": self.host, "port": self.port,
                "tp_size": 1, "dp_size": 1, "pp_size": 1, "skip_tokenizer_init": True, "enable_memory_saver": True,
                "weight_version": self.weight_version, "disaggregation_mode": "null",
                "internal_states": [{"fixture_generate_requests": self.n_requests, "fixture_in_flight": self.in_flight}],
                "version": "0.5.6 (megatron-trace test fixture)"}

    def model_info(self) -> dict:
        return {"model_path": self.model_path, "tokenizer_path": None, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": self.weight_version,
                "has_image_understanding": False, "has_audio_understanding": False}

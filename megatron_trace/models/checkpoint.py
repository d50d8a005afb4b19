"""Loading models: from HF directories, and torch_dist checkpoints that reload under any TP/PP.

Layout of a checkpoint directory:
  <dir>/                      Megatron dist_checkpointing files (sharded by global offsets)
  <dir>/megatron_trace.json   HF config, padded vocab, the layout it was saved with, extra metadata
  <dir>/tokenizer/            tokenizer files copied from the HF source, when it had them
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from ..parallel import ParallelGroups
from .builder import build_model, padded_vocab, unwrap_model
from .qwen3 import Qwen3Arch, arch_from_hf_config

__all__ = ["META_FILE", "load_checkpoint", "load_hf", "model_sharded_state_dict", "read_meta", "save_checkpoint"]

META_FILE = "megatron_trace.json"
_PREFIX = "model."


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict as checkpoints key it (the optimizer's is built on it)."""
    return unwrap_model(model).sharded_state_dict(prefix=_PREFIX)


def save_checkpoint(model, groups: ParallelGroups, ckpt_dir: str, hf_config: dict,
                    tokenizer_dir: str | None = None, extra: dict | None = None) -> None:
    """Collective over all ranks: write this model (any TP/PP) as a torch_dist checkpoint."""
    from megatron.core import dist_checkpointing

    from .hf_io import copy_tokenizer_files

    inner = unwrap_model(model)
    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(inner), ckpt_dir)
    if dist.get_rank() == 0:
        meta = {
            "format": "torch_dist",
            "hf_config": hf_config,
            "padded_vocab_size": inner.vocab_size,
            "saved_with": {"tp": groups.tp_size, "pp": groups.pp_size},
            "params_dtype": str(next(inner.parameters()).dtype).removeprefix("torch."),
            **(extra or {}),
        }
        if tokenizer_dir:
            meta["tokenizer_files"] = copy_tokenizer_files(tokenizer_dir, os.path.join(ckpt_dir, "tokenizer"))
        with open(os.path.join(ckpt_dir, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
    dist.barrier()


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron-trace checkpoint (no {META_FILE})")
    with open(path) as f:
        return json.load(f)


def load_checkpoint(ckpt_dir: str, groups: ParallelGroups, *, params_dtype: torch.dtype | None = None,
                    model=None, **build_kwargs):
    """Collective: build (or fill `model`) for the current layout and load `ckpt_dir` into it."""
    from megatron.core import dist_checkpointing

    meta = read_meta(ckpt_dir)
    arch: Qwen3Arch = arch_from_hf_config(meta["hf_config"], source=os.path.join(ckpt_dir, META_FILE))
    want = padded_vocab(arch.vocab_size, groups.tp_size)
    if meta["padded_vocab_size"] != want:
        raise ValueError(
            f"{ckpt_dir}: saved with padded vocab {meta['padded_vocab_size']}, but tp={groups.tp_size} "
            f"pads to {want}; choose a TP that divides 1024 or convert again from HF"
        )
    if model is None:
        dtype = params_dtype or getattr(torch, meta.get("params_dtype", "float32"))
        model = build_model(arch, groups, params_dtype=dtype, **build_kwargs)
    inner = unwrap_model(model)
    state = dist_checkpointing.load(model_sharded_state_dict(inner), ckpt_dir)
    state = {k[len(_PREFIX):]: v for k, v in state.items() if k.startswith(_PREFIX)}
    missing, unexpected = inner.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{ckpt_dir}: checkpoint does not match the model: missing={missing} unexpected={unexpected}")
    return model


def load_hf(hf_dir: str, groups: ParallelGroups, *, params_dtype: torch.dtype = torch.float32,
            progress: bool = False, **build_kwargs):
    """Collective: build this rank's stage from an HF Qwen3 directory's config and weights."""
    from .convert import HFCheckpointReader, load_hf_into_model

    arch = arch_from_hf_config(hf_dir)
    model = build_model(arch, groups, params_dtype=params_dtype, **build_kwargs)
    load_hf_into_model(model, HFCheckpointReader(hf_dir), groups, progress=progress)
    return model

"""Conversion and parity jobs behind `tools/` (importable, so spawned ranks can run them)."""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

from ..parallel import initialize, launch
from .builder import padded_vocab
from .checkpoint import load_checkpoint, load_hf, read_meta, save_checkpoint
from .convert import (
    HFCheckpointReader,
    check_hf_tensors,
    export_hf_stream,
    hf_param_names,
)
from .forward import forward_logits, gather_full_logits
from .hf_io import copy_tokenizer_files, save_hf_checkpoint
from .qwen3 import arch_from_hf_config

__all__ = [
    "check_parity", "convert_hf_to_megatron", "convert_megatron_to_hf", "read_hf_config", "run_tool",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if name is None or name == "auto":
        return default
    if name not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)} or auto, got {name!r}")
    return _DTYPES[name]


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--hf-dir {hf_dir}: no config.json")
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------ HF -> Megatron


def _import_rank(hf_dir: str, out: str, tp: int, pp: int, dtype: torch.dtype, device: str) -> dict:
    groups = initialize(tp=tp, pp=pp, device=device)
    model = load_hf(hf_dir, groups, params_dtype=dtype, progress=True, perform_initialization=False)
    save_checkpoint(model, groups, out, hf_config=read_hf_config(hf_dir), tokenizer_dir=hf_dir,
                    extra={"converted_from": os.path.abspath(hf_dir)})
    return {"rank": dist.get_rank()}


def convert_hf_to_megatron(hf_dir: str, out: str, tp: int = 1, pp: int = 1, dtype: str | None = None,
                           device: str = "auto", dry_run: bool = False) -> dict:
    """Validate an HF Qwen3 directory and write it as a torch_dist checkpoint at TP/PP.

    dry_run: validate config and tensors and report the plan, without starting ranks or writing.
    """
    t0 = time.time()
    cfg = read_hf_config(hf_dir)
    arch = arch_from_hf_config(cfg, source=os.path.join(hf_dir, "config.json"))
    check_hf_tensors(HFCheckpointReader(hf_dir), arch)  # fail before any rank starts
    if arch.num_hidden_layers % pp:
        raise ValueError(f"--pp {pp} must divide num_hidden_layers={arch.num_hidden_layers}")
    if arch.num_key_value_heads % tp and tp % arch.num_key_value_heads:
        raise ValueError(f"--tp {tp} and num_key_value_heads={arch.num_key_value_heads} must divide one another")
    torch_dtype = _dtype(dtype, getattr(torch, str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")))
    plan = {"out": out, "tp": tp, "pp": pp, "dtype": str(torch_dtype).removeprefix("torch."),
            "num_params": arch.num_params, "padded_vocab_size": padded_vocab(arch.vocab_size, tp),
            "layers_per_stage": arch.num_hidden_layers // pp}
    if dry_run:
        return {**plan, "dry_run": True}
    launch(_import_rank, tp * pp, hf_dir, out, tp, pp, torch_dtype, device)
    return {**plan, "seconds": round(time.time() - t0, 2)}


# ------------------------------------------------------------------ Megatron -> HF


def _export_rank(ckpt: str, out: str, tp: int, pp: int, dtype: torch.dtype | None, device: str) -> dict:
    groups = initialize(tp=tp, pp=pp, device=device)
    meta = read_meta(ckpt)
    model = load_checkpoint(ckpt, groups, perform_initialization=False)
    stream = export_hf_stream(model, groups, dtype=dtype)
    if dist.get_rank() == 0:
        hf_config = dict(meta["hf_config"])
        if dtype is not None:
            hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
        files = save_hf_checkpoint(stream, out, hf_config, progress=True, total=len(hf_param_names(model.arch)))
        tok = os.path.join(ckpt, "tokenizer")
        copied = copy_tokenizer_files(tok, out) if os.path.isdir(tok) else []
        return {"files": files, "tokenizer_files": copied}
    for _ in stream:  # the export is collective: every rank walks it
        pass
    return {}


def convert_megatron_to_hf(ckpt: str, out: str, tp: int = 1, pp: int = 1, dtype: str | None = None,
                           device: str = "auto") -> dict:
    """Load a torch_dist checkpoint at TP/PP and write an HF directory (config + safetensors)."""
    t0 = time.time()
    read_meta(ckpt)
    res = launch(_export_rank, tp * pp, ckpt, out, tp, pp, None if dtype in (None, "auto") else _dtype(dtype), device)
    return {"out": out, **res[0], "seconds": round(time.time() - t0, 2)}


# ------------------------------------------------------------------ parity


def _parity_rank(hf_dir: str | None, ckpt: str | None, tp: int, pp: int, input_ids: torch.Tensor, device: str):
    groups = initialize(tp=tp, pp=pp, device=device)
    if ckpt:
        model = load_checkpoint(ckpt, groups, params_dtype=torch.float32, perform_initialization=False)
    else:
        model = load_hf(hf_dir, groups, params_dtype=torch.float32, perform_initialization=False)
    shard = forward_logits(model, groups, input_ids)
    full = gather_full_logits(shard, groups, model.arch.vocab_size, tuple(input_ids.shape))
    return full.cpu() if dist.get_rank() == 0 else None


@torch.no_grad()
def check_parity(hf_dir: str, ckpt: str | None = None, tp: int = 1, pp: int = 1, batch: int = 2, seq: int = 16,
                 seed: int = 0, device: str = "auto", tol: float = 1e-4) -> dict:
    """Megatron (gathered, fp32) vs `transformers` Qwen3ForCausalLM logits on a fixed random batch."""
    from transformers import AutoModelForCausalLM

    cfg = read_hf_config(hf_dir)
    arch = arch_from_hf_config(cfg, source=os.path.join(hf_dir, "config.json"))
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, arch.vocab_size, (batch, seq), generator=gen)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ref = hf(input_ids).logits.float()
    del hf
    results = launch(_parity_rank, tp * pp, None if ckpt else hf_dir, ckpt, tp, pp, input_ids, device)
    ours = results[0]
    if ours is None:  # under torchrun only global rank 0 holds the logits
        return {}
    diff = (ours.float() - ref).abs()
    return {
        "max_abs_logit_diff": diff.max().item(),
        "ok": diff.max().item() <= tol,
        "tol": tol,
        "mean_abs_logit_diff": diff.mean().item(),
        "argmax_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "tp": tp,
        "pp": pp,
        "source": "ckpt" if ckpt else "hf",
        "batch": batch,
        "seq": seq,
        "vocab": arch.vocab_size,
    }


def run_tool(job, *args, **kwargs) -> int:
    """Run a job for a `tools/` script: print its JSON result, or the error and exit code 2.

    A result with `"ok": false` exits 1; an empty result (a non-zero rank under torchrun) prints nothing.
    """
    import sys

    try:
        res = job(*args, **kwargs)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if res:
        print(json.dumps(res))
    return 1 if res.get("ok") is False else 0

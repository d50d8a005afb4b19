"""HF-side I/O: write a checkpoint from an export stream, and make tiny random Qwen3 models."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable

import torch

from .qwen3 import Qwen3Arch

__all__ = ["TOKENIZER_FILES", "copy_tokenizer_files", "make_random_hf_model", "save_hf_checkpoint"]

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy whichever tokenizer/generation files exist in `src` to `dst`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.exists(path):
            os.makedirs(dst, exist_ok=True)
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def save_hf_checkpoint(
    stream: Iterable[tuple[str, torch.Tensor]],
    out_dir: str,
    hf_config: dict,
    *,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = False,
    total: int | None = None,
) -> list[str]:
    """Write `config.json` and safetensors shards (with an index when there is more than one).

    The stream is consumed once; tensors are moved to CPU and written shard by shard, so peak
    host memory is about one shard.
    """
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush(final: bool) -> None:
        idx = len(files) + 1
        name = "model.safetensors" if final and idx == 1 else f"model-{idx:05d}.safetensors"
        save_file(shards[-1], os.path.join(out_dir, name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shards[-1]})

    from tqdm.auto import tqdm

    for hf_name, tensor in tqdm(stream, desc="export HF weights", unit="tensor", total=total, disable=not progress):
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            flush(final=False)
            shards[-1], sizes[-1] = {}, 0
        shards[-1][hf_name] = t.clone()  # own the storage: views into a shared buffer break safetensors
        sizes[-1] += nbytes
        total += nbytes
    flush(final=not files)
    if len(files) > 1:
        # Rename to the conventional "-of-N" pattern once N is known.
        n = len(files)
        renamed = {}
        for i, old in enumerate(files, 1):
            new = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(out_dir, old), os.path.join(out_dir, new))
            renamed[old] = new
        weight_map = {k: renamed[v] for k, v in weight_map.items()}
        files = list(renamed.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return files


def make_random_hf_model(arch: Qwen3Arch, out_dir: str | None = None, *, seed: int = 0,
                         dtype: torch.dtype = torch.float32):
    """A random `transformers` Qwen3ForCausalLM of `arch` (saved to `out_dir` if given).

    Norm weights are perturbed away from 1 so that a mapping that swaps q_norm/k_norm or the two
    layer norms cannot pass a parity test by accident.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = arch.to_hf_dict()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    for key in ("architectures", "model_type"):
        cfg.pop(key)
    config = Qwen3Config(**cfg)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    if out_dir is not None:
        model.save_pretrained(out_dir, safe_serialization=True)
    return model

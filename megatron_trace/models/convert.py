"""Qwen3 HF <-> Megatron weight mapping for any TP/PP layout.

Import: `load_hf_into_model` fills this rank's stage from full HF tensors, slicing its TP shard.
Export: `export_hf_stream` yields `(hf_name, full_tensor)` on every rank: TP shards are
all-gathered, the owning PP stage broadcasts, fused layouts are undone and vocab padding is
stripped. Weight sync to rollout engines consumes the same stream.

Layouts (api_notes section 3.2):
  linear_qkv  [(nq + 2*ng)*hd, H], rows grouped per KV group: [q_g0..q_g(nq/ng-1), k_g, v_g];
              TP shards are whole groups, so the global tensor is the dim-0 concat of shards.
  linear_fc1  global [gate; up]; TP rank r holds [gate_r; up_r] (not a contiguous slice).
  linear_proj, linear_fc2  row-parallel: shards concatenate on dim 1.
Both the local spec's layer-norm names and TE's fused `*.layer_norm_weight` names are handled.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..parallel import ParallelGroups
from .builder import unwrap_model
from .qwen3 import Qwen3Arch

__all__ = [
    "HFCheckpointReader",
    "hf_source",
    "check_hf_tensors",
    "expected_hf_shapes",
    "export_hf_stream",
    "hf_param_names",
    "load_hf_into_model",
    "merge_fc1",
    "merge_qkv",
    "split_fc1",
    "split_qkv",
]

# ----------------------------------------------------------------------------- fused layouts


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Qwen3Arch) -> torch.Tensor:
    """HF q/k/v `[nq*hd, H]`, `[ng*hd, H]` x2 -> Megatron grouped `[(nq+2ng)*hd, H]`."""
    ng, hd = arch.num_key_value_heads, arch.head_dim
    per = arch.num_attention_heads // ng
    h = q.shape[-1]
    return torch.cat([q.reshape(ng, per * hd, h), k.reshape(ng, hd, h), v.reshape(ng, hd, h)], dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, arch: Qwen3Arch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `merge_qkv` on the full (TP-gathered) tensor."""
    ng, hd = arch.num_key_value_heads, arch.head_dim
    per = arch.num_attention_heads // ng
    h = qkv.shape[-1]
    q, k, v = qkv.reshape(ng, per + 2, hd, h).split([per, 1, 1], dim=1)
    return q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()


def merge_fc1(gate: torch.Tensor, up: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """TP rank's `[gate_r; up_r]` shard of fc1."""
    return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)


def split_fc1(shards: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank `[gate_r; up_r]` shards -> full gate, up."""
    halves = [s.chunk(2, 0) for s in shards]
    return torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])


# ----------------------------------------------------------------------------- name mapping

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Megatron per-layer suffix -> (HF per-layer suffixes, kind). Kinds: rep (replicated),
# col (dim-0 shard), row (dim-1 shard), qkv, fc1.
_LAYER_MAP: dict[str, tuple[tuple[str, ...], str]] = {
    "input_layernorm.weight": (("input_layernorm.weight",), "rep"),
    "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight",), "rep"),  # TE
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "rep"),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "rep"),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "row"),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "rep"),
    "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight",), "rep"),  # TE
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1"),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "row"),
}


@dataclass(frozen=True)
class _Target:
    hf_names: tuple[str, ...]
    kind: str  # rep | row | qkv | fc1 | vocab


def _strip_wrappers(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def hf_source(name: str, layer_offset: int, arch: Qwen3Arch) -> _Target:
    """HF source of a Megatron parameter, given this stage's first global layer index."""
    name = _strip_wrappers(name)
    if name == "embedding.word_embeddings.weight":
        return _Target(("model.embed_tokens.weight",), "vocab")
    if name == "output_layer.weight":
        # With PP>1 and tied embeddings the last stage keeps a copy of the embedding.
        src = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        return _Target((src,), "vocab")
    if name == "decoder.final_layernorm.weight":
        return _Target(("model.norm.weight",), "rep")
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_MAP:
        layer = int(m.group(1)) + layer_offset
        suffixes, kind = _LAYER_MAP[m.group(2)]
        return _Target(tuple(f"model.layers.{layer}.{s}" for s in suffixes), kind)
    raise KeyError(f"no HF mapping for Megatron parameter {name!r}")


def hf_param_names(arch: Qwen3Arch) -> list[str]:
    """Every tensor name an HF Qwen3 checkpoint of `arch` holds, in export order."""
    names = ["model.embed_tokens.weight"]
    for layer in range(arch.num_hidden_layers):
        p = f"model.layers.{layer}."
        names += [p + s for s in (
            "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
            "self_attn.v_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
            "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
            "mlp.up_proj.weight", "mlp.down_proj.weight",
        )]
    names.append("model.norm.weight")
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def _layer_offset(model) -> int:
    """Global index of this stage's first layer (Megatron's layer_number is 1-based, global)."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    return layers[0].layer_number - 1 if layers is not None and len(layers) else 0


def _params(model) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for name, p in unwrap_model(model).named_parameters():
        yield _strip_wrappers(name), p


# ----------------------------------------------------------------------------- HF reading


class HFCheckpointReader:
    """Lazy access to the tensors of an HF safetensors directory (single file or sharded)."""

    def __init__(self, hf_dir: str | os.PathLike):
        from safetensors import safe_open

        self.dir = os.fspath(hf_dir)
        index = os.path.join(self.dir, "model.safetensors.index.json")
        single = os.path.join(self.dir, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(single):
            with safe_open(single, "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}
        self._safe_open = safe_open

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: checkpoint has no tensor {name!r}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = self._safe_open(os.path.join(self.dir, file), "pt")
        return self._handles[file].get_tensor(name)


# ----------------------------------------------------------------------------- import


def _shard_for_rank(target: _Target, hf: list[torch.Tensor], arch: Qwen3Arch, tp_size: int, tp_rank: int,
                    padded_vocab: int) -> torch.Tensor:
    kind = target.kind
    if kind == "rep":
        return hf[0]
    if kind == "row":
        return hf[0].chunk(tp_size, 1)[tp_rank]
    if kind == "qkv":
        return merge_qkv(*hf, arch).chunk(tp_size, 0)[tp_rank]
    if kind == "fc1":
        return merge_fc1(hf[0], hf[1], tp_size, tp_rank)
    if kind == "vocab":
        full = hf[0]
        pad = padded_vocab - full.shape[0]
        if pad < 0:
            raise ValueError(f"HF vocab {full.shape[0]} exceeds the model's padded vocab {padded_vocab}")
        full = torch.cat([full, full.new_zeros(pad, full.shape[1])]) if pad else full
        return full.chunk(tp_size, 0)[tp_rank]
    raise AssertionError(kind)


@torch.no_grad()
def load_hf_into_model(model, reader: HFCheckpointReader, groups: ParallelGroups, progress: bool = False) -> int:
    """Copy HF weights into this rank's stage; returns the number of parameters filled.

    Every parameter of the stage must be covered and every shape must match, else ValueError.
    """
    inner = unwrap_model(model)
    arch: Qwen3Arch = inner.arch
    offset = _layer_offset(inner)
    padded = inner.vocab_size
    count = 0
    params = list(_params(inner))
    show = progress and (not dist.is_initialized() or dist.get_rank() == 0)
    for name, param in tqdm(params, desc="import HF weights (rank 0's stage)", unit="tensor", disable=not show):
        target = hf_source(name, offset, arch)
        tensors = [reader.get(n) for n in target.hf_names]
        shard = _shard_for_rank(target, tensors, arch, groups.tp_size, groups.tp_rank, padded)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: HF {target.hf_names} gives a shard of shape {tuple(shard.shape)} but the "
                f"Megatron parameter is {tuple(param.shape)} (tp={groups.tp_size}); the HF config and "
                "the checkpoint's tensors disagree"
            )
        param.copy_(shard.to(param.dtype))
        count += 1
    return count


# ----------------------------------------------------------------------------- export


def _tp_gather(t: torch.Tensor, dim: int, groups: ParallelGroups) -> list[torch.Tensor]:
    if groups.tp_size == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(groups.tp_size)]
    dist.all_gather(parts, t.contiguous(), group=groups.tp)
    return parts


def _manifest(model, groups: ParallelGroups) -> list[tuple[str, tuple[int, ...], torch.dtype, int, int]]:
    """(global megatron name, local shape, dtype, partition dim or -1, owner stage) for the pipeline."""
    inner = unwrap_model(model)
    arch: Qwen3Arch = inner.arch
    offset = _layer_offset(inner)
    local = []
    for name, p in _params(inner):
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue  # tied copy on the last stage; the embedding is exported instead
        m = _LAYER.match(name)
        gname = f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else name
        # From the mapping, not from Megatron's `tensor_model_parallel` attributes: those are only
        # set when the model was built with perform_initialization=True.
        kind = hf_source(gname, 0, arch).kind
        pdim = -1 if kind == "rep" or groups.tp_size == 1 else (1 if kind == "row" else 0)
        local.append((gname, tuple(p.shape), p.dtype, pdim, groups.pp_rank))
    if groups.pp_size == 1:
        return local
    stages: list = [None] * groups.pp_size
    dist.all_gather_object(stages, local, group=groups.pp)
    return [entry for stage in stages for entry in stage]


@torch.no_grad()
def export_hf_stream(model, groups: ParallelGroups, dtype: torch.dtype | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, full_tensor)` for every HF tensor, identically on every rank.

    Collective: all ranks of the model-parallel group must iterate the stream to the end.
    Tensors are on `groups.device`; `dtype` casts them (default: the parameter dtype).
    """
    inner = unwrap_model(model)
    arch: Qwen3Arch = inner.arch
    local = dict(_params(inner))
    offset = _layer_offset(inner)
    for gname, shape, pdtype, pdim, owner in _manifest(inner, groups):
        m = _LAYER.match(gname)
        local_name = f"decoder.layers.{int(m.group(1)) - offset}.{m.group(2)}" if m else gname
        full_shape = list(shape)
        if pdim >= 0:
            full_shape[pdim] *= groups.tp_size
        if owner == groups.pp_rank:
            p = local[local_name]
            parts = _tp_gather(p.detach(), max(pdim, 0), groups) if pdim >= 0 else [p.detach()]
        else:
            parts = None
        target = hf_source(gname, 0, arch)
        if target.kind == "fc1":
            if parts is not None:
                gate, up = split_fc1(parts)
                full = torch.cat([gate, up])
            else:
                full = None
        else:
            full = torch.cat(parts, dim=max(pdim, 0)) if parts is not None else None
        if groups.pp_size > 1:
            if full is None:
                full = torch.empty(full_shape, dtype=pdtype, device=groups.device)
            dist.broadcast(full, src=groups.pp_global_rank(owner), group=groups.pp)
        if dtype is not None:
            full = full.to(dtype)
        if target.kind == "qkv":
            yield from zip(target.hf_names, split_qkv(full, arch))
        elif target.kind == "fc1":
            yield from zip(target.hf_names, full.chunk(2, 0))
        elif target.kind == "vocab":
            yield target.hf_names[0], full[: arch.vocab_size]  # strip vocab padding
        else:
            yield target.hf_names[0], full


# ----------------------------------------------------------------------------- validation


def expected_hf_shapes(arch: Qwen3Arch) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor an HF checkpoint of `arch` must hold."""
    h, hd, v = arch.hidden_size, arch.head_dim, arch.vocab_size
    q, kv, f = arch.num_attention_heads * hd, arch.num_key_value_heads * hd, arch.intermediate_size
    per_layer = {
        "input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
        "self_attn.o_proj.weight": (h, q), "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for layer in range(arch.num_hidden_layers):
        shapes.update({f"model.layers.{layer}.{k}": s for k, s in per_layer.items()})
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


# Which config key most likely explains a shape mismatch on a tensor family.
_SUSPECT_KEYS = {
    "embed_tokens": "vocab_size/hidden_size", "lm_head": "vocab_size/tie_word_embeddings",
    "q_proj": "num_attention_heads/head_dim", "k_proj": "num_key_value_heads/head_dim",
    "v_proj": "num_key_value_heads/head_dim", "o_proj": "num_attention_heads/head_dim",
    "q_norm": "head_dim", "k_norm": "head_dim", "proj": "intermediate_size",
}


def check_hf_tensors(reader: HFCheckpointReader, arch: Qwen3Arch) -> None:
    """Refuse a checkpoint whose tensors disagree with its config (names, shapes, extras).

    Reads only safetensors headers, so it is cheap even for 32B checkpoints.
    """
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(reader.weight_map.values())):
        with safe_open(os.path.join(reader.dir, file), "pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    want = expected_hf_shapes(arch)
    problems = []
    for name, shape in want.items():
        if name not in shapes:
            problems.append(f"missing tensor {name}")
        elif shapes[name] != shape:
            family = next((v for k, v in _SUSPECT_KEYS.items() if k in name), "the config")
            problems.append(f"{name}: config implies {shape}, checkpoint has {shapes[name]} (check {family})")
    extra = sorted(set(shapes) - set(want))
    if extra == ["lm_head.weight"] and arch.tie_word_embeddings:
        # Some exports write the tied head anyway. Harmless only if it *is* the embedding;
        # otherwise tying would silently replace a trained head.
        if torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            extra = []
        else:
            problems.append("tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight")
            extra = []
    if extra:
        problems.append(f"unexpected tensors (not a dense Qwen3?): {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if problems:
        raise ValueError(f"{reader.dir}: checkpoint does not match its config.json:\n  " + "\n  ".join(problems[:20]))

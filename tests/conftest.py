"""Shared fixtures: tiny random Qwen3 checkpoints written by `transformers` itself."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from megatron_trace.models.qwen3 import QWEN3_SIZES, Qwen3Arch

# tied: 4 q heads x head_dim 32 = 128 != hidden 64 (the 0.6B/4B/32B situation), GQA 4/2.
TINY_TIED: Qwen3Arch = QWEN3_SIZES["tiny"]
# untied: heads*head_dim == hidden (the 1.7B/8B/14B situation), separate lm_head.
TINY_UNTIED: Qwen3Arch = dataclasses.replace(TINY_TIED, tie_word_embeddings=False, head_dim=16)
VARIANTS = {"tied": TINY_TIED, "untied": TINY_UNTIED}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    """{"tied": dir, "untied": dir} of fp32 HF Qwen3 checkpoints with random weights."""
    from megatron_trace.models.hf_io import make_random_hf_model

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, arch) in enumerate(VARIANTS.items()):
        path = str(root / name)
        make_random_hf_model(arch, path, seed=100 + i)
        out[name] = path
    return out


@pytest.fixture(scope="session")
def token_batch() -> torch.Tensor:
    return torch.randint(0, TINY_TIED.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))


def hf_logits(hf_dir: str, ids: torch.Tensor) -> torch.Tensor:
    """Reference: transformers' own Qwen3ForCausalLM, loaded from disk, fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        return model(ids).logits


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu(n)` tests are skipped (and reported as skipped) without n CUDA devices."""
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None:
            need = marker.args[0] if marker.args else 1
            if n_gpus < need:
                item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU(s), found {n_gpus}"))


@pytest.fixture
def one_thread():
    """One torch thread, as the fixture servers and single ranks use: CPU kernels may split sums by
    thread count, so a reference computed with the same count matches bit for bit."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)

# Gloo ranks fork from one server process that has torch, megatron-core and transformers
# imported (megatron_trace/parallel/spawn.py): the suite starts ranks hundreds of times, at about
# 0.2 s each instead of 4-5 s. Production keeps `spawn` unless MT_SPAWN_METHOD says otherwise;
# tests/distributed/test_spawn.py runs both methods.
os.environ.setdefault("MT_SPAWN_METHOD", "forkserver")

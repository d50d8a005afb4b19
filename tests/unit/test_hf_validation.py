"""The converter refuses checkpoints whose tensors disagree with config.json."""

import json
import os
import shutil

import pytest

from megatron_trace.models.convert import HFCheckpointReader, check_hf_tensors
from megatron_trace.models.qwen3 import arch_from_hf_config


def _copy_with_config(src, dst, **patch):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    cfg = json.load(open(path))
    cfg.update(patch)
    json.dump(cfg, open(path, "w"))
    return dst


def test_consistent_checkpoint_passes(hf_dirs):
    for d in hf_dirs.values():
        check_hf_tensors(HFCheckpointReader(d), arch_from_hf_config(d))


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"head_dim": 64}, "head_dim"),
        ({"vocab_size": 1024}, "vocab_size"),
        ({"tie_word_embeddings": True}, "lm_head.weight differs"),
        ({"intermediate_size": 64}, "intermediate_size"),
        ({"num_hidden_layers": 3}, "missing tensor model.layers.2"),
    ],
)
def test_mismatch_refused(hf_dirs, tmp_path, patch, needle):
    d = _copy_with_config(hf_dirs["untied"], str(tmp_path / "bad"), **patch)
    with pytest.raises(ValueError, match=needle):
        check_hf_tensors(HFCheckpointReader(d), arch_from_hf_config(d))


def test_no_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        HFCheckpointReader(str(tmp_path))


def test_tied_config_with_equal_head_is_accepted(hf_dirs, tmp_path):
    """An export that writes lm_head == embed_tokens for a tied model is fine."""
    from safetensors.torch import load_file, save_file

    d = _copy_with_config(hf_dirs["tied"], str(tmp_path / "tied_with_head"))
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, path)
    check_hf_tensors(HFCheckpointReader(d), arch_from_hf_config(d))

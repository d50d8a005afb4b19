"""Writing HF checkpoints from a stream: single file, sharded with an index, read back two ways."""

import json
import os

import torch
from conftest import TINY_UNTIED, hf_logits

from megatron_trace.models.convert import HFCheckpointReader
from megatron_trace.models.hf_io import save_hf_checkpoint


def test_sharded_write_reads_back_in_our_reader_and_transformers(hf_dirs, token_batch, tmp_path):
    src = HFCheckpointReader(hf_dirs["untied"])
    cfg = json.load(open(os.path.join(hf_dirs["untied"], "config.json")))
    out = str(tmp_path / "sharded")
    stream = ((k, src.get(k)) for k in src.keys())
    files = save_hf_checkpoint(stream, out, cfg, max_shard_bytes=200_000)  # tiny model is ~0.8 MB
    assert len(files) > 2 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(src.keys())
    assert index["metadata"]["total_size"] == sum(src.get(k).numel() * 4 for k in src.keys())
    back = HFCheckpointReader(out)
    assert all(torch.equal(back.get(k), src.get(k)) for k in src.keys())
    assert torch.equal(hf_logits(out, token_batch), hf_logits(hf_dirs["untied"], token_batch))


def test_single_file_when_small(hf_dirs, tmp_path):
    src = HFCheckpointReader(hf_dirs["tied"])
    files = save_hf_checkpoint(((k, src.get(k)) for k in src.keys()), str(tmp_path), TINY_UNTIED.to_hf_dict())
    assert files == ["model.safetensors"] and not os.path.exists(tmp_path / "model.safetensors.index.json")

"""The `megatron-trace eval` job: a checkpoint or HF directory -> engine -> avg@k report."""

from __future__ import annotations

import os

__all__ = ["run_eval"]


def _hf_dir_for(ckpt: str, out_dir: str) -> str:
    """An HF export of a megatron-trace checkpoint (a run checkpoint or a model checkpoint)."""
    from ..models.jobs import convert_megatron_to_hf

    model_dir = os.path.join(ckpt, "model") if os.path.isdir(os.path.join(ckpt, "model")) else ckpt
    if not os.path.exists(os.path.join(model_dir, "megatron_trace.json")):
        raise FileNotFoundError(f"--ckpt {ckpt}: no megatron-trace checkpoint there (expected megatron_trace.json)")
    hf_dir = os.path.join(out_dir, "hf_export")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        convert_megatron_to_hf(model_dir, hf_dir, device="cpu")
    return hf_dir


def _tokenizer_for(cfg, hf_dir: str):
    if cfg.data.source == "arith" and not os.path.exists(os.path.join(hf_dir, "tokenizer.json")):
        from ..tasks.tokenizer import build_char_tokenizer

        return build_char_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def run_eval(cfg, *, ckpt: str | None = None, hf_dir: str | None = None, out_dir: str | None = None,
             name: str | None = None) -> dict:
    import torch

    from .harness import evaluate, settings_from_config

    if bool(ckpt) == bool(hf_dir):
        raise ValueError("eval needs exactly one of --ckpt CKPT or --hf-dir DIR")
    src = ckpt or hf_dir
    if not os.path.exists(src):
        raise FileNotFoundError(f"{'--ckpt' if ckpt else '--hf-dir'} {src} does not exist")
    out_dir = out_dir or os.path.join(cfg.run.dir, "eval", os.path.basename(os.path.normpath(src)))
    os.makedirs(out_dir, exist_ok=True)
    if ckpt:
        hf_dir = _hf_dir_for(ckpt, out_dir)
    tokenizer = _tokenizer_for(cfg, hf_dir)
    if cfg.rollout.engine == "sglang":
        from ..rollout.sglang import SGLangEngine

        engine = SGLangEngine.launch(hf_dir, tp_size=1)
    else:
        from transformers import AutoModelForCausalLM

        from ..rollout import HFEngine

        device = "cuda" if torch.cuda.is_available() and cfg.parallel.device != "cpu" else "cpu"
        dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        engine = HFEngine(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype), tokenizer,
                          eos_token_ids=[tokenizer.eos_token_id], device=device)
    try:
        return evaluate(engine, tokenizer, settings_from_config(cfg), out_dir=out_dir,
                        model=name or os.path.basename(os.path.normpath(src)), progress=cfg.log.progress)
    finally:
        engine.shutdown()

"""The `megatron-trace eval` job: a checkpoint or HF directory -> engine -> avg@k report."""

from __future__ import annotations

import os

__all__ = ["run_eval"]


def _hf_dir_for(ckpt: str, out_dir: str) -> str:
    """An HF export of a megatron-trace checkpoint (a run checkpoint or a model checkpoint). The
    export records the checkpoint it came from (`source.txt`): a link such as checkpoints/best
    that names another checkpoint since is refused rather than evaluated from the old export."""
    from ..models.jobs import convert_megatron_to_hf

    model_dir = os.path.join(ckpt, "model") if os.path.isdir(os.path.join(ckpt, "model")) else ckpt
    if not os.path.exists(os.path.join(model_dir, "megatron_trace.json")):
        raise FileNotFoundError(f"--ckpt {ckpt}: no megatron-trace checkpoint there (expected megatron_trace.json)")
    hf_dir, real = os.path.join(out_dir, "hf_export"), os.path.realpath(model_dir)
    source = os.path.join(hf_dir, "source.txt")
    if os.path.exists(source):
        was = open(source).read().strip()
        if was.split(os.sep)[-2:] != real.split(os.sep)[-2:]:  # step_N/model: the run dir may have moved
            raise ValueError(f"{out_dir} holds an evaluation of {was}, but --ckpt {ckpt} is {real} now; use "
                             "another --out or delete it")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        convert_megatron_to_hf(model_dir, hf_dir, device="cpu")
        with open(source, "w") as f:
            f.write(real + "\n")
    return hf_dir


def _tokenizer_for(cfg, hf_dir: str):
    if cfg.data.source == "arith" and not os.path.exists(os.path.join(hf_dir, "tokenizer.json")):
        from ..tasks.tokenizer import build_char_tokenizer

        return build_char_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def _engines(cfg, hf_dir: str, tokenizer):
    """`parallel.dp` engines behind one dispatcher (one is the same code path): the samples of a
    problem do not depend on how many engines there are (per-problem seeds).

    CPU: dp copies of the hf engine, each generating in its own thread with cores split between
    them. GPU: engine i on GPU i (hf) or on GPUs [i*tp, (i+1)*tp) (sglang)."""
    import torch

    from ..rollout.dispatch import EngineFleet, FleetEngine

    dp = cfg.parallel.dp or 1
    on_gpu = torch.cuda.is_available() and cfg.parallel.device != "cpu"
    if on_gpu and dp * (cfg.parallel.tp if cfg.rollout.engine == "sglang" else 1) > torch.cuda.device_count():
        raise ValueError(f"config key 'parallel.dp'={dp}: eval needs one GPU per engine "
                         f"(x parallel.tp for sglang) but {torch.cuda.device_count()} are visible")
    engines = []
    for i in range(dp):
        if cfg.rollout.engine == "sglang":
            from ..rollout.sglang import SGLangEngine

            engines.append(SGLangEngine.launch(hf_dir, tp_size=cfg.parallel.tp, base_gpu_id=i * cfg.parallel.tp,
                                               mem_fraction_static=cfg.rollout.mem_fraction_static))
        else:
            from transformers import AutoModelForCausalLM

            from ..rollout import HFEngine

            dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
            engines.append(HFEngine(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype), tokenizer,
                                    eos_token_ids=[tokenizer.eos_token_id], device=f"cuda:{i}" if on_gpu else "cpu",
                                    batch_prompts=cfg.rollout.hf_batch_prompts,
                    max_batch_tokens=cfg.rollout.hf_max_batch_tokens))
    if not on_gpu and dp > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dp))
    return FleetEngine(EngineFleet(engines, [f"engine{i}" for i in range(dp)], max_retries=cfg.rollout.max_retries))


def run_eval(cfg, *, ckpt: str | None = None, hf_dir: str | None = None, out_dir: str | None = None,
             name: str | None = None) -> dict:
    from ..data.problems import gpqa_csv_problem
    from .harness import evaluate, settings_from_config
    from .report import write_reports

    if bool(ckpt) == bool(hf_dir):
        raise ValueError("eval needs exactly one of --ckpt CKPT or --hf-dir DIR")
    problem = gpqa_csv_problem(cfg.eval.benchmarks, cfg.eval.gpqa_csv)
    if problem:
        raise FileNotFoundError(problem)
    src = ckpt or hf_dir
    if not os.path.exists(src):
        raise FileNotFoundError(f"{'--ckpt' if ckpt else '--hf-dir'} {src} does not exist")
    base, real = os.path.basename(os.path.normpath(src)), os.path.realpath(src)
    out_dir = out_dir or os.path.join(cfg.run.dir, "eval", base)
    os.makedirs(out_dir, exist_ok=True)
    if ckpt and os.path.basename(real) != base:  # a link (checkpoints/best): name the step it is
        base = f"{base} ({os.path.basename(real)})"
    if ckpt:
        hf_dir = _hf_dir_for(ckpt, out_dir)
    tokenizer = _tokenizer_for(cfg, hf_dir)
    engine = _engines(cfg, hf_dir, tokenizer)
    try:
        report = evaluate(engine, tokenizer, settings_from_config(cfg), out_dir=out_dir, model=name or base,
                          progress=cfg.log.progress)
    finally:
        engine.shutdown()
    if ckpt:  # the checkpoint evaluated, links resolved
        report["checkpoint"] = real
        write_reports(report, out_dir)
    return report

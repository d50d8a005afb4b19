"""tools/bench_rollout.py: 1 vs 2 colocated engines, and our engine vs transformers' generate, on
the same prompts, with the documented keys. (Smoke tests of the benchmark's mechanics; the speed
targets are not asserted.)"""

import json
import math
import subprocess
import sys

import torch


def test_bench_rollout_reports_throughputs_and_identical_samples():
    out = subprocess.run([sys.executable, "tools/bench_rollout.py", "--json", "--mode", "scaleout", "--size", "tiny",
                          "--prompts", "4",
                          "--n", "2", "--max-new-tokens", "6", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout[-2000:]  # --json: nothing but the JSON line on stdout
    res = json.loads(lines[0])
    for key in ("size", "prompts", "n", "max_new_tokens", "repeats", "seconds_1", "seconds_2", "tokens",
                "tokens_per_s_1", "tokens_per_s_2", "ratio_throughput_2_vs_1", "target_met", "identical_samples"):
        assert key in res, key
    assert (res["size"], res["prompts"], res["n"], res["max_new_tokens"], res["repeats"]) == ("tiny", 4, 2, 6, 1)
    # EOS is off: every sample runs to max_new_tokens, in every mode.
    assert res["tokens"] == res["tokens_2"] == 4 * 2 * 6 and res["tokens_equal"] is True
    assert res["identical_samples"] is True
    assert res["max_abs_logprob_diff"] < 1e-4
    # Both engines of the 2-engine mode did work; the two engines split the cores.
    assert all(v > 0 for v in res["tokens_per_engine_2"].values()) and len(res["tokens_per_engine_2"]) == 2
    assert res["threads_per_rank_2"] == res["threads_per_rank_1_same_threads"] <= res["threads_per_rank_1"]
    assert res["ratio_throughput_2_vs_1_same_threads"] > 0
    for key in ("seconds_1", "seconds_2", "tokens_per_s_1", "tokens_per_s_2", "ratio_throughput_2_vs_1"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert isinstance(res["target_met"], bool)


def test_bench_rollout_rejects_bad_settings():
    out = subprocess.run([sys.executable, "tools/bench_rollout.py", "--json", "--prompts", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "prompts >= 2" in out.stderr and out.stdout == ""


def _run(*args):
    return subprocess.run([sys.executable, "tools/bench_rollout.py", "--json", "--mode", "transformers", *args],
                          capture_output=True, text=True, timeout=600)


def test_bench_against_transformers_on_a_random_model():
    out = _run("--size", "tiny", "--prompts", "3", "--n", "2", "--max-new-tokens", "5", "--repeats", "1",
               "--top-k", "20", "--top-p", "0.9")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout[-2000:]
    res = json.loads(lines[0])
    assert (res["model"], res["rows"], res["max_new_tokens"], res["top_k"], res["top_p"]) == ("tiny", 6, 5, 20, 0.9)
    for mode in ("transformers", "ours", "ours_no_compaction", "ours_before"):  # EOS off: every mode generates every token
        assert res[f"tokens_{mode}"] == 3 * 2 * 5, mode
        assert math.isfinite(res[f"tokens_per_s_{mode}"]) and res[f"tokens_per_s_{mode}"] > 0
        assert len(res[f"seconds_all_{mode}"]) == 1
    assert res["ratio_ours_vs_transformers"] == res["tokens_per_s_ours"] / res["tokens_per_s_transformers"]
    assert res["ratio_ours_vs_before"] == res["tokens_per_s_ours"] / res["tokens_per_s_ours_before"]
    assert res["ratio_compaction"] == res["tokens_per_s_ours"] / res["tokens_per_s_ours_no_compaction"]
    assert isinstance(res["target_met_vs_transformers"], bool) and res["eos"] is False


def test_bench_against_transformers_on_a_saved_model_with_eos(tmp_path):
    """--hf-dir: a checkpoint with its tokenizer, arithmetic prompts, EOS on in every mode (rows end
    at different lengths; the transformers count stops at each row's first EOS)."""
    import dataclasses

    from megatron_trace.models.hf_io import make_random_hf_model
    from megatron_trace.models.qwen3 import QWEN3_SIZES
    from megatron_trace.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    arch = dataclasses.replace(QWEN3_SIZES["tiny"], vocab_size=len(tok), tie_word_embeddings=False)
    model = make_random_hf_model(arch, seed=1)
    with torch.no_grad():  # a head that makes EOS likely at about half the positions: rows end early
        model.lm_head.weight.mul_(0.05)
        model.lm_head.weight[tok.eos_token_id] = torch.randn(arch.hidden_size, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    out = _run("--hf-dir", str(tmp_path), "--prompts", "4", "--n", "2", "--max-new-tokens", "12", "--repeats", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["eos"] is True and res["model"] == str(tmp_path) and res["prompt_len"][0] > 20  # arithmetic prompts
    for mode in ("transformers", "ours", "ours_no_compaction", "ours_before"):
        assert 8 <= res[f"tokens_{mode}"] < 4 * 2 * 12, (mode, res[f"tokens_{mode}"])
    assert res["tokens_ours"] == res["tokens_ours_no_compaction"]  # compaction changes no sample
    bad = _run("--hf-dir", str(tmp_path / "missing"))
    assert bad.returncode == 2 and "is not a directory" in bad.stderr and bad.stdout == ""

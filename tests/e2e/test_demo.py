"""`megatron-trace demo` end to end with a tiny budget: SFT base -> TRACE RL -> held-out eval of
both on the same problems, the report with a paired CI, plots; a rerun reuses every stage.
(The full-budget demo and its measured gain are in docs/demo.md and docs/LOG.md; this checks the mechanics.) Both
tests share one output folder, so --compare reuses the first test's base and TRACE-FKL run."""

import hashlib
import json
import re
import subprocess
import sys

import pytest

# A base that gets some answers right (one-operation problems, 100 SFT steps), since the
# key-token lift needs correct rollouts with key spans; the oracle marks one of a response's two
# lines, so the span cap is 0.7.
TINY = ["sft.steps=100", "sft.batch_size=16", "sft.heldout=0", "data.arith.num_ops=1", "data.arith.num_train=100",
        "annotate.coverage_cap=0.7", "train.steps=2", "checkpoint.every=2", "rollout.prompts_per_step=4",
        "rollout.max_new_tokens=32", "train.key_token_lift=4", "eval.every=0", "eval.arith_n=6", "eval.k=2",
        "eval.max_new_tokens=32", "log.progress=false"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("demo") / "out"


@pytest.mark.dist
@pytest.mark.slow
def test_demo_pipeline_and_report(out):
    cmd = [sys.executable, "-m", "megatron_trace.cli", "demo", "--out", str(out), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "demo_report.json").read_text())
    for key in ("base_accuracy", "final_accuracy", "accuracy_gain_ci95", "num_heldout", "wall_seconds"):
        assert key in report, key
    lo, hi = report["accuracy_gain_ci95"]
    assert report["num_heldout"] == 6 and lo <= report["final_accuracy"] - report["base_accuracy"] <= hi
    assert report["variant"] == "trace_fkl"  # the demo config's variant
    assert "| base (SFT) |" in proc.stdout and "| trace_fkl |" in proc.stdout
    assert (out / "plots" / "reward.png").stat().st_size > 1000
    base = [json.loads(x) for x in (out / "eval_base" / "samples.jsonl").read_text().splitlines()]
    final = [json.loads(x) for x in (out / "eval_trace_fkl" / "samples.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in base] == [(r["index"], r["sample"]) for r in final]  # same problems
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # everything cached now
    assert again.returncode == 0 and json.loads((out / "demo_report.json").read_text())["final_accuracy"] == \
        report["final_accuracy"]


@pytest.mark.dist
@pytest.mark.slow
def test_demo_compare_reports_the_lift_of_every_variant(out):
    """--compare with a small budget: every variant (random_mask included) trains from the same
    base, logs the key-token lift at every step, and the table shows it per variant."""
    from megatron_trace.demo import VARIANTS_COMPARE

    cmd = [sys.executable, "-m", "megatron_trace.cli", "demo", "--compare", "--out", str(out), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "demo_report.json").read_text())
    assert set(report["variants"]) == set(VARIANTS_COMPARE) >= {"grpo", "trace_fkl", "random_mask"}
    rows = {v: [json.loads(x) for x in (out / v / "metrics.jsonl").read_text().splitlines()] for v in VARIANTS_COMPARE}
    step0 = {v: rs[0] for v, rs in rows.items()}
    # Same base, same seeds: step 0 has the same rollouts in every variant, some of them correct.
    assert len({m["reward/accuracy"] for m in step0.values()}) == 1 and step0["grpo"]["reward/accuracy"] > 0
    table = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for v in VARIANTS_COMPARE:  # GRPO and all-token FKL too: annotated for the metric alone
        assert step0[v]["lift/rollouts"] > 0 and isinstance(step0[v]["lift/key_teacher"], float), v
        lift = report["variants"][v]["lift_step0"]
        assert lift == step0[v]["lift/key_teacher"] and f"{lift:+.4f}" in table[v], (v, table.get(v))
        under = report["variants"][v]["under_lift_step0"]  # the under-allocated token's lift
        assert under == step0[v]["lift/key_underallocated"] and f"{under:+.4f}" in table[v], (v, table.get(v))
    # The ablation routes TRACE-FKL's annotated coverage, from the annotator, on other tokens.
    assert step0["random_mask"]["route/fkl_frac"] == step0["trace_fkl"]["route/fkl_frac"] > 0
    assert step0["random_mask"]["annotate/ok"] == step0["trace_fkl"]["annotate/ok"] > 0
    assert step0["all_token_fkl"]["kl/lambda"] == rows["all_token_fkl"][-1]["kl/lambda"] > 0  # constant
    assert "key-token lift" in proc.stdout and "under-allocated lift" in proc.stdout and (out / "plots" / "lift.png").stat().st_size > 1000


@pytest.mark.dist
@pytest.mark.slow
def test_demo_compare_over_seeds_pools_them(tmp_path):
    """--compare --seeds 1,2: one SFT base per seed, every variant from it, and compare_report.json
    with the per-problem correctness, the pooled gains and the pairwise differences; a rerun reuses
    every stage."""
    out = tmp_path / "study"
    small = [*TINY, "sft.steps=40", "train.steps=1", "checkpoint.every=1", "train.key_token_lift=0"]
    cmd = [sys.executable, "-m", "megatron_trace.cli", "demo", "--compare", "--seeds", "1,2", "--variants",
           "grpo,trace_fkl", "--out", str(out), *small]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "compare_report.json").read_text())
    assert report["seeds"] == ["1", "2"] and report["variants"] == ["grpo", "trace_fkl"]
    for s in ("1", "2"):
        seed_report = json.loads((out / f"seed_{s}" / "demo_report.json").read_text())
        sft_seed = re.search(r"^seed: (\d+)$", (out / f"seed_{s}" / "sft" / "config.yaml").read_text(), re.M)
        assert sft_seed and sft_seed.group(1) == s  # each seed has its own base
        per = report["per_seed"][s]
        assert len(per["base"]) == 6 and all(len(c) == 2 for c in per["base"].values())  # 6 problems x k=2
        assert per["variants"]["trace_fkl"] == seed_report["variants"]["trace_fkl"]["correct"]
        weights = (out / f"seed_{s}" / "sft" / "hf" / "model.safetensors").read_bytes()
        assert report["base_weights_sha256"][s] == hashlib.sha256(weights).hexdigest()
    assert report["base_weights_sha256"]["1"] != report["base_weights_sha256"]["2"]
    for v in ("grpo", "trace_fkl"):
        g = report["gains"][v]
        assert g["ci95"][0] <= g["mean"] <= g["ci95"][1] and set(g["per_seed"]) == {"1", "2"}
    assert set(report["pairs"]) == {"trace_fkl - grpo"}
    assert (out / "forest.png").stat().st_size > 1000 and "| trace_fkl - grpo |" in proc.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # every stage cached
    assert again.returncode == 0 and json.loads((out / "compare_report.json").read_text())["gains"] == report["gains"]


@pytest.mark.dist
@pytest.mark.slow
def test_demo_task_product_chain(tmp_path):
    """`demo --task product_chain` with a tiny budget (a 2-step chain): the base and the RL run
    train on the decisive-step task, and the oracle marks spans on its rollouts (trace_both: key
    spans of correct ones, error spans of incorrect ones)."""
    drop = ("data.arith.num_ops", "rollout.max_new_tokens", "eval.max_new_tokens")
    tiny = [x for x in TINY if not x.startswith(drop)] + [
        "data.arith.num_ops=2", "sft.steps=150", "rollout.max_new_tokens=48", "eval.max_new_tokens=48",
        "loss.variant=trace_both"]
    out = tmp_path / "pc"
    proc = subprocess.run([sys.executable, "-m", "megatron_trace.cli", "demo", "--task", "product_chain",
                           "--out", str(out), *tiny], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = (out / "trace_both" / "config.yaml").read_text()
    assert re.search(r"task: product_chain", cfg) and re.search(r"task: product_chain", (out / "sft" / "config.yaml").read_text())
    rows = [json.loads(x) for x in (out / "eval_base" / "samples.jsonl").read_text().splitlines()]
    lines = [line for r in rows for line in r["response"].split("\n")[:2]]
    # the base writes the task's labelled lines ("a+3 14+3=17", "b*6 17*6=102")
    assert sum(bool(re.match(r"[ab][+*-]\d \d+[+*-]\d=\d+$", line)) for line in lines) >= len(lines) // 2, lines
    metrics = [json.loads(x) for x in (out / "trace_both" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["route/span_coverage"] > 0 for m in metrics)

"""`megatron-trace report` on synthetic run directories written here: every number against a
direct computation from the per-sample grades, the CIs against slow references, missing,
failed and corrupt runs."""

import json
import math
import os
import random

import pytest
import torch
import yaml

from megatron_trace.cli import main as cli_main
from megatron_trace.eval.harness import summarize
from megatron_trace.report import build_report, discover
from megatron_trace.report.stats import t_quantile_975

BENCHES = {"alpha": 12, "beta": 7}  # benchmark -> problems
K = 3


def _grades(rng: random.Random, p: float) -> dict[str, list[list[bool]]]:
    return {b: [[rng.random() < p for _ in range(K)] for _ in range(n)] for b, n in BENCHES.items()}


def write_run(root, name, size, variant, seed, grades=None, *, steps=3, done=None, gpus=0):
    """A run directory as `megatron-trace train` + the sweep's eval leave it; grades=None: no eval."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"run": {"name": name, "dir": str(d)}, "model": {"size": size}, "loss": {"variant": variant}, "seed": seed,
           "train": {"steps": steps}, "cluster": {"nodes": 2, "gpus_per_node": gpus}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": s, "time/step": 1.5 + s, "time/rollout": 0.5, "time/teacher": 0.25, "time/train": 0.75,
             "sync/seconds": 0.01, "train/num_tokens": 100 + s, "train/num_rollouts": 8, "rollout/response_len_mean": 10.0,
             "entropy/all": 0.5 - 0.1 * s, "length/all": 10.0, "eval/average": 0.1 * s}
            for s in range(steps if done is None else done)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if grades is not None:
        e = d / "eval" / "best"
        e.mkdir(parents=True)
        recs, benchmarks = [], {}
        for b, problems in grades.items():
            per = []
            for i, samples in enumerate(problems):
                per.append([{"correct": c, "grade": "correct" if c else "wrong", "length": 5, "finish_reason": "stop"}
                            for c in samples])
                recs += [{"benchmark": b, "index": i, "sample": j, "correct": c} for j, c in enumerate(samples)]
            benchmarks[b] = summarize(per, K)
        avg = sum(v["avg@k"] for v in benchmarks.values()) / len(benchmarks)
        (e / "eval.json").write_text(json.dumps({"model": name, "benchmarks": benchmarks, "average": avg, "seconds": 2.0}))
        (e / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def _avg(grades) -> float:
    """The benchmark average of avg@k, straight from the grades."""
    return sum(sum(sum(s) / len(s) for s in g) / len(g) for g in grades.values()) / len(grades)


@pytest.fixture
def sweep(tmp_path):
    rng = random.Random(5)
    grades = {}
    for size, p in (("tiny", 0.3), ("demo", 0.6)):
        for variant, bump in (("grpo", 0.0), ("trace_fkl", 0.1)):
            for seed in (1, 2):
                g = _grades(rng, p + bump)
                grades[(size, variant, seed)] = g
                write_run(tmp_path / "sweep", f"{size}_{variant}_s{seed}", size, variant, seed, g)
    return tmp_path / "sweep", grades


def test_every_cell_and_difference_against_the_grades(sweep, tmp_path):
    root, grades = sweep
    rep = build_report([str(root)], str(tmp_path / "out"))
    assert [s["size"] for s in rep["sizes"]] == ["tiny", "demo"] and rep["variants"] == ["grpo", "trace_fkl"]
    for (size, variant), cell in ((c[:2], rep["cells"][c[0]][c[1]]) for c in grades if c[2] == 1):
        vals = [_avg(grades[(size, variant, s)]) for s in (1, 2)]
        mean = sum(vals) / 2
        half = 12.7062 * abs(vals[0] - vals[1]) / math.sqrt(2) / math.sqrt(2)  # t(1) * sd / sqrt(n)
        assert cell["mean"] == pytest.approx(mean, abs=1e-12)
        assert cell["ci95"] == pytest.approx([max(0, mean - half), min(1, mean + half)], abs=1e-12)
        for b in BENCHES:
            bv = [sum(sum(x) / K for x in grades[(size, variant, s)][b]) / BENCHES[b] for s in (1, 2)]
            assert cell["benchmarks"][b]["mean"] == pytest.approx(sum(bv) / 2, abs=1e-12)
    for size in ("tiny", "demo"):
        d = rep["differences"][size]["trace_fkl"]
        diffs = [sum(sum(a) / K - sum(b) / K for a, b in zip(grades[(size, "trace_fkl", s)][bench],
                                                             grades[(size, "grpo", s)][bench])) / BENCHES[bench]
                 for s in (1, 2) for bench in sorted(BENCHES)]
        assert d["mean"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-12) and d["groups"] == 4
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    # the outputs: the main table has the four cells; the HTML embeds every figure
    md = (tmp_path / "out" / "report.md").read_text()
    for size in ("tiny", "demo"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {size} |"))
        assert row.count("[") == 2 and "missing" not in row
        for variant in ("grpo", "trace_fkl"):  # each seed's value follows the mean and CI
            per_seed = rep["cells"][size][variant]["per_seed"]
            assert f"seeds {100 * per_seed['1']:.1f}, {100 * per_seed['2']:.1f}" in row
    html = (tmp_path / "out" / "report.html").read_text()
    assert set(rep["plots"]) == {"accuracy_vs_params", "accuracy_vs_compute", "differences", "curves"}
    assert html.count("data:image/png;base64,") == 4 and "src='accuracy" not in html
    for png in rep["plots"].values():
        assert (tmp_path / "out" / png).stat().st_size > 2000
    assert json.loads((tmp_path / "out" / "report.json").read_text())["cells"] == json.loads(json.dumps(rep["cells"]))


def test_compute_per_run(sweep, tmp_path):
    root, _ = sweep
    rep = build_report([str(root)], str(tmp_path / "out"))
    run = next(r for r in rep["runs"] if r["name"] == "tiny_grpo_s1")
    c = run["compute"]
    assert c["steps"] == 3 and c["trained_tokens"] == 100 + 101 + 102 and c["generated_tokens"] == 3 * 8 * 10.0
    assert c["wall_hours"] == pytest.approx((1.5 + 2.5 + 3.5) / 3600)
    assert c["device_hours"] == pytest.approx(2 * c["wall_hours"]) and c["unit"] == "node-hours (CPU)"
    assert c["step_seconds"]["teacher"] == 0.25 and c["step_seconds"]["wait"] is None


def test_device_hours_follow_the_layout(tmp_path):
    """GPUs x nodes on a GPU layout; nodes on a CPU one, which is also what a run with
    parallel.device=cpu is, whatever GPU count its cluster section keeps (the local executor)."""
    from megatron_trace.report.compute import run_compute

    write_run(tmp_path, "gpu", "tiny", "grpo", 1, gpus=8)
    write_run(tmp_path, "cpu_layout", "tiny", "grpo", 2, gpus=8)
    cfg = yaml.safe_load((tmp_path / "cpu_layout" / "config.yaml").read_text())
    cfg["parallel"] = {"device": "cpu"}
    (tmp_path / "cpu_layout" / "config.yaml").write_text(yaml.safe_dump(cfg))
    runs = {r.name: r for r in discover([str(tmp_path)])}
    gpu, cpu = run_compute(runs["gpu"]), run_compute(runs["cpu_layout"])
    assert gpu["unit"] == "GPU-hours" and gpu["device_hours"] == pytest.approx(16 * gpu["wall_hours"])
    assert cpu["unit"] == "node-hours (CPU)" and cpu["device_hours"] == pytest.approx(2 * cpu["wall_hours"])


def test_one_seed_ci_is_the_bootstrap_over_problems(tmp_path):
    """One seed: the cell's CI resamples problems within benchmarks; checked against a slow loop
    with the same draws (torch.Generator(0), one randint per benchmark in name order)."""
    g = _grades(random.Random(3), 0.5)
    write_run(tmp_path / "s", "one", "tiny", "grpo", 1, g)
    cell = build_report([str(tmp_path / "s")], str(tmp_path / "out"))["cells"]["tiny"]["grpo"]
    assert cell["mean"] == pytest.approx(_avg(g), abs=1e-12) and cell["ci_kind"].startswith("bootstrap")
    gen, reps = torch.Generator().manual_seed(0), [0.0] * 4000
    for b in sorted(g):
        scores = [sum(s) / K for s in g[b]]
        idx = torch.randint(len(scores), (4000, len(scores)), generator=gen).tolist()
        for r in range(4000):
            reps[r] += sum(scores[i] for i in idx[r]) / len(scores) / len(g)
    reps.sort()

    def q(p):  # linear interpolation between order statistics
        pos = p * (len(reps) - 1)
        lo = math.floor(pos)
        return reps[lo] + (reps[min(lo + 1, len(reps) - 1)] - reps[lo]) * (pos - lo)

    assert cell["ci95"] == pytest.approx([q(0.025), q(0.975)], abs=1e-9)


def test_missing_failed_and_corrupt_runs(tmp_path):
    root = tmp_path / "sweep"
    rng = random.Random(1)
    write_run(root, "a_grpo", "tiny", "grpo", 1, _grades(rng, 0.5))
    write_run(root, "a_fkl", "tiny", "trace_fkl", 1, None, steps=3, done=2)  # died at step 2
    (root / "sweep.json").write_text(json.dumps({"cells": [
        {"name": "a_grpo", "run_dir": "a_grpo", "size": "tiny", "variant": "grpo", "seed": 1},
        {"name": "a_fkl", "run_dir": "a_fkl", "size": "tiny", "variant": "trace_fkl", "seed": 1},
        {"name": "b_grpo", "run_dir": "b_grpo", "size": "demo", "variant": "grpo", "seed": 1}]}))
    rep = build_report([str(root)], str(tmp_path / "out"))
    status = {r["name"]: (r["status"], r["reason"]) for r in rep["runs"]}
    assert status["a_grpo"][0] == "ok"
    assert status["a_fkl"] == ("failed", "training stopped after 2 of 3 steps")
    assert status["b_grpo"][0] == "missing" and "never started" in status["b_grpo"][1]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| tiny |" in md and "failed (s1 failed)" in md and "missing (s1 missing)" in md
    assert "training stopped after 2 of 3 steps" in md
    # a corrupt eval.json is named, through the CLI too
    bad = root / "a_grpo" / "eval" / "best" / "eval.json"
    bad.write_text('{"model": "a", "benchmarks": {"alpha": {"k": 3}}')
    with pytest.raises(ValueError, match=r"a_grpo/eval/best/eval.json: not a valid eval.json"):
        build_report([str(root)], str(tmp_path / "out2"))
    assert cli_main(["report", str(root), "--out", str(tmp_path / "out3")]) == 2
    # two runs of one cell are refused, naming both
    write_run(tmp_path / "dup", "x1", "tiny", "grpo", 1, _grades(rng, 0.5))
    write_run(tmp_path / "dup", "x2", "tiny", "grpo", 1, _grades(rng, 0.5))
    with pytest.raises(ValueError, match="x1 and .*x2 are the same cell"):
        discover([str(tmp_path / "dup")])


def test_t_quantile_against_the_integrated_density():
    def cdf_mass(q, df, n=20000):  # Simpson's rule for the t density on [0, q]
        c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
        f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
        h = q / n
        return h / 3 * (f(0) + f(q) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n)))

    for df in (1, 2, 5, 10, 30, 31, 45, 120):
        assert cdf_mass(t_quantile_975(df), df) == pytest.approx(0.475, abs=2e-5), df
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_report_cli_prints_the_main_table(sweep, tmp_path, capsys):
    root, _ = sweep
    assert cli_main(["report", str(root), "--out", str(tmp_path / "o"), "--metric", "pass@k"]) == 0
    out = capsys.readouterr().out
    assert "pass@k in percent" in out and "| tiny |" in out and "8 runs, 0 without an evaluation" in out
    assert os.path.exists(tmp_path / "o" / "report.html")


def test_params_come_from_the_evaluated_model(tmp_path):
    """The export's config.json (the real vocabulary) wins over the registry's count."""
    import dataclasses

    from megatron_trace.models.qwen3 import get_arch

    arch = dataclasses.replace(get_arch("demo-s"), vocab_size=102)
    d = write_run(tmp_path / "s", "one", "demo-s", "grpo", 1, _grades(random.Random(0), 0.5))
    (d / "eval" / "best" / "hf_export").mkdir()
    (d / "eval" / "best" / "hf_export" / "config.json").write_text(json.dumps(arch.to_hf_dict()))
    write_run(tmp_path / "s", "two", "demo-l", "grpo", 1, _grades(random.Random(1), 0.5))
    runs = {r.name: r for r in discover([str(tmp_path / "s")])}
    assert runs["one"].params == arch.num_params == 203840
    assert runs["two"].params == get_arch("demo-l").num_params  # no export: the registry

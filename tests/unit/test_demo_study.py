"""The multi-seed demo study's statistics (megatron_trace/demo_study.py) on synthetic per-problem
correctness: pooled gains and pairwise differences against direct computation, and the forest plot."""

import random

import pytest

from megatron_trace.demo_study import PAIRS, format_study, study_statistics
from megatron_trace.eval.metrics import pooled_paired_bootstrap


def _synthetic(seeds=("1", "2"), variants=("grpo", "trace_fkl", "random_mask"), k=4):
    rng = random.Random(0)
    out = {}
    for n, s in zip((12, 9, 15), seeds):
        problems = [str(i * 3 + int(s)) for i in range(n)]  # ids differ between seeds

        def draw(p, problems=problems):
            return {i: [rng.random() < p for _ in range(k)] for i in problems}

        out[s] = {"base": draw(0.3), "variants": {v: draw(0.3 + 0.1 * j) for j, v in enumerate(variants)}}
    return out


def _acc(correct, ids):
    return [sum(correct[i]) / len(correct[i]) for i in ids]


def test_pooled_gains_and_pairs_against_direct_computation():
    data = _synthetic()
    stats = study_statistics(data, num_samples=300, seed=5)
    assert stats["seeds"] == ["1", "2"] and stats["variants"] == ["grpo", "trace_fkl", "random_mask"]
    for v in stats["variants"]:
        per = []
        for s in ("1", "2"):
            ids = sorted(data[s]["base"], key=int)
            a, b = _acc(data[s]["variants"][v], ids), _acc(data[s]["base"], ids)
            per.append(sum(x - y for x, y in zip(a, b)) / len(ids))
            assert stats["gains"][v]["per_seed"][s] == pytest.approx(per[-1])
        assert stats["gains"][v]["mean"] == pytest.approx(sum(per) / 2, abs=1e-15)
    # the pairs present: TRACE-FKL against GRPO and against the random mask (no TRACE-RKL here)
    assert set(stats["pairs"]) == {"trace_fkl - grpo", "trace_fkl - random_mask"}
    for name, d in stats["pairs"].items():
        a_name, b_name = name.split(" - ")
        after, before = [], []
        for s in ("1", "2"):
            ids = sorted(data[s]["base"], key=int)
            after.append(_acc(data[s]["variants"][a_name], ids))
            before.append(_acc(data[s]["variants"][b_name], ids))
        mean, ci = pooled_paired_bootstrap(after, before, num_samples=300, seed=5)
        assert d["mean"] == pytest.approx(mean, abs=1e-15) and d["ci95"] == pytest.approx(list(ci))
    assert all(p in PAIRS for p in (("trace_fkl", "grpo"), ("trace_rkl", "random_mask")))
    table = format_study(stats)
    assert "| trace_fkl - grpo |" in table and "seed 2" in table and "| random_mask |" in table


def test_mismatched_problems_and_missing_variants():
    data = _synthetic()
    del data["2"]["variants"]["random_mask"]  # a variant that did not run on every seed is left out
    assert study_statistics(data, num_samples=50)["variants"] == ["grpo", "trace_fkl"]
    data["1"]["variants"]["grpo"].pop(next(iter(data["1"]["base"])))
    with pytest.raises(ValueError, match="seed 1: grpo's held-out problems differ"):
        study_statistics(data, num_samples=50)


def test_forest_plot_draws_every_row(tmp_path):
    from megatron_trace.observability.plots import forest_plot

    path = forest_plot([("a - b", 0.05, 0.01, 0.09), ("c - d", -0.01, -0.04, 0.02)], str(tmp_path / "f.png"),
                       title="t")
    assert (tmp_path / "f.png").stat().st_size > 1000 and path.endswith("f.png")
    with pytest.raises(ValueError, match="no rows"):
        forest_plot([], str(tmp_path / "g.png"))

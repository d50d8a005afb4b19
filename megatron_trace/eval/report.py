"""eval.json / eval.md writers and the comparison table over several evaluations."""

from __future__ import annotations

import json
import math
import os

__all__ = ["comparison_table", "write_reports"]


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def comparison_table(reports: list[dict]) -> str:
    """Markdown in the paper's layout: one row per model, one column per benchmark, then the
    unweighted average (avg@k in percent, the 95% bootstrap CI under each table)."""
    names: list[str] = []
    for r in reports:
        names += [b for b in r["benchmarks"] if b not in names]
    head = "| model | " + " | ".join(names) + " | average |"
    rows = [head, "| --- " * (len(names) + 2) + "|"]
    for r in reports:
        cells = [_pct(r["benchmarks"][b]["avg@k"]) if b in r["benchmarks"] else "-" for b in names]
        rows.append(f"| {r['model']} | " + " | ".join(cells) + f" | {_pct(r['average'])} |")
    lines = ["\n".join(rows), "", "avg@k in percent; 95% bootstrap CI over problems, k, mean length, truncation "
             "and no-answer rates:", ""]
    for r in reports:
        for b, v in r["benchmarks"].items():
            lo, hi = v["ci95"]
            pass_k = v["pass@" + str(v["k"])]
            lines.append(f"- {r['model']} / {b}: avg@{v['k']} {_pct(v['avg@k'])} [{_pct(lo)}, {_pct(hi)}], "
                         f"pass@{v['k']} {_pct(pass_k)}, {v['num_problems']} problems, mean length "
                         f"{v['mean_length']:.0f} tokens, truncated {_pct(v['truncation_rate'])}%, no answer "
                         f"{_pct(v['no_answer_rate'])}%")
    return "\n".join(lines) + "\n"


def write_reports(report: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "eval.md"), "w") as f:
        f.write(comparison_table([report]))

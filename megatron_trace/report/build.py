"""`megatron-trace report`: a sweep's runs -> report.json, report.md, a self-contained
report.html (figures embedded) and the PNGs.

Sections: the main table (sizes x variants, the benchmark average as mean and 95% CI over seeds),
one table per benchmark, paired differences against the baseline at every size, compute per
run, the runs that failed or never started (with why), and the figures: accuracy against
parameters and against compute, the differences as a forest plot, training curves per size.
"""

from __future__ import annotations

import base64
import html
import json
import os

from .compute import PHASES, run_compute
from .runs import Run, discover
from .stats import cell_summary, paired_difference, run_value

__all__ = ["build_report", "format_table"]


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(entry: dict | None, signed: bool = False) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    fmt = (lambda x: f"{100 * x:+.1f}") if signed else _pct
    ci = entry.get("ci95")
    return fmt(entry["mean"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def _params(n: int | None) -> str:
    if not n:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def format_table(header: list[str], rows: list[list[str]], *, as_html: bool = False) -> str:
    if as_html:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _seed_order(item: tuple[str, float]) -> tuple[int, str]:
    return (int(item[0]), "") if item[0].isdigit() else (1 << 30, item[0])


def _seed_values(cell: dict) -> list[float]:
    """Each seed's value in seed order, when the cell has two or more (one seed: the CI says it)."""
    per_seed = cell.get("per_seed") or {}
    return [v for _, v in sorted(per_seed.items(), key=_seed_order)] if len(per_seed) >= 2 else []


def _cell_text(cell: dict | None, runs: list[Run]) -> str:
    bad = [r for r in runs if r.status != "ok"]
    note = "; ".join(f"s{r.seed} {r.status}" for r in bad)
    if cell is None:
        return f"{'missing' if all(r.status == 'missing' for r in bad) else 'failed'} ({note})" if bad else "-"
    values = _seed_values(cell)
    seeds = ("; seeds " + ", ".join(f"{100 * v:.1f}" for v in values)) if values else ""
    return _ci(cell) + (f" ({note})" if note else "") + seeds


def _tables(rep: dict, runs: list[Run], as_html: bool) -> list[tuple[str, str]]:
    """(heading, table) pairs in report order."""
    sizes, variants = rep["sizes"], rep["variants"]
    by_cell = {}
    for r in runs:
        by_cell.setdefault((r.size, r.variant), []).append(r)
    header = ["size", "params", *variants]
    main = [[s["size"], _params(s["params"]),
             *(_cell_text(rep["cells"][s["size"]].get(v), by_cell.get((s["size"], v), [])) for v in variants)]
            for s in sizes]
    out = [(f"Benchmark average, {rep['metric']} in percent, mean [95% CI] over seeds, then each seed's value", format_table(header, main, as_html=as_html))]
    for b in rep["benchmarks"]:
        rows = [[s["size"], _params(s["params"]),
                 *(_ci((rep["cells"][s["size"]].get(v) or {}).get("benchmarks", {}).get(b)) for v in variants)]
                for s in sizes]
        out.append((f"{b}", format_table(header, rows, as_html=as_html)))
    others = [v for v in variants if v != rep["baseline"]]
    if rep["baseline"] in variants and others:
        rows = [[s["size"], *(_ci(rep["differences"][s["size"]].get(v), signed=True) + (
            f" ({rep['differences'][s['size']][v]['reason']})" if rep["differences"][s["size"]].get(v, {}).get("reason")
            else "") for v in others)] for s in sizes]
        out.append((f"Paired differences against {rep['baseline']}, points, mean [95% CI]",
                    format_table(["size", *(f"{v} - {rep['baseline']}" for v in others)], rows, as_html=as_html)))
    rows = []
    for r in rep["runs"]:
        c = r.get("compute") or {}
        rows.append([r["name"], r["size"], r["variant"], str(r["seed"]), r["status"], _pct(r.get("value")),
                     f"{c.get('generated_tokens', 0):.3g}" if c else "-", f"{c.get('trained_tokens', 0):.3g}" if c else "-",
                     f"{c['wall_hours']:.3f}" if c else "-", f"{c['device_hours']:.3f} {c['unit']}" if c else "-",
                     *(f"{c['step_seconds'][p]:.2f}" if c and c["step_seconds"][p] is not None else "-" for p in PHASES)])
    out.append(("Compute per run (seconds per step by phase)",
                format_table(["run", "size", "variant", "seed", "status", rep["metric"], "generated tokens",
                              "trained tokens", "wall h", "device-hours", *PHASES], rows, as_html=as_html)))
    bad = [[r["name"], r["status"], r["reason"], r["run_dir"]] for r in rep["runs"] if r["status"] != "ok"]
    if bad:
        out.append(("Runs without an evaluation", format_table(["run", "status", "why", "run dir"], bad, as_html=as_html)))
    return out


def _plots(rep: dict, runs: list[Run], out: str) -> dict[str, str]:
    from ..observability.plots import forest_plot
    from .plots import accuracy_plot, curves_plot

    plots = {}
    sizes = {s["size"]: s["params"] for s in rep["sizes"]}
    by_params, by_compute = {}, {}
    for size, cells in rep["cells"].items():
        for v, c in cells.items():
            seeds = _seed_values(c)
            by_params.setdefault(v, []).append((sizes[size], c["mean"], c["ci95"], seeds))
            hours = [x["compute"]["device_hours"] for x in rep["runs"]
                     if x["size"] == size and x["variant"] == v and x["status"] == "ok"]
            by_compute.setdefault(v, []).append((sum(hours) / len(hours) if hours else None, c["mean"], c["ci95"],
                                                 seeds))
    label = f"benchmark average {rep['metric']} (%)"
    if any(p for pts in by_params.values() for p, *_ in pts):
        plots["accuracy_vs_params"] = accuracy_plot(by_params, os.path.join(out, "accuracy_vs_params.png"),
                                                    xlabel="parameters", ylabel=label, title="accuracy against size")
    units = {x["compute"]["unit"] for x in rep["runs"] if x.get("compute")}
    if any(h for pts in by_compute.values() for h, *_ in pts):
        plots["accuracy_vs_compute"] = accuracy_plot(by_compute, os.path.join(out, "accuracy_vs_compute.png"),
                                                     xlabel=" / ".join(sorted(units)) + " per run (mean over seeds)",
                                                     ylabel=label, title="accuracy against compute")
    rows = [(f"{size}: {v} - {rep['baseline']}", d["mean"], *d["ci95"])
            for size, ds in rep["differences"].items() for v, d in ds.items() if d.get("ci95")]
    if rows:
        plots["differences"] = forest_plot(rows, os.path.join(out, "differences.png"),
                                           title=f"paired differences against {rep['baseline']} (95% CI)")
    trained = {}
    for r in runs:
        if r.metrics:
            trained.setdefault(r.size, []).append(r)
    if trained:
        plots["curves"] = curves_plot(trained, os.path.join(out, "curves.png"))
    return plots


def build_report(paths: list[str], out: str, *, baseline: str = "grpo", metric: str = "avg@k",
                 eval_tag: str = "best", seed: int = 0) -> dict:
    """Discover the runs under `paths`, compute every number, write the four outputs into `out`,
    and return report.json's content."""
    runs = discover(paths, tag=eval_tag)
    ok = [r for r in runs if r.status == "ok"]
    sizes = []
    for r in runs:
        if r.size not in [s["size"] for s in sizes]:
            sizes.append({"size": r.size, "params": r.params})
    variants = sorted({r.variant for r in runs}, key=lambda v: (v != baseline, v))
    cache: dict = {}
    cells: dict = {s["size"]: {} for s in sizes}
    for s in sizes:
        for v in variants:
            group = [r for r in ok if r.size == s["size"] and r.variant == v]
            if group:
                cells[s["size"]][v] = cell_summary(group, metric, cache=cache, seed=seed)
    differences: dict = {s["size"]: {} for s in sizes}
    for s in sizes:
        base = [r for r in ok if r.size == s["size"] and r.variant == baseline]
        for v in variants:
            group = [r for r in ok if r.size == s["size"] and r.variant == v]
            if v != baseline and group and base:
                differences[s["size"]][v] = paired_difference(group, base, metric, cache=cache, seed=seed)
    rep = {"metric": metric, "baseline": baseline, "eval_tag": eval_tag, "sources": [os.path.abspath(p) for p in paths],
           "sizes": sizes, "variants": variants,
           "benchmarks": sorted({b for r in ok for b in r.eval["benchmarks"]}),
           "cells": cells, "differences": differences,
           "runs": [{"name": r.name, "run_dir": r.run_dir, "size": r.size, "params": r.params, "variant": r.variant,
                     "seed": r.seed, "status": r.status, "reason": r.reason,
                     "value": run_value(r, metric) if r.status == "ok" else None,
                     "compute": run_compute(r) if r.status != "missing" else None} for r in runs]}
    os.makedirs(out, exist_ok=True)
    rep["plots"] = {k: os.path.basename(p) for k, p in _plots(rep, runs, out).items()}
    _write(rep, runs, out)
    return rep


def _write(rep: dict, runs: list[Run], out: str) -> None:
    n_ok = sum(r["status"] == "ok" for r in rep["runs"])
    intro = (f"{len(rep['runs'])} runs ({n_ok} evaluated) from {', '.join(rep['sources'])}; evaluation "
             f"`eval/{rep['eval_tag']}`; CIs: Student's t over seeds, or a bootstrap over problems for one seed; "
             f"differences pair seeds and problems.")
    md = ["# Scaling report", "", intro, ""]
    for heading, table in _tables(rep, runs, as_html=False):
        md += [f"## {heading}", "", table, ""]
    for name, png in rep["plots"].items():
        md += [f"## {name.replace('_', ' ')}", "", f"![{name}]({png})", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md))
    body = [f"<h1>Scaling report</h1><p>{html.escape(intro)}</p>"]
    for heading, table in _tables(rep, runs, as_html=True):
        body.append(f"<h2>{html.escape(heading)}</h2>{table}")
    for name, png in rep["plots"].items():
        data = base64.b64encode(open(os.path.join(out, png), "rb").read()).decode()
        body.append(f"<h2>{html.escape(name.replace('_', ' '))}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(f"<!doctype html><html><head><meta charset='utf-8'><title>Scaling report</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(rep, f, indent=1)

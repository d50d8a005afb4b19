"""The report's figures: accuracy against parameters and against compute (one line per variant,
95% CIs as error bars), and training curves (one row of panels per size, one line per run)."""

from __future__ import annotations

import math
import os

__all__ = ["CURVES", "accuracy_plot", "curves_plot"]

# panel title -> the metric keys tried in order (the first present in a run is drawn)
CURVES = {"validation": ["eval/val/avg@k", "eval/average"], "entropy": ["entropy/all"],
          "response length": ["length/all", "rollout/response_len_mean"],
          "exposure (sum lambda x coverage)": ["exposure/lambda_coverage_cum"]}


def _pyplot():
    from ..observability.plots import pyplot

    return pyplot("drawing the report's figures")


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def accuracy_plot(series: dict[str, list[tuple]], path: str, *, xlabel: str, ylabel: str, title: str) -> str:
    """series: variant -> [(x, y, [lo, hi] or None[, per-seed values])], on a log x axis (values
    in [0, 1] shown as percent). Each variant's points are nudged sideways so that the error bars
    do not hide each other, and each seed's own value is drawn as a small hollow marker: with two
    seeds the t interval is wide, and the seeds show the spread it comes from."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = [(v, sorted(p for p in pts if p[0] and p[0] > 0 and not math.isnan(p[1]))) for v, pts in series.items()]
    drawn = [(v, pts) for v, pts in drawn if pts]
    for i, (variant, pts) in enumerate(drawn):
        nudge = 1.06 ** (i - (len(drawn) - 1) / 2)
        xs, ys = [p[0] * nudge for p in pts], [100 * p[1] for p in pts]
        err = [[100 * (p[1] - p[2][0]) if p[2] else 0.0 for p in pts], [100 * (p[2][1] - p[1]) if p[2] else 0.0 for p in pts]]
        line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=variant, elinewidth=0.8)
        seeds = [(x, 100 * v) for x, p in zip(xs, pts) if len(p) > 3 for v in (p[3] or [])]
        if seeds:
            ax.scatter([x for x, _ in seeds], [y for _, y in seeds], s=18, facecolors="none",
                       edgecolors=line.lines[0].get_color(), linewidths=0.9, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (" (hollow: each seed)" if any(len(p) > 3 and p[3] for _, pts in drawn for p in pts) else ""),
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def curves_plot(runs_by_size: dict[str, list], path: str) -> str:
    """runs_by_size: size label -> runs (with .variant, .seed, .metrics); one row per size."""
    plt = _pyplot()
    sizes = list(runs_by_size)
    fig, axes = plt.subplots(len(sizes), len(CURVES), figsize=(3.2 * len(CURVES), 2.4 * len(sizes)), squeeze=False)
    variants = sorted({r.variant for rs in runs_by_size.values() for r in rs})
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    for row, size in enumerate(sizes):
        for col, (title, keys) in enumerate(CURVES.items()):
            ax = axes[row][col]
            for r in runs_by_size[size]:
                key = next((k for k in keys if any(k in m for m in r.metrics)), None)
                pts = [(m["step"], m[key]) for m in r.metrics if key and isinstance(m.get(key), (int, float))]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[r.variant], lw=1,
                            label=f"{r.variant} s{r.seed}", marker="o" if len(pts) < 6 else None, ms=3)
            if not ax.lines:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_title(f"{size}: {title}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if row == len(sizes) - 1:
                ax.set_xlabel("step", fontsize=7)
            if row == 0 and col == 0 and ax.lines:
                ax.legend(fontsize=6)
    return _save(fig, path)

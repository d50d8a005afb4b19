"""PNG plots of one or several runs' metrics.jsonl, overlaid for comparison.

One file per figure; each figure has named panels (the keys of FIGURES), and every run is a line
in every panel. `plot_runs` returns, per file, the panel titles it drew and the metrics found,
and writes that manifest to `plots.json` next to the PNGs. `forest_plot` draws estimates with
their confidence intervals, one row each (the multi-seed demo study's differences).
"""

from __future__ import annotations

import json
import math
import os

__all__ = ["FIGURES", "forest_plot", "load_metrics", "plot_runs", "pyplot"]

# file -> [(panel title, [metric keys])]
FIGURES: dict[str, list[tuple[str, list[str]]]] = {
    "reward.png": [("reward (mean over rollouts)", ["reward/mean"]),
                   ("held-out avg@k (in-loop eval)", ["eval/average"])],
    "entropy.png": [("entropy, all tokens", ["entropy/all"]), ("entropy on spans", ["entropy/span"]),
                    ("entropy off spans", ["entropy/off_span"])],
    "length.png": [("response length, all", ["length/all"]), ("length, correct", ["length/correct"]),
                   ("length, incorrect", ["length/incorrect"])],
    "lambda.png": [("KL weight lambda", ["kl/lambda"]), ("learning rate", ["optim/lr"])],
    "routes.png": [("FKL-routed token fraction", ["route/fkl_frac"]),
                   ("RKL-routed token fraction", ["route/rkl_frac"]),
                   ("span coverage", ["route/span_coverage"])],
    "exposure.png": [("cumulative exposure sum lambda^2 * coverage", ["exposure/lambda2_coverage_cum"]),
                     ("cumulative sum lambda * coverage", ["exposure/lambda_coverage_cum"])],
    "lift.png": [("key-token lift, teacher's top-1 token (nats/step)", ["lift/key_teacher"]),
                 ("key-token lift, under-allocated token argmax p_T - p_S (nats/step)",
                  ["lift/key_underallocated"]),
                 ("key-token lift, sampled token (nats/step)", ["lift/key_sampled"]),
                 ("teacher top-1 = sampled token", ["lift/teacher_agrees_with_sample"])],
    "mismatch.png": [("train/rollout |log-prob diff|", ["mismatch/logprob_abs_diff"]),
                     ("train/rollout k3 KL", ["mismatch/k3_kl"])],
}


def pyplot(purpose: str):
    """matplotlib.pyplot on the Agg backend (files only), or MissingExtra naming `purpose`."""
    from ..extras import require

    matplotlib = require("matplotlib", "plots", purpose)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl") if os.path.isdir(run_dir) else run_dir
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def _series(rows: list[dict], key: str, smooth: float) -> tuple[list[int], list[float]]:
    xs, ys, ema = [], [], None
    for r in rows:
        v = r.get(key)
        if not isinstance(v, (int, float)) or math.isnan(v):
            continue
        ema = v if ema is None or smooth <= 0 else smooth * ema + (1 - smooth) * v
        xs.append(r["step"])
        ys.append(ema)
    return xs, ys


def plot_runs(run_dirs: list[str], out_dir: str, *, labels: list[str] | None = None, smooth: float = 0.0) -> dict:
    plt = pyplot("plotting metrics")

    runs = [load_metrics(d) for d in run_dirs]
    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    # One colour per run in every panel (a panel where some runs log nothing must not shift the
    # colours of the rest); within a run, several metrics of one panel differ by line style, or
    # by colour when there is a single run.
    from matplotlib.colors import to_hex

    cycle = [to_hex(c) for c in plt.rcParams["axes.prop_cycle"].by_key()["color"]]
    colors = {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}
    styles = ["-", "--", ":", "-."]
    manifest = {}
    for fname, panels in FIGURES.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
        series = []
        for ax, (title, keys) in zip(axes[0], panels):
            for rows, label in zip(runs, labels):
                for j, key in enumerate(keys):
                    xs, ys = _series(rows, key, smooth)
                    if xs:
                        color, ls = (cycle[j % len(cycle)], "-") if len(runs) == 1 else \
                            (colors[label], styles[j % len(styles)])
                        ax.plot(xs, ys, label=label if len(keys) == 1 else f"{label}: {key}", lw=1.5, color=color,
                                ls=ls)
                        series.append([title, label, key, color])
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if ax.lines:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=110)
        plt.close(fig)
        manifest[fname] = {"panels": [t for t, _ in panels], "metrics": sorted({k for _, _, k, _ in series}), "series": series}
    with open(os.path.join(out_dir, "plots.json"), "w") as f:
        json.dump({"runs": labels, "colors": colors, "files": manifest}, f, indent=1)
    return manifest


def forest_plot(rows: list[tuple[str, float, float, float]], path: str, *, title: str = "", scale: float = 100.0,
                unit: str = "points") -> str:
    """One row per (label, estimate, ci_low, ci_high), top to bottom in order, with a line at
    zero; rows whose CI excludes zero are drawn solid, the rest hollow. Values are multiplied by
    `scale` (fractions -> points). Returns `path`."""
    plt = pyplot("plotting a forest plot")

    if not rows:
        raise ValueError("forest_plot: no rows to draw")
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 1.2))
    for k, (_label, est, lo, hi) in enumerate(rows):
        y = len(rows) - 1 - k
        clear = lo > 0 or hi < 0
        ax.plot([scale * lo, scale * hi], [y, y], color="tab:blue", lw=2)
        ax.plot([scale * est], [y], "o", color="tab:blue", mfc="tab:blue" if clear else "white", ms=7)
    ax.axvline(0.0, color="grey", lw=1, ls="--")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in reversed(rows)], fontsize=8)
    ax.set_xlabel(f"difference ({unit}); filled: 95% CI excludes 0", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Draws docs/figures/architecture.png: the parts of one TRACE step and the data flow between them.

    python tools/draw_architecture.py [--out docs/figures/architecture.png]

The figure is the README's and the docs' home page's. Edit the boxes and arrows below, rerun,
and commit the PNG with the change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (x, y, width, height, title, detail, colour)
BOXES = {
    "data": (0.2, 5.6, 2.6, 1.1, "Prompts", "problem, answer,\nreference solution", "#eeeeee"),
    "engines": (3.5, 5.6, 3.4, 1.1, "Rollout engines", "SGLang or hf: one per DP replica,\nor a fleet behind sglang-router",
                "#d6e9f8"),
    "reward": (7.6, 5.6, 2.6, 1.1, "Reward", "math-verify, hard time limit;\ngroup advantages", "#e5f5e0"),
    "annotator": (7.6, 3.6, 2.6, 1.3, "Annotator", "api / self / oracle:\nkey spans (correct),\nerror spans (incorrect)",
                  "#fdebd3"),
    "routes": (4.0, 3.6, 2.9, 1.3, "Routes", "spans -> token masks\n(coverage cap); the variant\npicks GRPO vs KL per token",
               "#fdebd3"),
    "teacher": (0.2, 3.6, 3.1, 1.3, "Teacher (the policy itself)",
                "privileged prompt: reference\nsolution + diagnostic type;\nsnapshot or live", "#f2e0f5"),
    "actor": (0.2, 1.0, 3.1, 1.6, "Actor", "Megatron GPTModel,\nTP x PP x DP (gloo on CPU,\nNCCL on GPU); old log-probs,\nPPO mini-batches",
              "#d6e9f8"),
    "loss": (4.0, 1.0, 3.4, 1.6, "Routed loss (vocab-parallel)",
             "GRPO on every other token;\nFKL / RKL on routed spans x lambda;\nKL over vocab shards, never gathered;\nor fused with the LM head",
             "#fff4c2"),
    "schedule": (8.1, 1.0, 2.1, 1.6, "KL schedule", "lambda0 = 0.5, warm-up,\nanneal to 0;\nno teacher after", "#fff4c2"),
}

# (from, to, label, side of `from`, side of `to`)
ARROWS = [
    ("data", "engines", "1 prompts x n", "right", "left"),
    ("engines", "reward", "2 rollouts", "right", "left"),
    ("reward", "annotator", "3 correct / incorrect", "bottom", "top"),
    ("annotator", "routes", "4 spans", "left", "right"),
    ("routes", "teacher", "5 routed positions", "left", "right"),
    ("teacher", "loss", "6 teacher log-probs\nat routed tokens", "bottom", "top"),
    ("routes", "loss", "", "bottom", "top"),
    ("actor", "loss", "7 logits", "right", "left"),
    ("loss", "actor", "8 grads", "left", "right"),
    ("schedule", "loss", "lambda", "left", "right"),
    ("actor", "engines", "9 weight sync (buckets)", "left", "top"),
]
# arrows drawn as a path of points instead of a straight line between two sides
PATHS = {
    ("actor", "loss"): [(3.3, 2.15), (4.0, 2.15)],
    ("loss", "actor"): [(4.0, 1.35), (3.3, 1.35)],
    ("actor", "engines"): [(0.2, 1.8), (0.07, 1.8), (0.07, 6.95), (5.2, 6.95), (5.2, 6.7)],
}


def _anchor(box, side):
    x, y, w, h = box[:4]
    return {"left": (x, y + h / 2), "right": (x + w, y + h / 2), "top": (x + w / 2, y + h),
            "bottom": (x + w / 2, y)}[side]


def draw(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(10.5, 7.2), dpi=110)
    ax.set_xlim(0, 10.4)
    ax.set_ylim(0.6, 7.75)
    ax.axis("off")
    for x, y, w, h, title, detail, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.03,rounding_size=0.12", fc=colour,
                                    ec="#555555", lw=1.1))
        ax.text(x + w / 2, y + h - 0.2, title, ha="center", va="top", fontsize=10.5, weight="bold")
        ax.text(x + w / 2, y + h - 0.48, detail, ha="center", va="top", fontsize=8.3, linespacing=1.25)
    for a, b, label, sa, sb in ARROWS:
        points = PATHS.get((a, b)) or [_anchor(BOXES[a], sa), _anchor(BOXES[b], sb)]
        colour = "#1f5f99" if (a, b) == ("actor", "engines") else "#333333"
        for p, q in zip(points[:-2], points[1:-1]):
            ax.plot([p[0], q[0]], [p[1], q[1]], color=colour, lw=1.3)
        p, q = points[-2], points[-1]
        ax.add_patch(FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=12, color=colour, lw=1.3,
                                     shrinkA=0, shrinkB=0))
        if not label:
            continue
        if (a, b) == ("actor", "engines"):
            ax.text(2.6, 7.0, label, ha="center", va="bottom", fontsize=8.3, color=colour)
            continue
        mx, my = (points[0][0] + points[-1][0]) / 2, (points[0][1] + points[-1][1]) / 2
        ax.text(mx, my + 0.08, label, ha="center", va="bottom", fontsize=8, color=colour,
                bbox=dict(fc="white", ec="none", alpha=0.85, pad=0.5))
    ax.text(5.2, 7.7, "One TRACE step (train/loop.py): rollout -> reward -> annotate -> route -> teacher -> "
            "routed loss -> update -> sync", ha="center", va="top", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "figures" / "architecture.png"), help="the PNG to write")
    args = p.parse_args(argv)
    draw(Path(args.out))
    print(f"[draw_architecture] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

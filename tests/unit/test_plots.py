"""tools/plot_metrics.py: PNGs exist, are real non-empty PNGs, and hold the expected panels,
with several runs overlaid."""

import json
import struct
import subprocess
import sys

from megatron_trace.observability.plots import FIGURES


def _run(path, steps, scale):
    with open(path / "metrics.jsonl", "w") as f:
        for s in range(steps):
            lam = 0.5 if s < 3 else max(0.0, 0.5 - 0.1 * (s - 2))
            f.write(json.dumps({"step": s, "reward/mean": scale * s / steps, "entropy/all": 1 + scale, "entropy/span": 2.0,
                                "entropy/off_span": 0.5, "length/all": 40 - s, "length/correct": 30.0,
                                "length/incorrect": float("nan"), "kl/lambda": lam, "optim/lr": 1e-4,
                                "route/fkl_frac": 0.1, "route/rkl_frac": 0.05, "route/span_coverage": 0.15,
                                "exposure/lambda2_coverage_cum": 0.01 * s, "exposure/lambda_coverage_cum": 0.02 * s,
                                "mismatch/logprob_abs_diff": 1e-6, "mismatch/k3_kl": 1e-9}) + "\n")


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_overlay_runs_with_expected_panels(tmp_path):
    for name, scale in (("trace", 1.0), ("grpo", 0.5)):
        (tmp_path / name).mkdir()
        _run(tmp_path / name, 8, scale)
    out = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path / "trace"), str(tmp_path / "grpo"),
                          "--out", str(tmp_path / "plots"), "--smooth", "0.5"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "plots" / "plots.json").read_text())
    assert manifest["runs"] == ["trace", "grpo"] and set(manifest["files"]) == set(FIGURES)
    for fname, panels in FIGURES.items():
        png = tmp_path / "plots" / fname
        w, h = _png_size(png)
        assert png.stat().st_size > 5000 and w >= 400 * len(panels) and h >= 300
        assert manifest["files"][fname]["panels"] == [t for t, _ in panels]
    assert "kl/lambda" in manifest["files"]["lambda.png"]["metrics"]
    assert "exposure/lambda2_coverage_cum" in manifest["files"]["exposure.png"]["metrics"]
    assert "length/incorrect" not in manifest["files"]["length.png"]["metrics"]  # all NaN: drawn as "not logged"
    assert "eval/average" not in manifest["files"]["reward.png"]["metrics"]


def test_each_run_keeps_its_colour_in_every_panel(tmp_path):
    from megatron_trace.observability.plots import plot_runs

    for name in ("grpo", "trace"):
        (tmp_path / name).mkdir()
        _run(tmp_path / name, 6, 1.0)
    # GRPO logs no span entropy: that panel holds only the second run, which must keep its colour
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    (tmp_path / "grpo" / "metrics.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "entropy/span"}) + "\n" for r in rows))
    manifest = plot_runs([str(tmp_path / "grpo"), str(tmp_path / "trace")], str(tmp_path / "plots"))
    colors = json.loads((tmp_path / "plots" / "plots.json").read_text())["colors"]
    assert colors["grpo"] != colors["trace"]
    ent = manifest["entropy.png"]["series"]
    assert [s[1] for s in ent if s[2] == "entropy/span"] == ["trace"]
    assert all(color == colors[label] for fname in manifest for _, label, _, color in manifest[fname]["series"])


def test_plot_tool_errors_name_the_run(tmp_path):
    out = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "nope" in out.stderr

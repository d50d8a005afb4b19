"""Finding the runs of a sweep and what each one left behind.

A run is a directory with the `config.yaml` that `megatron-trace train` writes. Its cell is
(model.size, loss.variant, seed); its evaluation is `eval/<tag>/eval.json` (tag `best` by default:
the sweep evaluates `checkpoints/best`) with the per-sample grades in `samples.jsonl` beside it.

A sweep directory may hold `sweep.json`, written by `launch/sweep.py`: the cells it submitted
({"cells": [{"name", "run_dir", "size", "variant", "seed"}, ...]}). With it, a cell whose run
directory never appeared is reported as missing instead of being silently absent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

__all__ = ["MANIFEST", "Run", "discover", "failure_reason", "load_samples", "read_metrics"]

MANIFEST = "sweep.json"
_SKIP = {"checkpoints", "eval", "tb", "slurm", "plots", "hf", "hf_export", "nemo_jobs", "code"}


@dataclass
class Run:
    """One cell of the sweep. status: "ok" (evaluated), "failed" (a run directory without an
    evaluation: `reason` says how far it got) or "missing" (in sweep.json, never started)."""

    run_dir: str
    name: str
    size: str
    variant: str
    seed: int | None
    status: str
    reason: str = ""
    params: int | None = None
    eval: dict | None = None
    eval_dir: str | None = None
    metrics: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def cell(self) -> tuple[str, str, int | None]:
        return (self.size, self.variant, self.seed)


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not a readable config ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a config (a mapping was expected)")
    return data


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl rows; a torn last line (a killed job) is skipped, any other bad line is not."""
    if not os.path.exists(path):
        return []
    lines = open(path, encoding="utf-8").read().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({exc})") from exc
    return rows


def _read_eval(path: str) -> dict:
    try:
        with open(path) as f:
            report = json.load(f)
        benchmarks = report["benchmarks"]
        for b in benchmarks.values():
            float(b["avg@k"]), int(b["k"]), int(b["num_problems"])  # noqa: B018
        float(report["average"])  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a valid eval.json ({type(exc).__name__}: {exc}); rerun the cell's "
                         "evaluation or delete the file") from exc
    if not benchmarks:
        raise ValueError(f"{path}: not a valid eval.json (no benchmarks)")
    return report


def load_samples(eval_dir: str) -> dict[str, dict[int, list[bool]]]:
    """samples.jsonl -> benchmark -> problem index -> correctness of each sample (by sample id)."""
    path = os.path.join(eval_dir, "samples.jsonl")
    if not os.path.exists(path):
        return {}
    out: dict[str, dict[int, dict[int, bool]]] = {}
    for n, line in enumerate(open(path, encoding="utf-8")):
        if line.strip():
            try:
                r = json.loads(line)
                out.setdefault(r["benchmark"], {}).setdefault(int(r["index"]), {})[int(r["sample"])] = bool(r["correct"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n + 1}: not a sample record ({exc})") from exc
    return {b: {i: [s[j] for j in sorted(s)] for i, s in rows.items()} for b, rows in out.items()}


def _params(size: str, hf_configs: tuple[str, ...] = ()) -> int | None:
    """The parameter count of the model the run trained: from the first HF config.json given that
    exists (the evaluated export, then model.hf_dir: the real vocabulary), else the registry's."""
    from ..models.qwen3 import arch_from_hf_config, get_arch

    for path in hf_configs:
        if path and os.path.exists(path):
            try:
                return arch_from_hf_config(path).num_params
            except (ValueError, KeyError, OSError):
                continue
    try:
        return get_arch(size).num_params
    except ValueError:
        return None


def failure_reason(run_dir: str, cfg: dict, metrics: list[dict], tag: str) -> str:
    steps = (cfg.get("train") or {}).get("steps")
    done = metrics[-1]["step"] + 1 if metrics and "step" in metrics[-1] else 0
    failed = os.path.join(run_dir, "FAILED")
    if os.path.exists(failed):
        return open(failed).readline().strip() or "marked FAILED"
    if steps and done < steps:
        return f"training stopped after {done} of {steps} steps"
    if tag == "best" and not os.path.exists(os.path.join(run_dir, "checkpoints", "best")):
        return f"trained {done} steps but left no checkpoints/best (checkpoint.keep_best off?) and no eval"
    return f"trained {done} steps; no eval/{tag}/eval.json"


def _load_run(run_dir: str, tag: str) -> Run:
    cfg = _read_yaml(os.path.join(run_dir, "config.yaml"))
    model, loss, run = cfg.get("model") or {}, cfg.get("loss") or {}, cfg.get("run") or {}
    size = str(model.get("size", "?"))
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    eval_dir = os.path.join(run_dir, "eval", tag)
    hf_configs = (os.path.join(eval_dir, "hf_export", "config.json"),
                  os.path.join(str(model.get("hf_dir") or ""), "config.json") if model.get("hf_dir") else "")
    r = Run(run_dir=run_dir, name=str(run.get("name") or os.path.basename(run_dir)), size=size,
            variant=str(loss.get("variant", "?")), seed=cfg.get("seed"), status="ok",
            params=_params(size, hf_configs), metrics=metrics, config=cfg)
    path = os.path.join(eval_dir, "eval.json")
    if os.path.exists(path):
        r.eval, r.eval_dir = _read_eval(path), eval_dir
    else:
        r.status, r.reason = "failed", failure_reason(run_dir, cfg, metrics, tag)
    return r


def _is_run(d: str) -> bool:
    """A training run: config.yaml, and not an SFT base (sft_report.json / sft_metrics.jsonl)."""
    return (os.path.exists(os.path.join(d, "config.yaml"))
            and not os.path.exists(os.path.join(d, "sft_metrics.jsonl")))


def _walk(root: str) -> list[str]:
    found = []
    for d, subdirs, _files in os.walk(root):
        if _is_run(d):
            found.append(d)
            subdirs[:] = []
            continue
        subdirs[:] = sorted(s for s in subdirs if s not in _SKIP and not s.startswith("."))
    return found


def discover(paths: list[str], *, tag: str = "best") -> list[Run]:
    """Every run under `paths` (run directories or folders holding them, searched recursively),
    plus the cells of any sweep.json there that have no run directory. Two runs of one cell are
    refused (name both); so is a path that does not exist or holds no run at all."""
    runs: dict[str, Run] = {}
    expected: list[dict] = []
    for p in paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"report: {p} is not a directory")
        root = os.path.abspath(p)
        manifest = os.path.join(root, MANIFEST)
        if os.path.exists(manifest):
            try:
                cells = json.load(open(manifest))["cells"]
                expected += [{**c, "run_dir": os.path.abspath(os.path.join(root, c["run_dir"]))} for c in cells]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{manifest}: not a sweep manifest ({exc})") from exc
        for d in _walk(root):
            if os.path.realpath(d) not in runs:
                runs[os.path.realpath(d)] = _load_run(d, tag)
    for c in expected:
        if os.path.realpath(c["run_dir"]) not in runs:
            runs[os.path.realpath(c["run_dir"])] = Run(
                run_dir=c["run_dir"], name=c.get("name", os.path.basename(c["run_dir"])), size=str(c["size"]),
                variant=str(c["variant"]), seed=c.get("seed"), status="missing", params=_params(str(c["size"])),
                reason="in sweep.json but its run directory does not exist (never started?)")
    if not runs:
        raise FileNotFoundError(f"report: no run (a directory with config.yaml) under {', '.join(paths)}")
    seen: dict[tuple, str] = {}
    for r in runs.values():
        if r.cell in seen:
            raise ValueError(f"report: {seen[r.cell]} and {r.run_dir} are the same cell (size {r.size}, variant "
                             f"{r.variant}, seed {r.seed}); report one of them")
        seen[r.cell] = r.run_dir
    return sorted(runs.values(), key=lambda r: (r.params or 0, r.size, r.variant, r.seed or 0))

"""What a run spent, from its metrics.jsonl and its layout (config.yaml's `cluster`).

- generated tokens: per step, the rollouts trained on x their mean response length (the metrics
  record no separate count of filtered rollouts, so this is the lower bound);
- trained tokens: `train/num_tokens` summed over steps;
- wall hours: `time/step` summed (evaluation time is the eval.json's `seconds`, reported apart);
- device-hours: nodes x GPUs per node x wall hours, or nodes x wall hours on CPU layouts
  (`cluster.gpus_per_node: 0`, or `parallel.device: cpu`, whose GPU count is unused), where
  `unit` says so;
- the mean step-time breakdown by phase.
"""

from __future__ import annotations

from .runs import Run

__all__ = ["PHASES", "run_compute"]

# phase -> the metric timing it (seconds per step)
PHASES = {"rollout": "time/rollout", "annotation": "time/annotate_and_route", "teacher": "time/teacher",
          "train": "time/train", "sync": "sync/seconds", "wait": "async/trainer_idle_s"}


def run_compute(run: Run) -> dict:
    rows = [r for r in run.metrics if "time/step" in r]
    cluster = run.config.get("cluster") or {}
    nodes, gpus = int(cluster.get("nodes", 1) or 1), int(cluster.get("gpus_per_node", 0) or 0)
    if (run.config.get("parallel") or {}).get("device") == "cpu":
        gpus = 0  # a CPU run (the local executor, a laptop) keeps the cluster section's GPU count unused
    hours = sum(float(r["time/step"]) for r in rows) / 3600.0
    breakdown = {}
    for phase, key in PHASES.items():
        vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        breakdown[phase] = sum(vals) / len(vals) if vals else None
    return {
        "steps": len(rows),
        "generated_tokens": sum(float(r.get("rollout/response_len_mean", 0.0)) * float(r.get("train/num_rollouts", 0.0))
                                for r in rows),
        "trained_tokens": sum(float(r.get("train/num_tokens", 0.0)) for r in rows),
        "wall_hours": hours,
        "devices": nodes * gpus if gpus else nodes,
        "unit": "GPU-hours" if gpus else "node-hours (CPU)",
        "device_hours": (nodes * gpus if gpus else nodes) * hours,
        "eval_seconds": float(run.eval.get("seconds", 0.0)) if run.eval else None,
        "step_seconds": breakdown,
    }

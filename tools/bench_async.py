#!/usr/bin/env python
"""Step time of the synchronous loop against one-step-off asynchronous rollouts, on CPU, both arms
in one run on the same workload.

    python tools/bench_async.py --json [--steps 6 --prompts 16 --n 4 --max-new-tokens 64 --server-batch-rows 16]
                                       [--size demo] [--timeline docs/figures/async_timeline.png]

One fixture SGLang server (`tests/sglang_fixture_server.py`: SGLang 0.5.6's HTTP protocol on an
`hf` engine, one torch thread, batching up to --server-batch-rows rows of any prompts, as SGLang
batches; 0 = one prompt's rows per batch, six times slower here) serves a random model of size --size (the char tokenizer's
vocabulary); one gloo trainer rank (one torch thread) trains TRACE-FKL on the arithmetic task
with `rollout.placement=remote`, first with `rollout.async.max_age=0`, then with 1, from the same
initial weights. The trainer pushes its weights to the server over gloo after every step; in the
asynchronous arm the server pauses (retract) for that instead of aborting.

The first step of each arm (start-up) is left out of the means. Keys: step_s_sync, step_s_async,
ratio_step_time_sync_vs_async (target >= 1.4 on 2 cores), trainer_idle_frac_sync (the share of
a step the trainer spends waiting for the rollouts: generation, scoring and annotation),
trainer_idle_frac_async (async/trainer_idle_s over the step), generate_s and train_s (means
per step in the synchronous arm), and dropped (samples, asynchronous arm). --timeline draws both
arms from the benchmark's own timestamps. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fixture server is a test stand-in for sglang.launch_server; it lives with the tests.
sys.path.insert(0, os.path.join(REPO, "tests"))


def _arm(run_dir: str, overrides: list[str], steps: int):
    """Trainer rank: one arm; returns (per-step metrics, spans [(lane, what, step, t0, t1)])."""
    import zlib  # noqa: F401

    import torch

    from megatron_trace.config import load_config
    from megatron_trace.train import async_rollout, loop
    from megatron_trace.train.setup_run import setup_run

    torch.set_num_threads(1)
    spans: list = []
    real_make, real_train, real_async = loop.make_batch, loop.train_one_step, loop.AsyncRollouts
    producers: list = []

    def make_batch(run, step, lam, local=False):
        t0 = time.perf_counter()
        out = real_make(run, step, lam, local=local)
        if not local:
            spans.append(("trainer", "rollout", step, t0, time.perf_counter()))
        return out

    def train_one_step(*args, **kwargs):
        t0 = time.perf_counter()
        out = real_train(*args, **kwargs)
        spans.append(("trainer", "train + sync", args[1], t0, time.perf_counter()))
        return out

    class Recorded(async_rollout.AsyncRollouts):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            producers.append(self.producer)

    loop.make_batch, loop.train_one_step, loop.AsyncRollouts = make_batch, train_one_step, Recorded
    try:
        cfg = load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"), [f"run.dir={run_dir}", *overrides])
        run = setup_run(cfg)
        t_start = time.perf_counter()
        history = loop.train(run, steps=steps)
        run.close()
    finally:
        loop.make_batch, loop.train_one_step, loop.AsyncRollouts = real_make, real_train, real_async
    for p in producers:
        for what, step, t0, t1 in p.timeline:
            spans.append(("fleet" if what == "generate" else "trainer", "rollout" if what == "generate" else "wait",
                          step, t0, t1))
    return history, [(lane, what, step, t0 - t_start, t1 - t_start) for lane, what, step, t0, t1 in spans]


def _both(root: str, common: list[str], steps: int):
    return {"sync": _arm(os.path.join(root, "sync"), common + ["rollout.async.max_age=0"], steps),
            "async": _arm(os.path.join(root, "async"), common + ["rollout.async.max_age=1"], steps)}


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _plot(arms: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"rollout": "#4C72B0", "train + sync": "#DD8452", "wait": "#C0C0C0"}
    fig, axes = plt.subplots(2, 1, figsize=(10, 3.6), sharex=True)
    for ax, (name, (_, spans)) in zip(axes, arms.items()):
        lanes = ["trainer", "fleet"] if name == "async" else ["trainer"]
        for y, lane in enumerate(lanes):
            for ln, what, step, t0, t1 in spans:
                if ln == lane:
                    ax.barh(y, t1 - t0, left=t0, height=0.6, color=colours[what], edgecolor="white", linewidth=0.5)
                    if t1 - t0 > 0.4 and what != "wait":
                        ax.text((t0 + t1) / 2, y, str(step), ha="center", va="center", fontsize=7, color="white")
        ax.set_yticks(range(len(lanes)), [f"{lane}" for lane in lanes])
        ax.set_title({"sync": "synchronous (rollout.async.max_age=0): the trainer waits for every batch",
                      "async": "one-step-off (max_age=1): the fleet makes batch k+1 while step k trains"}[name],
                     fontsize=9, loc="left")
    axes[-1].set_xlabel("seconds since the first step (numbers: step)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, ["rollout (generate, score, annotate)", "train step + weight sync", "trainer waits"],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=16, help="rollout.prompts_per_step")
    p.add_argument("--n", type=int, default=4, help="rollout.n")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--server-batch-rows", type=int, default=16,
                   help="the fixture server batches up to N rows of any prompts (0: one prompt's rows per batch)")
    p.add_argument("--size", default="demo", help="model size of the actor and the server (megatron-trace models)")
    p.add_argument("--timeline", default=None, help="write a PNG timeline of both arms here")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("overrides", nargs="*", help="more config overrides, key=value")
    a = p.parse_args(argv)
    if a.steps < 3:
        p.error("--steps must be >= 3 (the first step of each arm is start-up)")

    from fixture_processes import char_task_model, start_fixture_servers, stop_processes

    from megatron_trace.parallel import run_on_ranks

    root = tempfile.mkdtemp(prefix="bench_async_")
    hf_dir = char_task_model(os.path.join(root, "server_model"), seed=4321, size=a.size)
    procs = start_fixture_servers(1, hf_dir, log_dir=root, extra_args=["--max-batch-rows", str(a.server_batch_rows)])
    url = procs[0][1]
    common = [f"model.size={a.size}", "rollout.placement=remote", f'rollout.remote.urls=["{url}"]',
              "rollout.remote.master_address=127.0.0.1", "rollout.remote.backend=gloo",
              f"rollout.prompts_per_step={a.prompts}", f"rollout.n={a.n}", f"rollout.max_new_tokens={a.max_new_tokens}",
              "log.tensorboard=false", "log.progress=false", "checkpoint.every=1000", "eval.every=0",
              f"optim.micro_batch_size={a.prompts * a.n}", *a.overrides]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        arms = run_on_ranks(_both, 1, root, common, a.steps, timeout_s=3600)[0]
    finally:
        stop_processes(procs)
    hs, ha = arms["sync"][0][1:], arms["async"][0][1:]  # step 0 is start-up
    step_sync = _mean([m["time/step"] for m in hs])
    step_async = _mean([m["time/step"] for m in ha])
    res = {
        "step_s_sync": step_sync, "step_s_async": step_async,
        "ratio_step_time_sync_vs_async": step_sync / step_async,
        "trainer_idle_frac_sync": _mean([(m["time/rollout"] + m["time/reward"] + m["time/annotate_and_route"])
                                         / m["time/step"] for m in hs]),
        "trainer_idle_frac_async": _mean([m["async/trainer_idle_s"] / m["time/step"] for m in ha]),
        "generate_s": _mean([m["time/rollout"] for m in hs]), "train_s": _mean([m["time/train"] for m in hs]),
        "sync_s": _mean([m.get("sync/seconds", 0.0) for m in hs]),
        "pause_s_async": _mean([m.get("async/pause_s", 0.0) for m in ha]),
        "dropped": sum(m["async/dropped"] for m in ha),
        "age_mean_async": _mean([m["async/age_mean"] for m in ha]),
        "target": {"ratio_step_time_sync_vs_async": ">= 1.4"},
        "workload": {"size": a.size, "server_batch_rows": a.server_batch_rows, "steps": a.steps, "prompts": a.prompts, "n": a.n,
                     "max_new_tokens": a.max_new_tokens, "torch_threads": {"server": 1, "trainer": 1}},
    }
    if a.timeline:
        _plot(arms, a.timeline)
        res["timeline"] = a.timeline
    if not a.json:
        print(f"sync {step_sync:.2f} s/step, async {step_async:.2f} s/step: x{res['ratio_step_time_sync_vs_async']:.2f}",
              file=sys.stderr)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

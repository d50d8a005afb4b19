"""avg@k evaluation over benchmarks with any rollout engine (DESIGN section 9).

For each benchmark: every problem is prompted with the policy's template (Qwen3 thinking mode
by default), sampled k times (T 0.6, top-p 0.95, top-k 20 by default), and graded by the
benchmark's verifier in the hard-timeout pool (math-verify for math, letter extraction for
GPQA, the task's own verifier for the synthetic set). Every graded sample is appended to
`samples.jsonl` as soon as its batch is done, so an interrupted evaluation resumes where it
stopped (`state.json` pins the settings; a different setting refuses to mix runs).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from .metrics import avg_at_k, bootstrap_ci, pass_at_k_mean

__all__ = ["EvalSettings", "eval_metrics", "evaluate", "settings_from_config", "summarize"]

VERIFIERS = {
    "math": "megatron_trace.reward.math.grade_math",
    "choice": "megatron_trace.reward.choice.grade_choice",
    "arith": "megatron_trace.tasks.arith.grade_arith",
}


@dataclass
class EvalSettings:
    benchmarks: list[str] = field(default_factory=lambda: ["math500", "aime24", "aime25", "amc23", "gpqa_diamond"])
    k: int = 8
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 32768
    thinking: bool = True
    limit: int | None = None  # first N problems of each benchmark (in-loop subsets)
    seed: int = 0
    batch_prompts: int = 16  # prompts per engine call
    bootstrap_samples: int = 2000
    gpqa_csv: str | None = None
    arith: dict = field(default_factory=dict)  # num_ops / digits / n / seed of the synthetic set
    # Benchmarks read from local problem/answer files (.jsonl/.parquet), graded with math-verify:
    # name -> path. In-loop evaluation puts the validation split here as "val" (eval.in_loop_source).
    sources: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> dict:
        d = asdict(self)
        for k in ("batch_prompts", "bootstrap_samples", "benchmarks"):
            d.pop(k)
        if not d["sources"]:
            d.pop("sources")  # state.json files written before local sources existed stay valid
        return d


def _load(name: str, s: EvalSettings) -> tuple[str, list[dict]]:
    from ..data.problems import load_benchmark, load_problems

    if name in s.sources:
        rows, _ = load_problems(s.sources[name])
        return "math", rows[: s.limit] if s.limit else rows
    a = s.arith
    b, rows = load_benchmark(name, gpqa_csv=s.gpqa_csv, arith_n=a.get("n", 200), arith_seed=a.get("seed", 0),
                             arith_ops=a.get("num_ops", 3), arith_digits=a.get("digits", 2),
                             arith_operators=a.get("ops", "+-*"), arith_task=a.get("task", "arith"))
    kind = "arith" if b.source == "arith" else b.kind
    return kind, rows[: s.limit] if s.limit else rows


def _read_done(path: str) -> dict[tuple[str, int], list[dict]]:
    done: dict[tuple[str, int], list[dict]] = {}
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            if line.strip():
                r = json.loads(line)
                done.setdefault((r["benchmark"], r["index"]), []).append(r)
    return done


def _check_state(out_dir: str, s: EvalSettings, model: str) -> None:
    path = os.path.join(out_dir, "state.json")
    want = {"settings": s.fingerprint(), "model": model}
    if os.path.exists(path):
        have = json.load(open(path))
        if have != want:
            diff = sorted(k for k in want["settings"] if have.get("settings", {}).get(k) != want["settings"][k])
            if have.get("model") != model:
                diff.append("model")
            raise ValueError(f"{out_dir} holds an evaluation with other settings ({', '.join(diff)}); "
                             "use another --out or delete it")
    else:
        with open(path, "w") as f:
            json.dump(want, f, indent=1)


def evaluate(engine, tokenizer, settings: EvalSettings, *, out_dir: str | None = None, model: str = "model",
             progress: bool = True, verify: Callable | None = None) -> dict:
    """Sample, grade and summarise every benchmark. Returns the eval.json content.

    verify: an override `(kind, [(response, gold)]) -> [grade]` (tests); default: the verifier pool.
    """
    from tqdm.auto import tqdm

    from ..data.problems import math_prompt
    from ..reward.pool import VerifyPool
    from ..rollout import SamplingParams

    s = settings
    samples_path = None
    done: dict = {}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        _check_state(out_dir, s, model)
        samples_path = os.path.join(out_dir, "samples.jsonl")
        done = _read_done(samples_path)
    results, t0 = {}, time.perf_counter()
    pools: dict[str, VerifyPool] = {}
    try:
        for name in s.benchmarks:
            kind, rows = _load(name, s)
            todo = [i for i in range(len(rows)) if len(done.get((name, i), [])) < s.k]
            bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc=f"eval {name}", disable=not progress)
            for start in range(0, len(todo), s.batch_prompts):
                idx = todo[start:start + s.batch_prompts]
                prompts = [tokenizer(math_prompt(rows[i]["problem"], tokenizer, thinking=s.thinking, kind=kind),
                                     add_special_tokens=False)["input_ids"] for i in idx]
                # The seed depends on the problem only, so a resumed run samples exactly what it would
                # have, and several engines (eval at parallel.dp > 1) sample what one engine would.
                seeds = [(s.seed * 1_000_003 + zlib.crc32(name.encode()) + i) % (2**31 - 1) for i in idx]
                flat = engine.generate(prompts, SamplingParams(n=s.k, temperature=s.temperature, top_p=s.top_p,
                                                               top_k=s.top_k, max_new_tokens=s.max_new_tokens),
                                       seeds=seeds)
                outs = [flat[j * s.k:(j + 1) * s.k] for j in range(len(idx))]
                texts = [[tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in out] for out in outs]
                items = [(t, rows[i]["answer"]) for i, ts in zip(idx, texts) for t in ts]
                if verify is not None:
                    grades = verify(kind, items)
                else:
                    if kind not in pools:
                        pools[kind] = VerifyPool(VERIFIERS[kind], num_workers=2, timeout_s=10.0)
                    grades = [g if isinstance(g, str) else "error" for g in pools[kind].map(items)]
                recs, g = [], 0
                for i, out, ts in zip(idx, outs, texts):
                    for j, (o, t) in enumerate(zip(out, ts)):
                        recs.append({"benchmark": name, "index": i, "sample": j, "grade": grades[g],
                                     "correct": grades[g] == "correct", "length": len(o.token_ids),
                                     "finish_reason": o.finish_reason, "response": t})
                        g += 1
                for r in recs:
                    done.setdefault((name, r["index"]), []).append(r)
                if samples_path:
                    with open(samples_path, "a", encoding="utf-8") as f:
                        f.writelines(json.dumps(r) + "\n" for r in recs)
                bar.update(len(idx))
            bar.close()
            results[name] = summarize([sorted(done[(name, i)], key=lambda r: r["sample"])[: s.k]
                                       for i in range(len(rows))], s.k, s.bootstrap_samples, s.seed)
    finally:
        for pool in pools.values():
            pool.close()
    avg = [r["avg@k"] for r in results.values()]
    report = {"model": model, "settings": asdict(s), "benchmarks": results,
              "average": sum(avg) / len(avg) if avg else float("nan"), "seconds": time.perf_counter() - t0}
    if out_dir:
        from .report import write_reports

        write_reports(report, out_dir)
    return report


def summarize(per_problem: Sequence[Sequence[dict]], k: int, bootstrap_samples: int = 2000, seed: int = 0) -> dict:
    """Numbers for one benchmark from its graded samples (a list of k records per problem)."""
    correct = [[r["correct"] for r in recs] for recs in per_problem]
    flat = [r for recs in per_problem for r in recs]
    scores = [sum(c) / len(c) for c in correct]
    lo, hi = bootstrap_ci(scores, num_samples=bootstrap_samples, seed=seed)
    ks = sorted({1, k} | {2**j for j in range(1, k.bit_length()) if 2**j <= k})
    n = max(len(flat), 1)
    return {
        "num_problems": len(correct), "k": k, "avg@k": avg_at_k(correct), "ci95": [lo, hi],
        **{f"pass@{j}": pass_at_k_mean(correct, j) for j in ks},
        "mean_length": sum(r["length"] for r in flat) / n,
        "truncation_rate": sum(r["finish_reason"] == "length" for r in flat) / n,
        "no_answer_rate": sum(r["grade"] == "no_answer" for r in flat) / n,
        "timeout_rate": sum(r["grade"] == "timeout" for r in flat) / n,
    }


def settings_from_config(cfg, *, limit: int | None = None, in_loop: bool = False) -> EvalSettings:
    """EvalSettings from a Config's `eval.*` keys (and the synthetic task's shape from `data.arith`).

    in_loop: the settings of the evaluation inside training, which is the validation split
    `eval.in_loop_source` (as the benchmark "val") when that is set, else `eval.benchmarks`.
    `eval.benchmarks` may list "val" too (then it reproduces the in-loop numbers)."""
    e, a = cfg.eval, cfg.data.arith
    benchmarks = ["val"] if in_loop and e.in_loop_source else list(e.benchmarks)
    sources = {"val": e.in_loop_source} if e.in_loop_source and "val" in benchmarks else {}
    return EvalSettings(benchmarks=benchmarks, sources=sources, k=e.k, temperature=e.temperature, top_p=e.top_p,
                        top_k=e.top_k, max_new_tokens=e.max_new_tokens, thinking=e.thinking,
                        limit=limit if limit else e.limit,
                        seed=cfg.seed, batch_prompts=e.batch_prompts, bootstrap_samples=e.bootstrap_samples,
                        gpqa_csv=e.gpqa_csv,
                        arith={"n": e.arith_n, "seed": cfg.seed, "num_ops": a.num_ops, "digits": a.digits,
                               "ops": a.ops,
                               # only when not the default, so that existing eval states keep their fingerprint
                               **({"task": cfg.data.task} if cfg.data.task != "arith" else {})})


def eval_metrics(report: dict) -> dict[str, float]:
    """Flat metrics for metrics.jsonl / TensorBoard."""
    out = {"eval/average": report["average"]}
    for b, v in report["benchmarks"].items():
        out.update({f"eval/{b}/avg@k": v["avg@k"], f"eval/{b}/ci95_low": v["ci95"][0],
                    f"eval/{b}/ci95_high": v["ci95"][1], f"eval/{b}/mean_length": v["mean_length"],
                    f"eval/{b}/truncation_rate": v["truncation_rate"], f"eval/{b}/no_answer_rate": v["no_answer_rate"]})
    return out

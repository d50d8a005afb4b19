"""Spread one step's prompts over the rollout engines and gather the samples in prompt order.

Two fleets, one contract (`generate(prompts, params, seeds) -> (samples per prompt or None, stats)`):

- `EngineFleet`: engines this process talks to (remote SGLang servers over HTTP, or the single
  engine of `rollout.placement=rank0`). One worker thread per live engine pulls prompt chunks
  from a queue, largest expected cost first; a failed or timed-out request (or one whose samples
  came back aborted) goes back on the queue for another engine, and an engine whose health check
  then fails leaves the rotation.
- `colocated_generate`: one engine per data-parallel replica, each in its own process. Every
  replica generates the share `balance` gives it; the results are exchanged (an all-gather the
  caller injects), and prompts whose engine failed are reassigned to other replicas for up to
  `max_retries` more rounds.

Seeds are per prompt (`prompt_seed(run seed, step, prompt uid)`), so the samples of a prompt do
not depend on the number of engines or on which one served it. A prompt that still has no
samples after the retries is reported in `DispatchStats.failed` (and logged); callers count it,
nothing is dropped silently.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .base import Sample, SamplingParams

__all__ = ["DispatchStats", "DispatchingEngine", "EngineFleet", "FleetEngine", "balance", "colocated_generate",
           "prompt_costs"]

log = logging.getLogger(__name__)


@dataclass
class DispatchStats:
    requests: int = 0  # generate calls made (all engines, all rounds)
    retries: int = 0  # prompt chunks re-sent after a failure
    failed: list[int] = field(default_factory=list)  # prompt indices without samples after all retries
    dead_engines: list[str] = field(default_factory=list)  # taken out of rotation this call
    errors: list[str] = field(default_factory=list)  # one line per failed request
    prompts_per_engine: dict[str, int] = field(default_factory=dict)
    tokens_per_engine: dict[str, int] = field(default_factory=dict)  # response tokens generated

    def add(self, other: DispatchStats) -> None:
        """Add another call's figures to these (a running total over several calls)."""
        self.requests += other.requests
        self.retries += other.retries
        self.failed += other.failed
        self.dead_engines += other.dead_engines
        self.errors += other.errors
        for mine, theirs in ((self.prompts_per_engine, other.prompts_per_engine),
                             (self.tokens_per_engine, other.tokens_per_engine)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def as_metrics(self) -> dict[str, float]:
        toks = list(self.tokens_per_engine.values())
        out = {"rollout/requests": float(self.requests), "rollout/retries": float(self.retries),
               "rollout/failed_prompts": float(len(self.failed)),
               "rollout/dead_engines": float(len(self.dead_engines)),
               "rollout/engines_used": float(sum(1 for v in self.prompts_per_engine.values() if v))}
        if toks and max(toks) > 0:
            # max / mean response tokens per engine: 1.0 is a perfect balance
            out["rollout/engine_token_imbalance"] = max(toks) / (sum(toks) / len(toks))
        return out


def prompt_costs(prompts: Sequence[Sequence[int]], n: int, expected_response_len: float) -> list[float]:
    """Expected tokens a prompt costs an engine: n samples of (prompt + expected response)."""
    return [n * (len(p) + expected_response_len) for p in prompts]


def balance(costs: Sequence[float], bins: int, allowed: Sequence[Sequence[int]] | None = None,
            loads: Sequence[float] | None = None) -> list[list[int]]:
    """Greedy longest-processing-time partition of items into `bins` (item indices, ascending).

    Each item, largest cost first (ties by index), goes to the least-loaded bin (ties by bin
    index), restricted to `allowed[item]` when given (an empty list allows every bin). The
    largest bin exceeds the mean by at most the largest single cost. Deterministic.
    """
    if bins < 1:
        raise ValueError(f"balance needs at least one bin, got {bins}")
    load = list(loads) if loads is not None else [0.0] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        cand = list(allowed[i]) if allowed is not None and allowed[i] else list(range(bins))
        b = min(cand, key=lambda k: (load[k], k))
        out[b].append(i)
        load[b] += costs[i]
    return [sorted(b) for b in out]


def _split(samples: list[Sample], idx: Sequence[int], n: int) -> dict[int, list[Sample]]:
    if len(samples) != len(idx) * n:
        raise RuntimeError(f"engine returned {len(samples)} samples for {len(idx)} prompts x n={n}")
    return {i: samples[k * n:(k + 1) * n] for k, i in enumerate(idx)}


class EngineFleet:
    """Engines reachable from this process, used concurrently (one thread per engine)."""

    def __init__(self, engines: Sequence, names: Sequence[str] | None = None, *, max_retries: int = 2,
                 chunk_prompts: int = 0, health_check: bool = True):
        if not engines:
            raise ValueError("an engine fleet needs at least one engine")
        self.engines = list(engines)
        self.names = list(names) if names is not None else [f"engine{i}" for i in range(len(engines))]
        self.alive = [True] * len(self.engines)
        self.max_retries = max_retries
        self.chunk_prompts = chunk_prompts
        self.health_check = health_check

    @property
    def live(self) -> list[int]:
        return [i for i, a in enumerate(self.alive) if a]

    def _healthy(self, e: int) -> bool:
        probe = getattr(self.engines[e], "health", None)
        if not self.health_check or probe is None:
            return True
        try:
            return bool(probe())
        except Exception:  # noqa: BLE001 - an unreachable server is simply unhealthy
            return False

    def _chunks(self, costs: list[float]) -> list[list[int]]:
        live = len(self.live)
        if self.chunk_prompts > 0:
            order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
            return [sorted(order[k:k + self.chunk_prompts]) for k in range(0, len(order), self.chunk_prompts)]
        return [c for c in balance(costs, max(live, 1)) if c]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int],
                 expected_response_len: float | None = None) -> tuple[list[list[Sample] | None], DispatchStats]:
        # engines already out of rotation take no part: they would count as idle in the imbalance
        in_rotation = [self.names[i] for i in self.live]
        stats = DispatchStats(prompts_per_engine={n: 0 for n in in_rotation},
                              tokens_per_engine={n: 0 for n in in_rotation})
        if not prompts:
            return [], stats
        if not self.live:
            raise RuntimeError(f"no live rollout engine left (dead: {', '.join(self.names)})")
        costs = prompt_costs(prompts, params.n, params.max_new_tokens if expected_response_len is None
                             else expected_response_len)
        chunks = sorted(self._chunks(costs), key=lambda c: -sum(costs[i] for i in c))
        return _Round(self, prompts, params, seeds, stats).run(chunks)


class _Round:
    """One `EngineFleet.generate` call: a worker thread per live engine takes chunks of prompts.
    Fresh chunks wait in `shared` (largest first); a retry goes straight to the queue of one chosen
    engine (`own`), so a failed chunk never bounces back to the engine that failed it."""

    def __init__(self, fleet: EngineFleet, prompts, params: SamplingParams, seeds, stats: DispatchStats):
        self.fleet, self.prompts, self.params, self.seeds, self.stats = fleet, prompts, params, seeds, stats
        self.results: list[list[Sample] | None] = [None] * len(prompts)
        self.shared: queue.Queue = queue.Queue()
        self.own: dict[int, queue.Queue] = {e: queue.Queue() for e in range(len(fleet.engines))}
        self.lock = threading.Lock()
        self.pending = len(prompts)  # prompts not yet settled (done or failed for good)
        self.settled = threading.Event()

    def settle(self, k: int) -> None:
        self.pending -= k
        if self.pending <= 0:
            self.settled.set()

    def route(self, item) -> None:
        """Under the lock: send a retry to a live engine that has not failed it (the least busy), or
        to any live engine when every one has."""
        tried = item[1]
        live = self.fleet.live
        fresh = [k for k in live if k not in tried] or live
        self.own[min(fresh, key=lambda k: (self.own[k].qsize(), k))].put(item)

    def next_item(self, e: int):
        try:
            return self.own[e].get_nowait()
        except queue.Empty:
            pass
        try:
            return self.shared.get(timeout=0.05)
        except queue.Empty:
            return None

    def failed(self, e: int, item, exc: Exception) -> None:
        """A request failed on engine e: check its health, retry the chunk elsewhere or count it."""
        fleet, stats = self.fleet, self.stats
        chunk, tried, attempt = item
        name = fleet.names[e]
        healthy = fleet._healthy(e)
        with self.lock:
            stats.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            if not healthy and fleet.alive[e]:
                fleet.alive[e] = False
                stats.dead_engines.append(name)
                log.warning("rollout engine %s failed its health check; taken out of rotation", name)
            if attempt < fleet.max_retries and fleet.live:
                stats.retries += 1
                log.warning("rollout request of %d prompts failed on %s (%s); retrying elsewhere", len(chunk), name, exc)
                self.route((chunk, tried | {e}, attempt + 1))
            else:
                stats.failed.extend(chunk)
                log.error("rollout request of %d prompts failed %d times (last on %s: %s); counted "
                          "in rollout/failed_prompts", len(chunk), attempt + 1, name, exc)
                self.settle(len(chunk))
            if not fleet.alive[e]:  # hand this engine's queued retries to the live ones
                while not self.own[e].empty():
                    left = self.own[e].get_nowait()
                    if fleet.live:
                        self.route(left)
                    else:
                        stats.failed.extend(left[0])
                        self.settle(len(left[0]))

    def worker(self, e: int) -> None:
        eng, name, p = self.fleet.engines[e], self.fleet.names[e], self.params
        while not self.settled.is_set():
            item = self.next_item(e)
            if item is None:
                continue
            chunk = item[0]
            with self.lock:
                self.stats.requests += 1
            try:
                got = eng.generate([self.prompts[i] for i in chunk], p, [self.seeds[i] for i in chunk])
                aborted = sum(1 for x in got if x.finish_reason == "abort")
                if aborted:  # the server aborted them (a weight update paused in abort mode)
                    raise RuntimeError(f"{aborted} of {len(got)} samples came back aborted")
                out = _split(got, chunk, p.n)
            except Exception as exc:  # noqa: BLE001 - every failure is retried or counted
                self.failed(e, item, exc)
                if not self.fleet.alive[e]:
                    return
                continue
            with self.lock:
                for i, s in out.items():
                    self.results[i] = s
                self.stats.prompts_per_engine[name] += len(chunk)
                self.stats.tokens_per_engine[name] += sum(len(x.token_ids) for s in out.values() for x in s)
                self.settle(len(chunk))

    def run(self, chunks: list[list[int]]) -> tuple[list[list[Sample] | None], DispatchStats]:
        for chunk in chunks:
            self.shared.put((chunk, frozenset(), 0))
        threads = [threading.Thread(target=self.worker, args=(e,), daemon=True, name=f"rollout-{self.fleet.names[e]}")
                   for e in self.fleet.live]
        for t in threads:
            t.start()
        while not self.settled.is_set():
            if not any(t.is_alive() for t in threads):  # every engine died with work left
                with self.lock:
                    left = [i for i in range(len(self.prompts)) if self.results[i] is None and i not in self.stats.failed]
                    self.stats.failed.extend(left)
                    log.error("no live rollout engine left; %d prompts counted as failed", len(left))
                break
            self.settled.wait(0.05)
        for t in threads:
            t.join(timeout=1.0)
        self.stats.failed.sort()
        return self.results, self.stats


def colocated_generate(engine, replica: int, num_replicas: int, prompts: Sequence[Sequence[int]],
                       params: SamplingParams, seeds: Sequence[int], exchange: Callable[[object], list],
                       *, max_retries: int = 2, expected_response_len: float | None = None
                       ) -> tuple[list[list[Sample] | None], DispatchStats]:
    """Every rank calls this; `engine` is set only on each replica's engine owner (None elsewhere).

    exchange(obj) -> the list of every rank's obj (an all-gather over the ranks that call this).
    Returns the same results and stats on every rank.
    """
    costs = prompt_costs(prompts, params.n, params.max_new_tokens if expected_response_len is None
                         else expected_response_len)
    names = [f"replica{r}" for r in range(num_replicas)]
    stats = DispatchStats(prompts_per_engine={n: 0 for n in names}, tokens_per_engine={n: 0 for n in names})
    results: list[list[Sample] | None] = [None] * len(prompts)
    assign = balance(costs, num_replicas)
    failed_on: dict[int, set[int]] = {}
    for attempt in range(max_retries + 1):
        mine = assign[replica] if engine is not None else []
        out: dict[int, list[Sample]] = {}
        err = None
        if mine:
            try:
                out = _split(engine.generate([prompts[i] for i in mine], params, [seeds[i] for i in mine]),
                             mine, params.n)
            except Exception as exc:  # noqa: BLE001 - reassigned to another replica below
                err = f"{names[replica]}: {type(exc).__name__}: {exc}"
                log.warning("rollout on %s failed (%s); its %d prompts go to other replicas", names[replica], exc,
                            len(mine))
        parts = exchange((replica if engine is not None else None, out, err, mine))
        for owner, got, e, asked in parts:
            if owner is None:
                continue
            if asked:
                stats.requests += 1
            if e is not None:
                stats.errors.append(e)
                for i in asked:
                    failed_on.setdefault(i, set()).add(owner)
                continue
            for i, s in got.items():
                results[i] = s
            stats.prompts_per_engine[names[owner]] += len(got)
            stats.tokens_per_engine[names[owner]] += sum(len(x.token_ids) for s in got.values() for x in s)
        todo = [i for i in range(len(prompts)) if results[i] is None]
        if not todo or attempt == max_retries:
            break
        stats.retries += len(todo)
        allowed = [[r for r in range(num_replicas) if r not in failed_on.get(i, ())] for i in range(len(prompts))]
        sub = balance([costs[i] for i in todo], num_replicas, [allowed[i] for i in todo])
        assign = [[todo[k] for k in b] for b in sub]
    stats.failed = [i for i in range(len(prompts)) if results[i] is None]
    if stats.failed:
        log.error("%d prompts have no rollouts after %d attempts; counted in rollout/failed_prompts",
                  len(stats.failed), max_retries + 1)
    return results, stats


class DispatchingEngine:
    """The single-engine `generate` over a dispatcher (eval, the self-annotator): `_dispatch`
    returns (samples per prompt or None, stats) for one call; a prompt that failed everywhere
    fails the call. Without per-prompt seeds they derive from `params.seed` and the prompt index.
    `stats` adds up every call's dispatch (`dispatch_metrics`)."""

    def __init__(self):
        self.weight_version = 0
        self.stats = DispatchStats()

    def _dispatch(self, prompts, params: SamplingParams, seeds: list[int]):
        raise NotImplementedError

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Sample]:
        from .base import prompt_seed

        if seeds is None:
            seeds = [prompt_seed(params.seed or 0, 0, i) for i in range(len(prompts))]
        results, stats = self._dispatch(prompts, params, list(seeds))
        self.stats.add(stats)
        if stats.failed:
            raise RuntimeError(f"{len(stats.failed)} of {len(prompts)} prompts failed on every engine: "
                               + "; ".join(stats.errors[-3:]))
        return [s for r in results for s in r]

    def dispatch_metrics(self) -> dict[str, float]:
        return self.stats.as_metrics()


class FleetEngine(DispatchingEngine):
    """An `EngineFleet` behind the single-engine `generate` (for eval and the self-annotator on
    remote servers)."""

    def __init__(self, fleet: EngineFleet):
        super().__init__()
        self.fleet = fleet

    def _dispatch(self, prompts, params, seeds):
        return self.fleet.generate(prompts, params, seeds)

    def shutdown(self) -> None:
        for e in self.fleet.engines:
            if hasattr(e, "shutdown"):
                e.shutdown()

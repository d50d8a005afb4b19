"""Asynchronous rollouts (`rollout.async.max_age` > 0, remote placement): the fleet generates,
scores and annotates the batches of later steps while the trainer trains the current one.

    trainer   | take k | train k        | sync w_k+1 | take k+1 | train k+1      | sync ...
    producer  | make k+1 (from w_k)     | (paused)   | make k+2 (from w_k+1)      |

**Who does what.** Global rank 0 runs a `RolloutProducer` thread that calls `make_batch(...,
local=True)`: HTTP requests to the servers, scoring and annotation on rank 0, no collective (the
trainer's collectives run on the main thread meanwhile). Every rank calls `AsyncRollouts.batch(k)`
at the start of step k: rank 0 takes the batch of step k and broadcasts it (gloo), as the
synchronous loop broadcasts its own.

**Staleness.** A batch's version is the oldest weight version of its samples (each sample
carries the version its request was sent with; the servers' versions are the trainer's step
counts, set at every sync). At step k the trainer holds version k; a batch is `k - version`
steps old. The producer may start the batch of step j once the trainer has taken the batch of
step j - max_age, so with `update_every=1` every batch is at most max_age old. One that is older
(the fleet was not updated, `update_every` > 1) is dropped, regenerated from the weights the
fleet then holds and counted in `async/dropped` (samples). At most max_age batches are ever
made ahead: memory stays flat over any number of steps.

**Weight updates** go through the servers' pause (`rollout.async.pause_mode`, see
`rollout/sglang/weight_group.py`): requests in flight wait during the broadcast and go on under
the new weights, their per-token log-probs still the engine's, so the importance weights of
`loss.tis_*` stay exact per token.

**Failures.** An exception in the producer (every server dead, a failed batch) is re-raised on
every rank by `batch`, naming the step; the loop then saves a checkpoint of the steps trained so
far and ends. **Resume**: a checkpoint keeps the data cursor of the oldest batch not yet trained
(`resume_state`), so the batches in flight at a kill are regenerated from the same prompts, and
their number is logged and reported as `async/regenerated_on_resume`.

Metrics (rank 0, per step): async/age_mean, async/age_max, async/dropped, async/trainer_idle_s
(waiting for the batch), async/fleet_idle_s (the producer waiting for permission to start),
async/pause_s (from the sync, `train/generation.py`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from ..types import TrainSample

__all__ = ["AsyncRollouts", "Batch", "RolloutProducer"]

log = logging.getLogger(__name__)


@dataclass
class Batch:
    step: int
    samples: list[TrainSample]
    metrics: dict
    version: int  # the oldest weight version among its samples
    cursor: int  # the data cursor before its prompts were drawn
    attempt: int = 0  # regenerations after a drop


class RolloutProducer:
    """Makes the batches of steps start..total-1 in a thread, at most `max_age` ahead of the
    trainer. make(step) -> (samples, metrics); cursor() -> the data cursor now."""

    def __init__(self, make: Callable[[int], tuple[list[TrainSample], dict]], *, start: int, total: int,
                 max_age: int, cursor: Callable[[], int], poll_s: float = 0.5):
        if max_age < 1:
            raise ValueError(f"a rollout producer needs max_age >= 1, got {max_age}")
        self.make, self.total, self.max_age, self.cursor = make, total, max_age, cursor
        self.poll_s = poll_s
        self._cv = threading.Condition()
        self._ready: dict[int, Batch] = {}
        self._redo: list[tuple[int, int]] = []  # (step, attempt)
        self._next = start
        self._taken = start - 1  # the step whose batch the trainer took last
        self._busy: tuple[int, int] | None = None  # (step, cursor) of the batch being made
        self._error: tuple[int, BaseException] | None = None
        self._stop = False
        self.fleet_idle_s = 0.0  # summed; `take` reports the part since its previous call
        self._idle_reported = 0.0
        self.timeline: list[tuple[str, int, float, float]] = []  # (what, step, t0, t1), for plots
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer thread

    def _job(self) -> tuple[int, int] | None:
        """Under the lock: the next (step, attempt) to make, waiting for permission; None at the end."""
        while not self._stop:
            if self._redo:
                return self._redo.pop(0)
            if self._next < self.total and self._next <= self._taken + self.max_age:
                self._next += 1
                return self._next - 1, 0
            if self._next >= self.total and self._taken >= self.total - 1:
                return None
            self._cv.wait(self.poll_s)
        return None

    def _run(self) -> None:
        while True:
            with self._cv:
                t0 = time.perf_counter()
                job = self._job()
                self.fleet_idle_s += time.perf_counter() - t0
                if job is None:
                    return
                step, attempt = job
                self._busy = (step, self.cursor())
            t0 = time.perf_counter()
            try:
                samples, metrics = self.make(step)
                if not samples:
                    raise RuntimeError("no rollouts: every prompt failed on every server (see the log)")
            except BaseException as exc:  # noqa: BLE001 - re-raised on every rank by `take`
                with self._cv:  # _busy stays: a checkpoint then resumes from this batch's prompts
                    self._error = (step, exc)
                    self._cv.notify_all()
                return
            t1 = time.perf_counter()
            with self._cv:
                cursor = self._busy[1]
                self._busy = None
                self._ready[step] = Batch(step, samples, metrics, min(s.weight_version for s in samples), cursor,
                                          attempt)
                self.timeline.append(("generate", step, t0, t1))
                self._cv.notify_all()

    # ------------------------------------------------------------------ trainer side

    def take(self, step: int, version: int) -> tuple[Batch, dict]:
        """The batch of `step` for a trainer at weight `version` (dropping and regenerating one
        older than max_age), and the async metrics. Raises RuntimeError if the producer failed."""
        t0 = time.perf_counter()
        dropped = 0
        with self._cv:
            self._taken = max(self._taken, step)  # the producer may now start step + max_age
            self._cv.notify_all()
            while True:
                while step not in self._ready:
                    if self._error is not None:
                        bad, exc = self._error
                        raise RuntimeError(f"the rollout producer failed on the batch of step {bad}: "
                                           f"{type(exc).__name__}: {exc}") from exc
                    if not self._thread.is_alive():
                        raise RuntimeError(f"the rollout producer stopped before the batch of step {step}")
                    self._cv.wait(self.poll_s)
                batch = self._ready.pop(step)
                age = version - batch.version
                if age <= self.max_age:
                    break
                if batch.attempt > 0:  # made after the trainer reached this step, and still too old
                    raise RuntimeError(f"the batch of step {step} was regenerated from weights v{batch.version}, "
                                       f"{age} steps behind the trainer (rollout.async.max_age={self.max_age}): "
                                       "the weight sync does not reach the servers")
                dropped += len(batch.samples)
                log.warning("step %d: dropped a batch of %d samples generated from weights v%d (%d steps old > "
                            "rollout.async.max_age=%d); regenerating it", step, len(batch.samples), batch.version,
                            age, self.max_age)
                self._redo.append((step, batch.attempt + 1))
                self._cv.notify_all()
            idle = self.fleet_idle_s - self._idle_reported
            self._idle_reported = self.fleet_idle_s
        t1 = time.perf_counter()
        self.timeline.append(("wait", step, t0, t1))
        ages = [version - s.weight_version for s in batch.samples]
        return batch, {"async/age_mean": sum(ages) / len(ages), "async/age_max": float(max(ages)),
                       "async/dropped": float(dropped), "async/trainer_idle_s": t1 - t0,
                       "async/fleet_idle_s": idle, "async/regenerations": float(batch.attempt)}

    def in_flight(self, fallback_cursor: int) -> tuple[list[int], int]:
        """(the steps whose batches are made or being made but not yet taken, the data cursor of
        the oldest of them): what a checkpoint keeps so that a resumed run regenerates them. The
        cursor is `fallback_cursor` when none is in flight."""
        with self._cv:
            busy = [self._busy] if self._busy is not None else []
            steps = sorted(list(self._ready) + [step for step, _ in busy])
            cursors = [b.cursor for b in self._ready.values()] + [cursor for _, cursor in busy]
        return steps, (min(cursors) if cursors else fallback_cursor)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop after the batch in progress (its requests are not cancelled; the thread is a daemon)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout_s)


class AsyncRollouts:
    """The loop's side of asynchronous rollouts, on every rank (rank 0 owns the producer)."""

    def __init__(self, run, start: int, total: int, make: Callable[[int], tuple[list[TrainSample], dict]]):
        a = run.cfg.rollout.async_
        self.run, self.max_age, self.update_every, self.total = run, a.max_age, a.update_every, total
        self.samples_per_batch = run.cfg.rollout.prompts_per_step * run.cfg.rollout.n
        self.producer = None
        self.regenerated_on_resume = 0.0
        if dist.get_rank() == 0:
            run.gen.pause_mode = a.pause_mode
            self.producer = RolloutProducer(make, start=start, total=total, max_age=a.max_age,
                                            cursor=lambda: run.cursor)

    def batch(self, step: int) -> tuple[list[TrainSample], dict]:
        """Every rank: the batch of `step` and its metrics (rank 0's), or RuntimeError on every
        rank when the producer failed."""
        payload = None
        if self.producer is not None:
            try:
                b, m = self.producer.take(step, version=step)
                payload = ("ok", b.samples, {**b.metrics, **m})
            except RuntimeError as exc:
                payload = ("error", str(exc), None)
        kind, a, b = self.run.gen.broadcast(payload)
        if kind == "error":
            raise RuntimeError(a)
        if self.regenerated_on_resume and b is not None:
            b["async/regenerated_on_resume"] = self.regenerated_on_resume
            self.regenerated_on_resume = 0.0
        return a, b

    def sync_due(self, step: int) -> bool:
        """Whether the fleet gets the weights after step `step`: every update_every steps and
        after the last one."""
        return (step + 1) % self.update_every == 0 or step + 1 == self.total

    def checkpoint_state(self) -> dict:
        """Rank 0: what the trainer state keeps so that a resume regenerates what was in flight."""
        if self.producer is None:
            return {}
        steps, cursor = self.producer.in_flight(self.run.cursor)
        return {"cursor": cursor, "async_in_flight_steps": steps,
                "async_in_flight_samples": len(steps) * self.samples_per_batch}

    def resumed(self, state: dict) -> None:
        """After `_resume`: report the batches that were in flight at the checkpoint."""
        steps = state.get("async_in_flight_steps") or []
        if steps and dist.get_rank() == 0:
            n = state.get("async_in_flight_samples", 0)
            log.warning("resuming at step %d: %d samples (the batches of steps %s) were in flight at the checkpoint "
                        "and are regenerated", state["next_step"], n, steps)
            self.regenerated_on_resume = float(n)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()

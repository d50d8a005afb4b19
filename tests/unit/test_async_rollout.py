"""The asynchronous producer (`train/async_rollout.py`) with a scripted `make`, the config keys of
`rollout.async`, sample versions from SGLang outputs, and the fleet's retry of aborted samples."""

from __future__ import annotations

import threading
import time

import pytest

from megatron_trace.config import load_config
from megatron_trace.config.load import ConfigError, dump_config
from megatron_trace.rollout import SamplingParams
from megatron_trace.rollout.base import Sample
from megatron_trace.rollout.dispatch import EngineFleet
from megatron_trace.rollout.sglang import parse_output
from megatron_trace.train.async_rollout import RolloutProducer
from megatron_trace.types import TrainSample

REMOTE = ["rollout.placement=remote", 'rollout.remote.urls=["http://127.0.0.1:1"]']


class _Fleet:
    """A fake fleet: `version` is what the servers hold; make(step) records when it ran."""

    def __init__(self, n=2, fail_at=None, gate=None):
        self.version = 0
        self.made: list[tuple[int, int]] = []  # (step, version) in order of generation
        self.cursor = 0
        self.n, self.fail_at, self.gate = n, fail_at, gate

    def make(self, step):
        if self.gate is not None:
            self.gate.wait(10)
        if step == self.fail_at:
            raise ConnectionError("every server is down")
        v = self.version
        self.made.append((step, v))
        self.cursor += 2
        return [TrainSample([1], [2], 0.0, [0], weight_version=v) for _ in range(self.n)], {"rollout/x": float(step)}


def _drive(fleet, total, max_age, update_every=1):
    """The trainer: take step k at version k of its own, then (maybe) push version k + 1."""
    p = RolloutProducer(fleet.make, start=0, total=total, max_age=max_age, cursor=lambda: fleet.cursor, poll_s=0.01)
    out = []
    try:
        for k in range(total):
            batch, m = p.take(k, version=k)
            # the producer never runs more than max_age batches ahead of the step being trained
            assert all(s <= k + max_age for s, _ in fleet.made)
            out.append((batch.version, m))
            time.sleep(0.02)  # "training"
            if (k + 1) % update_every == 0:
                fleet.version = k + 1
    finally:
        p.close()
    return out, p


def test_one_step_off_batches_are_one_version_behind():
    fleet = _Fleet()
    out, p = _drive(fleet, 5, max_age=1)
    assert [v for v, _ in out] == [0, 0, 1, 2, 3]
    assert [m["async/age_max"] for _, m in out] == [0, 1, 1, 1, 1]
    assert all(m["async/dropped"] == 0 for _, m in out)
    assert [s for s, _ in fleet.made] == [0, 1, 2, 3, 4]  # each batch once
    assert not p._thread.is_alive()
    assert {w for w, *_ in p.timeline} == {"generate", "wait"}


def test_stale_batches_are_dropped_counted_and_regenerated():
    fleet = _Fleet(n=3)
    out, _ = _drive(fleet, 4, max_age=1, update_every=2)
    assert [m["async/dropped"] for _, m in out] == [0, 0, 3, 0]
    assert [v for v, _ in out] == [0, 0, 2, 2]
    assert out[2][1]["async/regenerations"] == 1
    assert [s for s, _ in fleet.made].count(2) == 2


def test_a_fleet_that_never_gets_the_weights_fails_instead_of_dropping_forever():
    fleet = _Fleet()
    p = RolloutProducer(fleet.make, start=0, total=4, max_age=1, cursor=lambda: fleet.cursor, poll_s=0.01)
    try:
        p.take(0, version=0)
        p.take(1, version=1)
        with pytest.raises(RuntimeError, match="regenerated from weights v0, 2 steps behind .* does not reach"):
            p.take(2, version=2)  # the fleet is still at v0
    finally:
        p.close()


def test_larger_max_age_runs_further_ahead():
    fleet = _Fleet()
    out, _ = _drive(fleet, 5, max_age=2)
    assert max(m["async/age_max"] for _, m in out) == 2


def test_a_producer_failure_reaches_the_trainer_with_the_step():
    fleet = _Fleet(fail_at=1)
    p = RolloutProducer(fleet.make, start=0, total=3, max_age=1, cursor=lambda: fleet.cursor, poll_s=0.01)
    try:
        p.take(0, version=0)
        with pytest.raises(RuntimeError, match="batch of step 1: ConnectionError: every server is down"):
            p.take(1, version=1)
        # a checkpoint now resumes from the failed batch's prompts
        assert p.in_flight(99) == ([1], 2)
    finally:
        p.close()


def test_resume_cursor_is_that_of_the_oldest_batch_not_trained():
    gate = threading.Event()
    fleet = _Fleet(gate=gate)
    fleet.version = 3
    p = RolloutProducer(fleet.make, start=3, total=6, max_age=1, cursor=lambda: fleet.cursor, poll_s=0.01)
    try:
        deadline = time.monotonic() + 5
        while p.in_flight(99)[0] != [3] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.in_flight(99) == ([3], 0)  # being made
        gate.set()
        p.take(3, version=3)
        deadline = time.monotonic() + 5
        while 4 not in p._ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.in_flight(99) == ([4], 2)  # made, not taken
    finally:
        p.close()


def test_rollout_async_keys_validate_and_round_trip(tmp_path):
    cfg = load_config("configs/tiny_cpu.yaml", [*REMOTE, "rollout.async.max_age=2", "rollout.async.update_every=3",
                                                "rollout.async.pause_mode=in_place"])
    assert (cfg.rollout.async_.max_age, cfg.rollout.async_.update_every, cfg.rollout.async_.pause_mode) == \
        (2, 3, "in_place")
    text = dump_config(cfg)
    assert "async:" in text and "async_" not in text
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(str(tmp_path / "c.yaml")).rollout.async_ == cfg.rollout.async_
    assert load_config("configs/tiny_cpu.yaml").rollout.async_.max_age == 0  # synchronous by default
    with pytest.raises(ConfigError, match="'rollout.async.max_age': value 1 .*colocated engines share"):
        load_config("configs/tiny_cpu.yaml", ["rollout.async.max_age=1"])
    with pytest.raises(ConfigError, match="'rollout.async.update_every': value 2"):
        load_config("configs/tiny_cpu.yaml", [*REMOTE, "rollout.async.update_every=2"])
    with pytest.raises(ConfigError, match="'rollout.async.update_every': value 3 .*at most rollout.async.max_age \\+ 1 = 2"):
        load_config("configs/tiny_cpu.yaml", [*REMOTE, "rollout.async.max_age=1", "rollout.async.update_every=3"])
    with pytest.raises(ConfigError, match="weight_sync=none"):
        load_config("configs/tiny_cpu.yaml", [*REMOTE, "rollout.async.max_age=1", "rollout.remote.weight_sync=none"])
    with pytest.raises(ConfigError, match="'rollout.async.pause_mode': value 'later'"):
        load_config("configs/tiny_cpu.yaml", [*REMOTE, "rollout.async.pause_mode=later"])
    with pytest.raises(ConfigError, match="did you mean 'rollout.async.max_age'"):
        load_config("configs/tiny_cpu.yaml", [*REMOTE, "rollout.async.maxage=1"])
    with pytest.raises(ConfigError, match="needs train.mode=full"):
        load_config("configs/tiny_cpu.yaml", [*REMOTE, "rollout.async.max_age=1", "train.mode=rollout_only"])


def test_a_sample_keeps_the_older_of_sent_and_served_versions():
    out = {"output_ids": [4, 5], "meta_info": {"output_token_logprobs": [[-0.1, 4, None], [-0.2, 5, None]],
                                               "finish_reason": {"type": "length"}, "weight_version": "7"}}
    assert parse_output(out, 6).weight_version == 6  # sent at 6, finished under 7 after a pause
    assert parse_output(out, 9).weight_version == 7
    out["meta_info"]["weight_version"] = "default"
    assert parse_output(out, 3).weight_version == 3


class _Aborting:
    def __init__(self, aborts):
        self.aborts, self.calls = aborts, 0

    def generate(self, prompts, params, seeds):
        self.calls += 1
        reason = "abort" if self.calls <= self.aborts else "length"
        return [Sample([1, 2], [-0.5, -0.5], reason, 0) for _ in prompts for _ in range(params.n)]

    def health(self):
        return True


def test_aborted_samples_are_retried_not_trained():
    eng = _Aborting(aborts=1)
    res, stats = EngineFleet([eng], max_retries=2).generate([[1], [2]], SamplingParams(n=2), [1, 2])
    assert stats.retries == 1 and not stats.failed and eng.calls == 2
    assert all(s.finish_reason == "length" for r in res for s in r)
    eng = _Aborting(aborts=5)
    res, stats = EngineFleet([eng], max_retries=1).generate([[1]], SamplingParams(n=2), [1])
    assert stats.failed == [0] and "came back aborted" in stats.errors[0]

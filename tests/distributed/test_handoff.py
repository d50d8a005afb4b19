"""The colocated memory hand-off on every rank of a replica (`train/generation.py`), at TP=2 on two
gloo ranks: the engine owner (rank 0) and the rank whose GPU the engine's TP worker 1 shares.

`torch.cuda` is a recording test double (these ranks run on CPU); the engine is a recording
double whose release is slow. What must hold on a GPU node, and is checked here by the recorded
events and their clock times (CLOCK_MONOTONIC is shared by the processes of one machine):
- every rank empties its PyTorch cache before each wake, not only the owner;
- no rank gets past `sleep()` (where the loop reloads off-loaded state) before the owner's engine
  has released its memory;
- the owner resumes the engine only after every rank of the replica has emptied its cache.
"""

import pytest

from megatron_trace.parallel import run_on_ranks

pytestmark = pytest.mark.dist


class _Clock:
    def __init__(self):
        self.events = []

    def __call__(self, what):
        import time

        self.events.append((what, time.monotonic()))


class _Cuda:
    """The calls `Generation` makes on torch.cuda, recorded."""

    def __init__(self, clock):
        self.clock = clock
        self.calls = {"empty_cache": 0, "synchronize": 0, "mem_get_info": 0}

    def empty_cache(self):
        self.calls["empty_cache"] += 1
        self.clock("empty_cache")

    def synchronize(self, device=None):
        self.calls["synchronize"] += 1

    def mem_get_info(self, device=None):
        self.calls["mem_get_info"] += 1
        return (10 * 2**30, 80 * 2**30)


class _Engine:
    weight_version = 0

    def __init__(self, clock):
        self.clock = clock

    def sleep(self, tags=None):
        import time

        self.clock("engine.sleep.start")
        time.sleep(0.5)  # a release that takes a while: the other rank must wait for it
        self.clock("engine.sleep.end")

    def wake(self, tags=None):
        self.clock(f"engine.wake.{'+'.join(tags)}")

    def shutdown(self):
        pass


def _rank():
    import time

    import torch.distributed as dist

    from megatron_trace.parallel import initialize
    from megatron_trace.train.generation import Generation

    groups = initialize(tp=2, device="cpu")
    clock = _Clock()
    cuda = _Cuda(clock)
    owner = Generation.owns_engine("colocated", groups)
    gen = Generation("colocated", groups, engine=_Engine(clock) if owner else None, cuda=cuda,
                     wait_timeout_minutes=5)
    if not owner:
        time.sleep(0.2)  # reach the wake late: the owner must not resume before this rank emptied its cache
    dist.barrier()
    out = gen.sleep()
    clock("reload")  # where train_one_step reloads off-loaded optimizer state
    if not owner:
        time.sleep(0.5)
    gen.wake(["weights"])
    gen.wake(["kv_cache", "cuda_graph"])
    return {"rank": dist.get_rank(), "owner": owner, "events": clock.events, "cuda": cuda.calls, "metrics": out}


def test_handoff_waits_for_every_rank_of_the_replica():
    owner, other = run_on_ranks(_rank, 2, timeout_s=300)
    assert owner["owner"] and not other["owner"]
    t = {r["rank"]: dict(reversed(r["events"])) for r in (owner, other)}  # first occurrence of each event
    # every rank hands its cache back at each wake (the old code did it on the owner only)
    assert owner["cuda"]["empty_cache"] == other["cuda"]["empty_cache"] == 2
    assert other["cuda"]["mem_get_info"] == 0  # only the owner measures its engine
    # no rank reloads before the engine has released its memory
    assert t[1]["reload"] >= t[0]["engine.sleep.end"]
    assert t[0]["reload"] >= t[0]["engine.sleep.end"]
    # the owner resumes only once the other rank has emptied its cache (it arrives 0.5 s late)
    assert t[0]["engine.wake.weights"] >= t[1]["empty_cache"]
    order = [e for e, _ in owner["events"] if e.startswith("engine.")]
    assert order == ["engine.sleep.start", "engine.sleep.end", "engine.wake.weights", "engine.wake.kv_cache+cuda_graph"]
    assert "memory/engine_released_gb" in owner["metrics"] and other["metrics"] == {}

"""`rollout.verify_sync=true` with a colocated SGLang engine: the probe runs after the KV cache is
resumed (the old order probed right after `wake(["weights"])`, the engine refused to generate
while asleep, and the check always failed).

The engine is our real `SGLangEngine` wrapper around a double of `sglang.Engine` (0.5.6's method
names and answers, from `tests/sglang_fixture_server.FixtureState` on a CPU HF model) that, like
SGLang, cannot generate while any of its memory is released. Its calls are recorded.
"""

import dataclasses
import os
import sys

import pytest

from megatron_trace.parallel import run_on_ranks

pytestmark = pytest.mark.dist

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["rollout.max_new_tokens=8", "rollout.prompts_per_step=2", "rollout.n=2", "optim.optimizer=sgd",
             "optim.lr=0.05", "optim.micro_batch_size=4", "log.tensorboard=false", "log.progress=false",
             "eval.every=0", "checkpoint.every=1000", "rollout.verify_sync=true", "rollout.verify_sync_tol=1e-3"]


class _SGLangDouble:
    def __init__(self, state):
        self.state = state
        self.calls = []

    def generate(self, input_ids, sampling_params, return_logprob=False):
        self.calls.append("generate")
        return self.state.generate({"input_ids": input_ids, "sampling_params": sampling_params,
                                    "return_logprob": return_logprob})  # refuses while memory is released

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append("update_weights_from_tensor")
        self.state.engine.update_weights(named_tensors)
        return True, "Succeeded to update model weights."

    def flush_cache(self):
        self.calls.append("flush_cache")

    def release_memory_occupation(self, tags=None):
        self.calls.append(f"release {'+'.join(tags)}")
        self.state.memory({"tags": tags}, release=True)

    def resume_memory_occupation(self, tags=None):
        self.calls.append(f"resume {'+'.join(tags)}")
        self.state.memory({"tags": tags}, release=False)


def _rank(rundir, hf_dir):
    sys.path.insert(0, TESTS)
    from sglang_fixture_server import FixtureState

    from megatron_trace.config import load_config
    from megatron_trace.rollout.sglang import SGLangEngine
    from megatron_trace.train.loop import train
    from megatron_trace.train.setup_run import setup_run

    cfg = load_config("configs/tiny_cpu.yaml", [f"run.dir={rundir}", *OVERRIDES])
    run = setup_run(cfg)
    double = _SGLangDouble(FixtureState(hf_dir, "127.0.0.1"))
    engine = SGLangEngine(double)
    run.gen.engine.shutdown()
    run.gen.engine = run.engine = engine
    history = train(run, steps=1)
    run.close()
    return history, double.calls


def test_verify_sync_probes_after_the_kv_cache_is_back(tmp_path):
    from megatron_trace.models.hf_io import make_random_hf_model
    from megatron_trace.models.qwen3 import get_arch
    from megatron_trace.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = make_random_hf_model(dataclasses.replace(get_arch("tiny"), vocab_size=len(tok)), seed=7)
    model.save_pretrained(str(tmp_path / "engine"), safe_serialization=True)
    (history, calls), = run_on_ranks(_rank, 1, str(tmp_path / "run"), str(tmp_path / "engine"), timeout_s=300)
    m = history[0]
    assert m["sync/verify_max_abs_diff"] <= 1e-3  # the engine holds the actor's weights after the sync
    after_release = calls[calls.index("release weights+kv_cache+cuda_graph"):]
    assert after_release[:2] == ["release weights+kv_cache+cuda_graph", "resume weights"]
    resumed_kv = after_release.index("resume kv_cache+cuda_graph")
    assert "update_weights_from_tensor" in after_release[:resumed_kv] and "flush_cache" in after_release[:resumed_kv]
    assert "generate" not in after_release[:resumed_kv] and after_release[resumed_kv + 1:].count("generate") >= 1

"""The transformers rollout engine: seeds, n, stop handling, finish reasons, log-probs, weights, and
its batching: batch-size and engine-count invariance, auto batches, compaction, shared prefill."""

import copy
import dataclasses
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_trace.models.hf_io import make_random_hf_model
from megatron_trace.models.qwen3 import QWEN3_SIZES
from megatron_trace.rollout import HFEngine, RolloutEngine, SamplingParams, prompt_seed, sample_groups
from megatron_trace.rollout.dispatch import EngineFleet
from megatron_trace.rollout.hf import plan_batches
from megatron_trace.tasks.tokenizer import build_char_tokenizer

ARCH = QWEN3_SIZES["tiny"]
PROMPTS = [[5, 6, 7, 8], [9, 10]]


@pytest.fixture(scope="module")
def model():
    return make_random_hf_model(ARCH, seed=3)


@pytest.fixture
def engine(model):
    return HFEngine(model, eos_token_ids=[])


def _recomputed_logprobs(model, prompt, tokens, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].double()
    lp = torch.log_softmax(logits / (temperature or 1.0), -1)
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


def test_protocol_and_seeded_reproducibility(engine):
    assert isinstance(engine, RolloutEngine)
    p = SamplingParams(n=3, temperature=1.0, max_new_tokens=7, seed=11)
    a, b = engine.generate(PROMPTS, p), engine.generate(PROMPTS, p)
    assert len(a) == 6 and [s.token_ids for s in a] == [s.token_ids for s in b]
    assert len({tuple(s.token_ids) for s in a[:3]}) > 1  # the n samples of a prompt differ
    assert [s.token_ids for s in engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=7, seed=12))] != \
        [s.token_ids for s in a]
    assert all(len(s.token_ids) == 7 and s.finish_reason == "length" for s in a)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_logprobs_are_of_the_tempered_distribution(model, engine, temperature):
    samples = engine.generate(PROMPTS, SamplingParams(temperature=temperature, top_k=50, top_p=0.9,
                                                      max_new_tokens=6, seed=1))
    for prompt, s in zip(PROMPTS, samples):  # left padding must not change anything
        want = _recomputed_logprobs(model, prompt, s.token_ids, temperature)
        assert max(abs(x - y) for x, y in zip(want, s.logprobs)) <= 1e-4


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=5))
    k1 = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=5, seed=4))
    assert [s.token_ids for s in greedy] == [s.token_ids for s in k1]


def test_stop_token_ids_and_eos(model):
    free = HFEngine(model, eos_token_ids=[]).generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    stop_tok = free[0].token_ids[2]
    out = HFEngine(model, eos_token_ids=[]).generate(
        PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=(stop_tok,)))[0]
    first = free[0].token_ids.index(stop_tok)
    assert out.finish_reason == "stop" and out.token_ids == free[0].token_ids[: first + 1]
    eos = HFEngine(model, eos_token_ids=[stop_tok]).generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=6))[0]
    assert eos.token_ids == out.token_ids and eos.finish_reason == "stop"


def test_stop_strings_need_and_use_the_tokenizer(model):
    tok = build_char_tokenizer()
    small = make_random_hf_model(dataclasses.replace(ARCH, vocab_size=len(tok)), seed=2)
    eng = HFEngine(small, tok, eos_token_ids=[])
    prompt = tok("Answer:", add_special_tokens=False)["input_ids"]
    free = eng.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12))[0]
    text = tok.decode(free.token_ids)
    stop = text[3:5]
    out = eng.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert stop in tok.decode(out.token_ids) and stop not in tok.decode(out.token_ids[:-1])
    with pytest.raises(ValueError, match="tokenizer"):
        HFEngine(model).generate(PROMPTS, SamplingParams(stop=("x",)))


def test_group_sampler_and_truncation(engine):
    groups, stats = sample_groups(engine, PROMPTS, SamplingParams(n=2, max_new_tokens=3, seed=0),
                                  metas=[{"answer": "1"}, {"answer": "2"}])
    assert [g.prompt_ids for g in groups] == PROMPTS and all(len(g.samples) == 2 for g in groups)
    assert groups[1].meta == {"answer": "2"} and groups[0].num_truncated == 2
    assert stats["rollout/truncated_frac"] == 1.0 and stats["rollout/response_len_mean"] == 3


def test_update_weights_in_place(model):
    other = HFEngine(make_random_hf_model(ARCH, seed=77), eos_token_ids=[])
    probe = torch.tensor([PROMPTS[0]])
    assert not torch.allclose(other.probe_logits(probe), model(probe).logits.float())
    n = other.update_weights(model.state_dict().items(), version=5)
    assert n == len(dict(model.named_parameters())) and other.weight_version == 5
    assert torch.equal(other.probe_logits(probe), model(probe).logits.float().detach())
    with pytest.raises(KeyError, match="no parameter"):
        other.update_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        other.update_weights([("model.norm.weight", torch.zeros(3))])


def test_sleep_wake(engine):
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=1))
    engine.wake()
    assert len(engine.generate(PROMPTS, SamplingParams(max_new_tokens=1))) == 2


# ---------------------------------------------------------------------------- batching (issue 22)

def _rand_prompts(k, seed=0, lo=2, hi=12):
    rng = random.Random(seed)
    return [[rng.randrange(1, ARCH.vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(k)]


def _max_lp_gap(a, b):
    return max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s.logprobs, t.logprobs))


def test_samples_do_not_depend_on_batch_size_or_engine_count(model):
    """Per-row counter-based sampling: the same seeds give the same tokens, and log-probs within
    1e-6, in batches of 1, 7 or 64 prompts, auto batches, and spread over 1 or 2 engines."""
    prompts = _rand_prompts(64)
    seeds = [prompt_seed(99, 1, uid) for uid in range(64)]
    p = SamplingParams(n=2, temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=6)
    ref = HFEngine(model, eos_token_ids=[], batch_prompts=1).generate(prompts, p, seeds)
    runs = {k: HFEngine(model, eos_token_ids=[], batch_prompts=k).generate(prompts, p, seeds) for k in (7, 64, "auto")}
    for k, n_eng in (("auto", 1), (7, 2), ("auto", 2)):
        fleet = EngineFleet([HFEngine(copy.deepcopy(model), eos_token_ids=[], batch_prompts=k) for _ in range(n_eng)])
        groups, stats = fleet.generate(prompts, p, seeds)
        assert stats.failed == [] and (n_eng == 1 or len(stats.prompts_per_engine) == 2)
        runs[f"fleet{n_eng}x{k}"] = [s for g in groups for s in g]
    for name, got in runs.items():
        assert [s.token_ids for s in got] == [s.token_ids for s in ref], name
        assert _max_lp_gap(got, ref) <= 1e-6, name
    # and the seeds matter
    other = HFEngine(model, eos_token_ids=[]).generate(prompts, p, [s + 1 for s in seeds])
    assert [s.token_ids for s in other] != [s.token_ids for s in ref]


def _forward_batch_sizes(engine):
    """Record the batch size of every forward the engine runs (its model must be its own)."""
    sizes = []
    forward = engine.model.forward

    def spy(*args, **kwargs):
        if "input_ids" in kwargs:  # the engine's calls (a test's own recomputation passes it positionally)
            sizes.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    engine.model.forward = spy
    return sizes


def test_finished_rows_leave_the_batch_with_identical_outputs():
    m = make_random_hf_model(ARCH, seed=8)
    prompts = _rand_prompts(12, seed=3, lo=2, hi=20)  # uneven left padding, so compaction also trims columns
    seeds = [prompt_seed(5, 0, uid) for uid in range(12)]
    stops = tuple(range(1, 1000, 9))  # ~11% of the vocabulary ends a row: rows stop at many lengths
    p = SamplingParams(n=4, temperature=1.0, max_new_tokens=24, stop_token_ids=stops)
    compact = HFEngine(m, eos_token_ids=[])
    sizes = _forward_batch_sizes(compact)
    got = compact.generate(prompts, p, seeds)
    m2 = make_random_hf_model(ARCH, seed=8)
    keep = HFEngine(m2, eos_token_ids=[], compact=False)
    sizes_keep = _forward_batch_sizes(keep)
    want = keep.generate(prompts, p, seeds)
    assert [s.token_ids for s in got] == [s.token_ids for s in want]
    assert [s.finish_reason for s in got] == [s.finish_reason for s in want]
    assert _max_lp_gap(got, want) <= 1e-6
    reasons = {s.finish_reason for s in got}
    assert reasons == {"stop", "length"} and len({len(s.token_ids) for s in got}) > 5
    # prefill once per distinct prompt, then 48 rows; compaction shrinks the batch step by step
    assert sizes[0] == sizes_keep[0] == 12 and sizes[1] == sizes_keep[1] == 48
    assert set(sizes_keep[1:]) == {48} and sizes[-1] < 24 and sizes == sorted(sizes[:1]) + sorted(sizes[1:], reverse=True)
    for s in got:  # every row's log-probs still match a recomputation from scratch
        prompt = prompts[got.index(s) // 4]
        assert max(abs(x - y) for x, y in zip(_recomputed_logprobs(m, prompt, s.token_ids), s.logprobs)) <= 1e-4


def test_auto_batches_follow_the_token_budget(model):
    prompts = _rand_prompts(10, seed=4, lo=3, hi=15)
    p = SamplingParams(n=3, temperature=1.0, max_new_tokens=5, seed=2)
    eng = HFEngine(copy.deepcopy(model), eos_token_ids=[], max_batch_tokens=60)
    sizes = _forward_batch_sizes(eng)
    small = eng.generate(prompts, p)
    one = HFEngine(model, eos_token_ids=[]).generate(prompts, p)  # the default budget: one batch
    assert [s.token_ids for s in small] == [s.token_ids for s in one] and _max_lp_gap(small, one) <= 1e-6
    decode_rows = [b for i, b in enumerate(sizes) if i % 5 != 0]  # 5 forwards per batch, the first a prefill
    shortest = min(len(q) for q in prompts)
    assert len(sizes) > 5 and max(decode_rows) * (shortest + 5) <= 60  # rows x (prompt + response) within it


@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(1, 30), st.integers(1, 400))
@settings(max_examples=200, deadline=None)
def test_plan_batches_is_a_partition_within_budget(lengths, max_new, budget):
    batches = plan_batches(lengths, max_new, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * (longest + max_new) <= budget
    fixed = plan_batches(lengths, max_new, budget, rows_per_batch=3)
    assert [i for b in fixed for i in b] == list(range(len(lengths))) and all(len(b) <= 3 for b in fixed)


def test_legacy_loop_is_kept_for_the_benchmark_only(model):
    p = SamplingParams(n=2, temperature=0.0, max_new_tokens=5)
    old = HFEngine(model, eos_token_ids=[], batch_prompts=2, _legacy_sampler=True).generate(PROMPTS, p)
    new = HFEngine(model, eos_token_ids=[]).generate(PROMPTS, p)
    assert [s.token_ids for s in old] == [s.token_ids for s in new]  # greedy: the same model, the same tokens
    with pytest.raises(ValueError, match="integer batch_prompts"):
        HFEngine(model, _legacy_sampler=True)


@pytest.mark.parametrize("kwargs, needle", [({"batch_prompts": 0}, "rollout.hf_batch_prompts"),
                                            ({"batch_prompts": "many"}, "'many'"),
                                            ({"max_batch_tokens": 0}, "rollout.hf_max_batch_tokens")])
def test_bad_batch_settings_name_the_key(model, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        HFEngine(model, **kwargs)

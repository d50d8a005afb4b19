"""The transformers rollout engine: seeds, n, stop handling, finish reasons, log-probs, weights."""

import dataclasses

import pytest
import torch

from megatron_trace.models.hf_io import make_random_hf_model
from megatron_trace.models.qwen3 import QWEN3_SIZES
from megatron_trace.rollout import HFEngine, RolloutEngine, SamplingParams, sample_groups
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

"""Each routing variant routes exactly the tokens it should."""

import pytest
import torch

from megatron_trace.loss import ROUTE_VARIANTS, Route, build_routes

# Three rollouts: 0 correct (8 tokens), 1 incorrect (8 tokens), 2 correct without any span (4).
SEQ = torch.tensor([0] * 8 + [1] * 8 + [2] * 4)
CORRECT = torch.tensor([True, False, True])
KEY = torch.zeros(20, dtype=torch.bool)
KEY[[2, 3]] = True  # key span in rollout 0
KEY[[9]] = True  # a key mark on an incorrect rollout is ignored
ERR = torch.zeros(20, dtype=torch.bool)
ERR[[10, 11, 12]] = True  # error span in rollout 1
ERR[[5]] = True  # an error mark on a correct rollout is ignored
F, R, G = int(Route.FKL), int(Route.RKL), int(Route.GRPO)


def routes(variant, **kw):
    return build_routes(variant, CORRECT, KEY, ERR, SEQ, **kw).tolist()


def positions(r, route):
    return [i for i, x in enumerate(r) if x == route]


def test_grpo_routes_nothing():
    assert routes("grpo") == [G] * 20


def test_trace_variants():
    assert positions(routes("trace_fkl"), F) == [2, 3] and positions(routes("trace_fkl"), R) == []
    assert positions(routes("trace_rkl"), R) == [10, 11, 12] and positions(routes("trace_rkl"), F) == []
    both = routes("trace_both")
    assert positions(both, F) == [2, 3] and positions(both, R) == [10, 11, 12]
    assert routes("trace_fkl", action="rkl") == routes("trace_rkl")


def test_all_token_variants():
    assert routes("all_token_fkl") == [F] * 20
    assert routes("all_token_rkl") == [R] * 20


def test_random_mask_is_25_percent_of_eligible_rollouts_and_seeded():
    r = routes("random_mask", seed=3, step=5)
    f = positions(r, F)
    assert len([i for i in f if i < 8]) == 2 and len([i for i in f if i >= 16]) == 1  # round(0.25*|y|)
    assert positions(r, R) == [] and not any(8 <= i < 16 for i in f)  # incorrect rollout untouched
    assert r == routes("random_mask", seed=3, step=5)
    assert any(routes("random_mask", seed=3, step=s) != r for s in range(6, 12))
    # Depends on the rollout's uid, not its position in this micro-batch.
    uids = torch.tensor([40, 41, 42])
    a = build_routes("random_mask", CORRECT, KEY, ERR, SEQ, seed=1, rollout_uids=uids)
    sub = build_routes("random_mask", CORRECT[2:], KEY[16:], ERR[16:], SEQ[16:] - 2, seed=1, rollout_uids=uids[2:])
    assert torch.equal(a[16:], sub)


def test_inverted_mask_routes_non_span_tokens_capped():
    r = routes("inverted_mask", seed=0)
    f = positions(r, F)
    assert len(f) == 2 and all(i < 8 and i not in (2, 3) for i in f)  # rollout 0 only: has a span
    assert positions(r, R) == []  # rollout 2 has no span (failed annotation): plain GRPO


def test_unknown_variant():
    with pytest.raises(ValueError, match="loss.variant"):
        routes("trace_magic")
    assert set(ROUTE_VARIANTS) >= {"grpo", "trace_fkl", "trace_rkl", "trace_both", "all_token_fkl",
                                   "all_token_rkl", "random_mask", "inverted_mask"}

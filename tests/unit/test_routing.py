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


def test_random_mask_matches_each_rollouts_annotated_coverage_and_is_seeded():
    r = routes("random_mask", seed=3, step=5)
    f = positions(r, F)
    # Rollout 0 has a 2-token key span: 2 random tokens of it; rollout 2 has no span (annotation
    # failed): nothing, exactly like TRACE; the incorrect rollout is not FKL-eligible.
    assert len([i for i in f if i < 8]) == 2 and not [i for i in f if i >= 8]
    assert positions(r, R) == []
    assert r == routes("random_mask", seed=3, step=5)
    assert any(routes("random_mask", seed=3, step=s) != r for s in range(6, 12))
    # Depends on the rollout's uid, not its position in this micro-batch.
    uids = torch.tensor([40, 41, 42])
    sub = build_routes("random_mask", CORRECT[1:], KEY[8:], ERR[8:], SEQ[8:] - 1, seed=1, rollout_uids=uids[1:],
                       action="rkl")
    full = build_routes("random_mask", CORRECT, KEY, ERR, SEQ, seed=1, rollout_uids=uids, action="rkl")
    assert torch.equal(full[8:], sub)


def test_inverted_mask_routes_as_many_non_span_tokens():
    r = routes("inverted_mask", seed=0)
    f = positions(r, F)
    assert len(f) == 2 and all(i < 8 and i not in (2, 3) for i in f)  # rollout 0 only: has a span
    assert positions(r, R) == []  # rollout 2 has no span (failed annotation): plain GRPO


@pytest.mark.parametrize("variant", ["random_mask", "inverted_mask"])
def test_ablation_action_key_reaches_error_spans(variant):
    rkl = routes(variant, seed=2, action="rkl")
    assert positions(rkl, F) == [] and len(positions(rkl, R)) == 3  # the 3-token error span of rollout 1
    assert all(8 <= i < 16 for i in positions(rkl, R))
    if variant == "inverted_mask":
        assert not set(positions(rkl, R)) & {10, 11, 12}
    both = routes(variant, seed=2, action="both")
    assert len(positions(both, F)) == 2 and len(positions(both, R)) == 3


@pytest.mark.parametrize("variant", ["random_mask", "inverted_mask"])
@pytest.mark.parametrize("action", ["fkl", "rkl", "both"])
def test_ablation_masks_have_the_annotated_per_rollout_token_counts(variant, action):
    """Over many random batches: every rollout routes as many tokens as its own annotated span
    (inverted: as many as fit outside it), and none where the annotation left no span."""
    g = torch.Generator().manual_seed(7)
    for trial in range(40):
        lens = torch.randint(1, 30, (6,), generator=g)
        seq = torch.repeat_interleave(torch.arange(6), lens)
        correct = torch.rand(6, generator=g) < 0.5
        key = torch.rand(seq.numel(), generator=g) < 0.3
        err = torch.rand(seq.numel(), generator=g) < 0.3
        key[seq == 0] = False  # rollout 0: annotation failed
        err[seq == 0] = False
        ann = build_routes("trace_both" if action == "both" else f"trace_{action}", correct, key, err, seq)
        got = build_routes(variant, correct, key, err, seq, action=action, seed=trial, step=trial)
        for b in range(6):
            mine = seq == b
            want = int((ann[mine] != 0).sum())
            if variant == "inverted_mask":
                want = min(want, int(mine.sum()) - want)
                assert not ((got[mine] != 0) & (ann[mine] != 0)).any()
            assert int((got[mine] != 0).sum()) == want, (trial, b)
            assert set(got[mine].tolist()) - {0} <= set(ann[mine].tolist()) - {0}  # same route kind
        assert not (got[seq == 0] != 0).any()


def test_self_opd_baselines():
    """opsd: every token distilled (FKL), GRPO off there; srpo_like: every token of the incorrect
    rollout distilled (RKL), the correct ones left to GRPO; both against hand-built masks."""
    assert routes("opsd") == [F] * 20 and routes("opsd", action="rkl") == [R] * 20
    assert ROUTE_VARIANTS["opsd"].routed_grpo == "none" and ROUTE_VARIANTS["all_token_rkl"].routed_grpo == "full"
    assert routes("srpo_like") == [G] * 8 + [R] * 8 + [G] * 4
    assert routes("srpo_like", action="fkl") == [G] * 8 + [F] * 8 + [G] * 4
    assert ROUTE_VARIANTS["srpo_like"].routed_grpo == "none"
    with pytest.raises(ValueError, match="loss.action=both"):
        routes("srpo_like", action="both")
    for v in ("opsd", "srpo_like", "all_token_rkl"):
        assert not ROUTE_VARIANTS[v].uses_spans  # no annotator calls for the loss


def test_mask_coverage_fraction_hand_built():
    """loss.mask_coverage=0.25: round(0.25 |y|) tokens of every eligible rollout, spanned or not
    (random); from outside the span, only where there is one (inverted)."""
    r = routes("random_mask", seed=4, coverage=0.25)
    f = positions(r, F)
    assert len([i for i in f if i < 8]) == 2 and len([i for i in f if i >= 16]) == 1  # 0.25 x 8, 0.25 x 4
    assert not [i for i in f if 8 <= i < 16] and positions(r, R) == []  # incorrect: not FKL-eligible
    inv = routes("inverted_mask", seed=4, coverage=0.25)
    assert positions(inv, F) and all(i < 8 and i not in (2, 3) for i in positions(inv, F))
    assert len(positions(inv, F)) == 2  # rollout 2 has no span: nothing marks its "non-key" tokens
    rkl = routes("inverted_mask", seed=4, coverage=0.5, action="rkl")
    assert len(positions(rkl, R)) == 4 and all(8 <= i < 16 and i not in (10, 11, 12) for i in positions(rkl, R))
    big = routes("inverted_mask", seed=4, coverage=1.0, action="rkl")  # capped by what lies outside
    assert positions(big, R) == [8, 9, 13, 14, 15]
    assert routes("random_mask", seed=4, coverage=None) == routes("random_mask", seed=4)
    with pytest.raises(ValueError, match="mask_coverage"):
        routes("random_mask", coverage=1.5)


def test_unknown_variant():
    with pytest.raises(ValueError, match="loss.variant"):
        routes("trace_magic")
    assert set(ROUTE_VARIANTS) >= {"grpo", "trace_fkl", "trace_rkl", "trace_both", "all_token_fkl",
                                   "all_token_rkl", "random_mask", "inverted_mask", "opsd", "srpo_like"}

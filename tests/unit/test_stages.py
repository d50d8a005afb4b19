"""Annotation, routes and teacher inputs per variant (train/stages.build_train_samples): the
ablations are annotated like TRACE, and the key-token lift gets its spans for every variant."""

import pytest

from megatron_trace.annotate import Annotation
from megatron_trace.loss import Route
from megatron_trace.rollout import RolloutGroup
from megatron_trace.rollout.base import Sample
from megatron_trace.tasks.tokenizer import build_char_tokenizer
from megatron_trace.train.stages import ScoredGroup, build_train_samples

TOK = build_char_tokenizer()
# Four lines each: one line is about a quarter of the response, under the 0.4 cap below.
TEXTS = ["a=1+2\nb=3*4\nc=a+b\nans 15", "a=2+2\nb=4*4\nc=a+b\nans 20", "x=5-1\ny=x*2\nz=y+1\nans 9",
         "x=5-2\ny=x*3\nz=y+0\nans 9"]


class Recording:
    """Marks segment 1 (a key span if correct, an error span if not), except on `fail_on`."""

    name = "recording"

    def __init__(self, fail_on=()):
        self.seen, self.fail_on = [], set(fail_on)

    def annotate(self, requests):
        out = []
        for r in requests:
            self.seen.append(r.response)
            if r.response in self.fail_on:
                out.append(Annotation.failed("invalid_json"))
            else:
                out.append(Annotation((1,), "key_step" if r.correct else "sign_error"))
        return out


def scored(rewards=(1.0, 0.0, 1.0, 1.0)):
    ids = [TOK(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    group = RolloutGroup(0, TOK("q: 1+2", add_special_tokens=False)["input_ids"],
                         [Sample(i, [-1.0] * len(i), "stop", 0) for i in ids],
                         {"problem": "1+2", "answer": "3", "solution": "a=1+2"})
    mean = sum(rewards) / len(rewards)
    return [ScoredGroup(group, list(TEXTS), list(rewards), [r - mean for r in rewards])]


def build(variant, lam=0.5, annotator=None, **kw):
    return build_train_samples(scored(), TOK, variant=variant, annotator=annotator or Recording(), lam=lam,
                               coverage_cap=0.4, segment_mode="line", max_segment_chars=300, seed=0, step=3,
                               prompt_kind="arith", **kw)


def routed(s, route):
    return sum(r == route for r in s.routes)


@pytest.mark.parametrize("variant", ["random_mask", "inverted_mask"])
def test_ablations_are_annotated_like_trace_with_matched_coverage(variant):
    ann_t, ann_a = Recording(fail_on={TEXTS[3]}), Recording(fail_on={TEXTS[3]})
    trace, _ = build("trace_fkl", annotator=ann_t)
    ablation, m = build(variant, annotator=ann_a)
    assert ann_a.seen == ann_t.seen == TEXTS  # every rollout goes to the annotator, as for TRACE
    assert m["annotate/ok"] == 3 and m["annotate/invalid_json"] == 1
    for t, a in zip(trace, ablation):
        assert routed(a, Route.FKL) == routed(t, Route.FKL)  # per rollout, the annotated token count
        assert routed(a, Route.RKL) == 0
        if any(a.routes):  # the teacher keeps the annotator's diagnostic
            assert "key_step" in TOK.decode(a.teacher_ids[:a.teacher_prompt_len])
    assert routed(ablation[0], Route.FKL) > 0 and not any(ablation[3].routes)  # annotation failed: nothing
    if variant == "inverted_mask":
        assert not {i for i, r in enumerate(ablation[0].routes) if r} & {i for i, r in enumerate(trace[0].routes) if r}


def test_action_key_routes_error_spans_in_the_ablation():
    samples, _ = build("random_mask", action="rkl")
    trace, _ = build("trace_rkl")
    assert [routed(s, Route.RKL) for s in samples] == [routed(s, Route.RKL) for s in trace]
    assert routed(samples[1], Route.RKL) > 0 and all(routed(s, Route.FKL) == 0 for s in samples)
    assert "sign_error" in TOK.decode(samples[1].teacher_ids[:samples[1].teacher_prompt_len])


def test_trace_lift_uses_the_loss_annotation():
    ann = Recording()
    samples, m = build("trace_fkl", annotator=ann, lift_rollouts=2)
    lifted = [s for s in samples if s.key_positions]
    assert [s.uid for s in lifted] == [0, 2] and m["lift/rollouts"] == 2  # the first 2 correct ones with spans
    assert all(s.key_positions == s.routed_positions for s in lifted)
    assert len(ann.seen) == 4


@pytest.mark.parametrize("variant, lam", [("grpo", 0.0), ("all_token_fkl", 0.5), ("trace_fkl", 0.0)])
def test_lift_spans_where_the_loss_does_not_annotate(variant, lam):
    ann = Recording()
    samples, m = build(variant, lam=lam, annotator=ann, lift_rollouts=1)
    assert ann.seen == [] and not any(s.key_positions for s in samples) and m["lift/rollouts"] == 0
    samples, m = build(variant, lam=lam, annotator=ann, lift_rollouts=1, lift_annotate=True)
    assert ann.seen == [TEXTS[0], TEXTS[2]]  # 2 x lift_rollouts correct rollouts, nothing else
    lifted = [s for s in samples if s.key_positions]
    assert len(lifted) == 1 and lifted[0].uid == 0 and lifted[0].teacher_ids is not None
    assert m["lift/rollouts"] == 1 and m["annotate/ok"] == 2
    if variant != "all_token_fkl":
        assert not any(any(s.routes) for s in samples)  # the loss is untouched

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
    assert len(lifted) == 2 and m["lift/rollouts"] == 2
    assert {s.uid for s in lifted} <= {0, 2, 3}  # correct rollouts with spans
    assert all(s.key_positions == s.routed_positions for s in lifted)
    assert len(ann.seen) == 4


@pytest.mark.parametrize("variant, lam", [("grpo", 0.0), ("all_token_fkl", 0.5), ("trace_fkl", 0.0)])
def test_lift_spans_where_the_loss_does_not_annotate(variant, lam):
    ann = Recording()
    samples, m = build(variant, lam=lam, annotator=ann, lift_rollouts=1)
    assert ann.seen == [] and not any(s.key_positions for s in samples) and m["lift/rollouts"] == 0
    samples, m = build(variant, lam=lam, annotator=ann, lift_rollouts=1, lift_annotate=True)
    assert len(ann.seen) == 2 and set(ann.seen) <= {TEXTS[0], TEXTS[2], TEXTS[3]}  # 2 x lift_rollouts correct ones
    lifted = [s for s in samples if s.key_positions]
    assert len(lifted) == 1 and TEXTS[lifted[0].uid] in ann.seen and lifted[0].teacher_ids is not None
    assert m["lift/rollouts"] == 1 and m["annotate/ok"] == 2
    if variant != "all_token_fkl":
        assert not any(any(s.routes) for s in samples)  # the loss is untouched


def many_groups(n_groups=5, per=4):
    """n_groups prompts, every rollout correct except the last of each group."""
    out = []
    for g in range(n_groups):
        texts = [t.replace("1", str(g)) for t in TEXTS[:per]]
        ids = [TOK(t, add_special_tokens=False)["input_ids"] for t in texts]
        group = RolloutGroup(g, TOK(f"q: {g}+2", add_special_tokens=False)["input_ids"],
                             [Sample(i, [-1.0] * len(i), "stop", 0) for i in ids],
                             {"problem": f"{g}+2", "answer": "3", "solution": f"a={g}+2"})
        rewards = [1.0] * (per - 1) + [0.0]
        out.append(ScoredGroup(group, texts, rewards, [r - 0.75 for r in rewards]))
    return out


def build_many(variant, step=3, lam=0.5, **kw):
    return build_train_samples(many_groups(), TOK, variant=variant, annotator=Recording(), lam=lam,
                               coverage_cap=0.4, segment_mode="line", max_segment_chars=300, seed=0, step=step,
                               prompt_kind="arith", **kw)


@pytest.mark.parametrize("variant, lam, annotate", [("trace_fkl", 0.5, False), ("grpo", 0.5, True)])
def test_lifted_rollouts_are_spread_across_prompts_and_seeded(variant, lam, annotate):
    def lifted(step):
        samples, _ = build_many(variant, step=step, lam=lam, lift_rollouts=4, lift_annotate=annotate)
        return [s.uid for s in samples if s.key_positions]

    uids = lifted(3)
    assert len(uids) == 4 and len({u // 4 for u in uids}) == 4  # four different prompts
    assert all(u % 4 != 3 for u in uids)  # correct rollouts only
    assert lifted(3) == uids and any(lifted(s) != uids for s in range(4, 10))


@pytest.mark.parametrize("variant", ["all_token_fkl", "all_token_rkl", "opsd", "srpo_like", "grpo"])
def test_annotation_for_the_metric_never_enters_a_loss_input(variant):
    """train.lift_annotate changes only key_positions (and the teacher input of rollouts whose
    loss has no teacher): routes, and every teacher prompt the loss reads, are the same."""
    off, _ = build_many(variant, lift_rollouts=2)
    on, m = build_many(variant, lift_rollouts=2, lift_annotate=True)
    assert m["lift/rollouts"] == 2 and sum(bool(s.key_positions) for s in on) == 2
    for a, b in zip(off, on):
        assert a.routes == b.routes
        if any(a.routes):  # the loss distils this rollout: its teacher must not change
            assert a.teacher_ids == b.teacher_ids and a.teacher_prompt_len == b.teacher_prompt_len
            assert "Key steps" not in TOK.decode(b.teacher_ids[:b.teacher_prompt_len])
        elif b.key_positions:  # the metric's own teacher (no loss teacher here) may show the type
            assert "Key steps: key_step" in TOK.decode(b.teacher_ids[:b.teacher_prompt_len])
        else:
            assert a.teacher_ids is None and b.teacher_ids is None


def test_teacher_context_changes_the_teacher_and_never_the_annotator():
    """teacher.context decides what the privileged prompt shows; the annotator's requests (which
    carry the reference solution) are the same under every context."""
    prompts, seen = {}, {}
    for context in ("solution_and_type", "type_only", "answer_and_type", "solution"):
        ann = Recording()
        samples, _ = build("trace_fkl", annotator=ann, teacher_context=context)
        s = samples[0]
        prompts[context] = TOK.decode(s.teacher_ids[:s.teacher_prompt_len])
        seen[context] = ann.seen
    assert len({tuple(v) for v in seen.values()}) == 1
    p = prompts
    assert "Reference:\na=1+2" in p["solution_and_type"] and "Key steps: key_step" in p["solution_and_type"]
    assert "Reference" not in p["type_only"] and "Answer" not in p["type_only"] and "key_step" in p["type_only"]
    assert "Answer: 3" in p["answer_and_type"] and "Reference" not in p["answer_and_type"]
    assert "key_step" in p["answer_and_type"]
    assert "Reference:\na=1+2" in p["solution"] and "key_step" not in p["solution"]
    for prompt in p.values():  # never the span text (the annotated line "b=3*4")
        assert "b=3*4" not in prompt


def test_teacher_thinking_is_its_own_switch():
    def teacher_prompt(**kw):
        samples, _ = build_train_samples(scored(), TOK, variant="trace_fkl", annotator=Recording(), lam=0.5,
                                         coverage_cap=0.4, segment_mode="line", max_segment_chars=300, seed=0,
                                         step=3, prompt_kind="math", **kw)
        return TOK.decode(samples[0].teacher_ids[:samples[0].teacher_prompt_len])

    nothink = "<think>\n\n</think>"
    assert nothink in teacher_prompt(thinking=False)
    assert nothink not in teacher_prompt(thinking=False, teacher_thinking=True)  # student NoThink, teacher Think
    assert nothink in teacher_prompt(thinking=True, teacher_thinking=False)
    assert nothink not in teacher_prompt(thinking=True)


def test_mask_coverage_fraction_routes_a_quarter_of_every_eligible_rollout():
    samples, _ = build_many("random_mask", mask_coverage=0.25)
    for s in samples:
        n = len(s.response_ids)
        want = max(1, round(0.25 * n)) if s.uid % 4 != 3 else 0  # FKL: correct rollouts only
        assert sum(r == Route.FKL for r in s.routes) == want

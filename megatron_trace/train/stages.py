"""The stages of a step between rollout and the train step: reward, advantages, annotation,
routes, teacher inputs. Pure Python/torch on the rank that owns the data; no Megatron.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..annotate import AnnotationRequest, FailureCounter, annotation_to_mask, segment_text
from ..loss import ROUTE_VARIANTS, Route, build_routes
from ..rollout import RolloutGroup
from ..teacher import build_teacher_input
from ..types import TrainSample

__all__ = ["ScoredGroup", "build_train_samples", "group_advantages", "response_offsets", "score_groups",
           "spread_order"]


@dataclass
class ScoredGroup:
    group: RolloutGroup
    texts: list[str]  # decoded responses
    rewards: list[float]  # 0/1 per sample
    advantages: list[float]


def group_advantages(rewards: Sequence[float], use_std: bool = True, eps: float = 1e-6) -> list[float]:
    """(r - mean) / (std + eps) within a group; Dr. GRPO (`use_std=False`) drops the std."""
    n = len(rewards)
    mean = sum(rewards) / n
    if not use_std:
        return [r - mean for r in rewards]
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(n - 1, 1))
    return [(r - mean) / (std + eps) for r in rewards]


def score_groups(groups: list[RolloutGroup], tokenizer, verify, use_std: bool = True) -> list[ScoredGroup]:
    """verify(list of (response text, gold answer)) -> list of 'correct' | other results."""
    texts = [[tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in g.samples] for g in groups]
    flat = [(t, g.meta["answer"]) for g, ts in zip(groups, texts) for t in ts]
    results = verify(flat)
    out, k = [], 0
    for g, ts in zip(groups, texts):
        rewards = [1.0 if results[k + j] == "correct" else 0.0 for j in range(len(ts))]
        k += len(ts)
        out.append(ScoredGroup(g, ts, rewards, group_advantages(rewards, use_std)))
    return out


def response_offsets(tokenizer, token_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character range of each response token in the decoded text (works for any tokenizer)."""
    offs, prev = [], 0
    for i in range(len(token_ids)):
        end = len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True))
        offs.append((prev, max(prev, end)))
        prev = max(prev, end)
    return offs


def spread_order(scored: list[ScoredGroup], seed: int, step: int, keep=None) -> list[int]:
    """The flat indices of the rollouts `keep(index)` accepts (all by default), spread across
    prompts: the prompts in a seeded order, then one kept rollout of each in turn (each prompt's
    own in a seeded order too). The first few therefore come from as many prompts as have one,
    not from the first one or two."""
    rng = random.Random(f"lift-{seed}-{step}")
    starts = [0]
    for sg in scored:
        starts.append(starts[-1] + len(sg.group.samples))
    order = list(range(len(scored)))
    rng.shuffle(order)
    queues = []
    for g in order:
        n = len(scored[g].group.samples)
        queues.append([starts[g] + j for j in rng.sample(range(n), n) if keep is None or keep(starts[g] + j)])
    return [q[r] for r in range(max((len(q) for q in queues), default=0)) for q in queues if r < len(q)]


def build_train_samples(scored: list[ScoredGroup], tokenizer, *, variant: str, annotator, lam: float,
                        coverage_cap: float, segment_mode: str, max_segment_chars: int, seed: int, step: int,
                        uid_offset: int = 0, thinking: bool = False, prompt_kind: str = "math",
                        action: str | None = None, lift_rollouts: int = 0,
                        lift_annotate: bool = False, answer_only_teacher: bool = False,
                        teacher_context: str = "solution_and_type", teacher_thinking: bool | None = None,
                        mask_coverage: float | None = None) -> tuple[list[TrainSample], dict[str, float]]:
    """Annotate, build routes and teacher inputs; returns samples + metrics.

    The annotator sees every rollout while lambda > 0 for the variants whose masks come from
    spans: TRACE, and the random/inverted ablations (so their teacher keeps the diagnostic and
    their masks keep each rollout's annotated coverage, or `mask_coverage` of its tokens).
    action: `loss.action` (null = the variant's).

    Key-token lift: `lift_rollouts` correct rollouts with key spans, spread across prompts
    (`spread_order`, seeded), carry `TrainSample.key_positions` and a teacher input. Where the
    loss does not annotate (GRPO, the all-token variants, any step at lambda = 0),
    `lift_annotate` annotates 2 x lift_rollouts correct rollouts, in the same order, for the
    metric alone; without it there is no lift. Annotation made for the metric never enters a
    loss input: a rollout the loss distils keeps the teacher prompt the loss would give it (no
    diagnostic type), and routes never read the metric's spans.

    teacher_context (`teacher.context`) and teacher_thinking (`teacher.thinking`, None = the
    student's `thinking`) shape the teacher prompt (teacher/context.py); the annotator's
    requests do not depend on them. answer_only_teacher (`data.answer_only_teacher`): the gold
    answer where a row has no solution. The gold answer is passed for answer_and_type too.
    """
    flat = [(sg, j) for sg in scored for j in range(len(sg.group.samples))]
    counter = FailureCounter()
    key_masks: list[list[bool]] = [[False] * len(sg.group.samples[j].token_ids) for sg, j in flat]
    err_masks = [list(m) for m in key_masks]
    diagnostics: list[str | None] = [None] * len(flat)
    # Only variants whose masks come from annotated spans pay for the annotator.
    loss_annotates = lam > 0 and ROUTE_VARIANTS[variant].uses_spans
    def is_correct(i: int) -> bool:
        return flat[i][0].rewards[flat[i][1]] > 0

    correct_order = spread_order(scored, seed, step, is_correct) if lift_rollouts else []
    if loss_annotates:
        todo = list(range(len(flat)))
    elif lift_rollouts and lift_annotate:
        todo = sorted(correct_order[:2 * lift_rollouts])
    else:
        todo = []
    t_ann = _annotate(flat, todo, annotator, tokenizer, (key_masks, err_masks, diagnostics), counter,
                      coverage_cap=coverage_cap, segment_mode=segment_mode, max_segment_chars=max_segment_chars)
    lift = set(spread_order(scored, seed, step, lambda i: is_correct(i) and any(key_masks[i]))[:lift_rollouts]
               if lift_rollouts else [])
    show_answer = answer_only_teacher or teacher_context == "answer_and_type"
    samples = []
    for i, (sg, j) in enumerate(flat):
        s = sg.group.samples[j]
        n = len(s.token_ids)
        correct = torch.tensor([sg.rewards[j] > 0])
        # The loss reads spans only when it annotated them itself.
        key, err = (key_masks[i], err_masks[i]) if loss_annotates else ([False] * n, [False] * n)
        routes = build_routes(variant, correct, torch.tensor(key, dtype=torch.bool),
                              torch.tensor(err, dtype=torch.bool), torch.zeros(n, dtype=torch.long),
                              action=action, seed=seed, step=step, coverage=mask_coverage,
                              rollout_uids=torch.tensor([uid_offset + i])).tolist() if lam > 0 else [0] * n
        distilled = any(r != Route.GRPO for r in routes)
        teacher_ids, p_len = None, 0
        if i in lift or distilled:
            # A rollout the loss distils sees the diagnostic only if the loss annotated it.
            diagnostic = diagnostics[i] if loss_annotates or not distilled else None
            t = build_teacher_input(tokenizer, sg.group.meta["problem"], sg.group.meta.get("solution"), diagnostic,
                                    sg.rewards[j] > 0, s.token_ids,
                                    thinking=thinking if teacher_thinking is None else teacher_thinking,
                                    kind=prompt_kind, answer=sg.group.meta.get("answer") if show_answer else None,
                                    context=teacher_context)
            teacher_ids, p_len = t.input_ids, t.prompt_len
        keys = [t for t, k in enumerate(key_masks[i]) if k] if i in lift else None
        samples.append(TrainSample(list(sg.group.prompt_ids), list(s.token_ids), sg.advantages[j], routes,
                                   list(s.logprobs), teacher_ids, p_len, uid_offset + i, keys,
                                   weight_version=s.weight_version))
    metrics = {**_batch_metrics(scored, samples), "time/annotate": t_ann,
               **(counter.as_metrics() if todo else {}),
               **({"lift/rollouts": float(len(lift))} if lift_rollouts else {})}
    return samples, metrics


def _annotate(flat, todo: list[int], annotator, tokenizer, out: tuple[list, list, list], counter: FailureCounter, *,
              coverage_cap: float, segment_mode: str, max_segment_chars: int) -> float:
    """Annotates the rollouts `todo` (indices into `flat`) in one call and writes each one's token
    mask into the key or error masks and its diagnostic type (`out`); returns the seconds taken."""
    if not todo:
        return 0.0
    key_masks, err_masks, diagnostics = out
    requests = []
    for sg, j in (flat[i] for i in todo):
        text = sg.texts[j]
        requests.append(AnnotationRequest(sg.group.meta["problem"], sg.group.meta.get("solution"),
                                          sg.rewards[j] > 0, text,
                                          tuple(segment_text(text, segment_mode, max_segment_chars))))
    t0 = time.perf_counter()
    anns = annotator.annotate(requests)
    seconds = time.perf_counter() - t0
    final = []
    for i, req, ann in zip(todo, requests, anns):
        sg, j = flat[i]
        mask, ann = annotation_to_mask(ann, req, response_offsets(tokenizer, sg.group.samples[j].token_ids),
                                       coverage_cap)
        final.append(ann)
        (key_masks if req.correct else err_masks)[i] = mask
        diagnostics[i] = ann.diagnostic
    counter.add(final)
    return seconds


def _batch_metrics(scored: list[ScoredGroup], samples: list[TrainSample]) -> dict[str, float]:
    rewards = [r for sg in scored for r in sg.rewards]
    lens = [len(s.response_ids) for s in samples]
    correct_lens = [n for n, r in zip(lens, rewards) if r > 0]
    wrong_lens = [n for n, r in zip(lens, rewards) if r == 0]
    return {
        "reward/mean": sum(rewards) / len(rewards),
        "reward/accuracy": sum(r > 0 for r in rewards) / len(rewards),
        "reward/zero_variance_groups": sum(len(set(sg.rewards)) == 1 for sg in scored) / len(scored),
        "length/all": sum(lens) / len(lens),
        "length/correct": sum(correct_lens) / len(correct_lens) if correct_lens else float("nan"),
        "length/incorrect": sum(wrong_lens) / len(wrong_lens) if wrong_lens else float("nan"),
    }

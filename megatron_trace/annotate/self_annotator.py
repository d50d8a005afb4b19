"""Online self-annotation: the current policy answers the annotation prompt through the rollout engine.

Built against the rollout-engine protocol (DESIGN section 5): `engine.generate(prompts, params)`
takes a list of prompt token-id lists and returns, per prompt, an object with `token_ids`. It
becomes runnable end to end once the rollout engines land; replies go through the same strict
parser as the API annotator, so every failure is typed and counted, never raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Annotation, AnnotationRequest, build_messages, parse_reply

__all__ = ["SelfAnnotator"]


class SelfAnnotator:
    name = "self"

    def __init__(self, engine: Any, tokenizer: Any, sampling_params: Any, coverage_cap: float = 0.25):
        self.engine, self.tokenizer, self.params, self.coverage_cap = engine, tokenizer, sampling_params, coverage_cap

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        out: list[Annotation | None] = [None] * len(requests)
        prompts, slots = [], []
        for i, req in enumerate(requests):
            if not req.segments:
                out[i] = Annotation.failed("no_segments")
                continue
            ids = self.tokenizer.apply_chat_template(build_messages(req, self.coverage_cap), tokenize=True,
                                                     add_generation_prompt=True, enable_thinking=False)
            prompts.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
            slots.append(i)
        if prompts:
            try:
                samples = self.engine.generate(prompts, self.params)
            except Exception:  # noqa: BLE001 - an engine failure must not stop training
                samples = [None] * len(prompts)
            for i, sample in zip(slots, samples):
                try:
                    text = self.tokenizer.decode(sample.token_ids, skip_special_tokens=True)
                    out[i] = parse_reply(text, requests[i])
                except Exception:  # noqa: BLE001
                    out[i] = Annotation.failed("error")
        return out  # type: ignore[return-value]

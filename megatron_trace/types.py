"""Records passed between the stages of a step (see DESIGN section 3)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainSample"]


@dataclass
class TrainSample:
    """One rollout, ready for the train step.

    Shapes: P prompt tokens, L response tokens, R routed tokens (routes != 0).
    """

    prompt_ids: list[int]  # [P]
    response_ids: list[int]  # [L]
    advantage: float  # the rollout's group-normalised advantage
    routes: list[int]  # [L] loss.Route per response token
    rollout_logprobs: list[float] | None = None  # [L] from the engine (mismatch metrics / TIS)
    teacher_ids: list[int] | None = None  # privileged prompt + the same response tokens, when R > 0
    teacher_prompt_len: int = 0  # P' of teacher_ids
    uid: int = 0  # global rollout index (seeds, replay)
    # Annotated key-span positions of a correct rollout chosen for the key-token lift metric
    # (whatever the loss does with them); needs teacher_ids. None = not measured.
    key_positions: list[int] | None = None
    weight_version: int = 0  # the engine's weights it was generated with (its oldest tokens')

    def __post_init__(self) -> None:
        if len(self.routes) != len(self.response_ids):
            raise ValueError(f"routes has {len(self.routes)} entries for {len(self.response_ids)} response tokens")
        if (any(self.routes) or self.key_positions) and self.teacher_ids is None:
            raise ValueError("a sample with routed tokens or key_positions needs teacher_ids")
        if not self.prompt_ids or not self.response_ids:
            raise ValueError("prompt and response must both be non-empty")

    @property
    def routed_positions(self) -> list[int]:
        return [i for i, r in enumerate(self.routes) if r]

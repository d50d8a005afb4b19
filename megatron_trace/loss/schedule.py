"""The KL weight schedule lambda_k and the cumulative exposure it implies.

kind: anneal (TRACE, the paper's schedule). Boundary convention (steps count from 0, as the
trainer's step counter does):
  k <  warmup_steps                      lambda_k = lambda0                (steps 0..9 by default)
  warmup <= k < warmup + decay_steps     j = k - warmup, lambda_k = lambda0 * f(j / decay_steps)
                                         with f(0) = 1, so step 10 is still 0.5 by default
  k >= warmup + decay_steps              lambda_k = 0 (from step 40 by default)
  linear f(x) = 1 - x; cosine f(x) = (1 + cos(pi x)) / 2; exponential f(x) = final_ratio ** x.
With the defaults, sum_k lambda_k^2 = 5.127 (the paper digest's 5.13), and `last_active_step`
is 39.

kind: constant (the all-token SDPO/OPSD-family baselines, which distil on every token for the
whole run): lambda_k = lambda0 at every step k >= 0; warmup_steps, decay_steps and decay are not
read. The schedule never ends: `active_forever` is true and `last_active_step` is `NEVER_ENDS`
(sys.maxsize), so `step <= last_active_step` holds for every step. The exposure then grows
linearly, by lambda0^2 * coverage_k per step. A routed variant whose GRPO weight on routed
tokens is `anneal` (1 - lambda_k / lambda0) gives those tokens no GRPO term at all under it.

Either kind with lambda0 = 0 (the GRPO baseline): lambda_k = 0 everywhere, `last_active_step` = -1.
The teacher and the annotator are needed exactly when lambda_k > 0 (`needs_teacher`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

__all__ = ["ExposureTracker", "KLSchedule", "NEVER_ENDS", "SCHEDULE_KINDS"]

SCHEDULE_KINDS = ("anneal", "constant")
NEVER_ENDS = sys.maxsize  # `last_active_step` of a schedule that never reaches 0


@dataclass(frozen=True)
class KLSchedule:
    lambda0: float = 0.5
    warmup_steps: int = 10
    decay_steps: int = 30
    decay: str = "linear"  # linear | cosine | exponential
    exp_final_ratio: float = 0.01  # exponential: lambda at the last decay step / lambda0
    kind: str = "anneal"  # anneal (warm-up, then decay to 0) | constant (lambda0 at every step)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule.kind must be anneal or constant, got {self.kind!r}")
        if self.lambda0 < 0:
            raise ValueError(f"loss.kl.lambda0 must be >= 0, got {self.lambda0}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError(
                f"loss.kl.warmup_steps and decay_steps must be >= 0, got {self.warmup_steps}, {self.decay_steps}"
            )
        if self.decay not in ("linear", "cosine", "exponential"):
            raise ValueError(f"loss.kl.decay must be linear, cosine or exponential, got {self.decay!r}")
        if not 0 < self.exp_final_ratio < 1:
            raise ValueError(f"loss.kl.exp_final_ratio must be in (0, 1), got {self.exp_final_ratio}")

    @property
    def active_forever(self) -> bool:
        """Whether lambda stays > 0 for the whole run (a constant schedule with lambda0 > 0)."""
        return self.kind == "constant" and self.lambda0 > 0

    @property
    def last_active_step(self) -> int:
        """The last step with lambda > 0 (-1 if never, NEVER_ENDS if lambda never reaches 0)."""
        if self.lambda0 == 0:
            return -1
        if self.active_forever:
            return NEVER_ENDS
        return self.warmup_steps + self.decay_steps - 1

    def lam(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.kind == "constant":
            return self.lambda0
        if self.lambda0 == 0 or step >= self.warmup_steps + self.decay_steps:
            return 0.0
        if step < self.warmup_steps:
            return self.lambda0
        x = (step - self.warmup_steps) / self.decay_steps
        if self.decay == "linear":
            f = 1.0 - x
        elif self.decay == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * x))
        else:
            f = self.exp_final_ratio**x
        return self.lambda0 * f

    def needs_teacher(self, step: int) -> bool:
        """Whether step `step` runs the annotator and the teacher at all."""
        return self.lam(step) > 0.0

    def grpo_span_weight(self, step: int) -> float:
        """GRPO weight of routed tokens when annealed: 1 - lambda_k / lambda0 (1 when lambda0 = 0)."""
        return 1.0 if self.lambda0 == 0 else 1.0 - self.lam(step) / self.lambda0


@dataclass
class ExposureTracker:
    """Cumulative privileged-gradient exposure: E = sum_k lambda_k^2 * coverage_k, and sum lambda_k * coverage_k.

    coverage_k is the batch mean of |S_y| / |y| after reduction over all ranks.
    """

    exposure_sq: float = 0.0
    exposure_lin: float = 0.0

    def update(self, lam: float, coverage: float) -> dict[str, float]:
        self.exposure_sq += lam * lam * coverage
        self.exposure_lin += lam * coverage
        return {"exposure/lambda2_coverage_cum": self.exposure_sq, "exposure/lambda_coverage_cum": self.exposure_lin}

    def state_dict(self) -> dict[str, float]:
        return {"exposure_sq": self.exposure_sq, "exposure_lin": self.exposure_lin}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.exposure_sq, self.exposure_lin = float(state["exposure_sq"]), float(state["exposure_lin"])

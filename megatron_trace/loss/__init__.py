"""Pure tensor math of the TRACE objective. Imports only torch; process groups are arguments."""

from .metrics import Stats
from .mismatch import TIS_MODES, rollout_mismatch, tis_weights
from .routed import (
    AGG_MODES,
    ROUTE_VARIANTS,
    GlobalCounts,
    LossConfig,
    LossInputs,
    Route,
    RouteVariant,
    build_routes,
    routed_loss,
)
from .schedule import ExposureTracker, KLSchedule
from .vocab_parallel import token_argmax, token_argmax_prob_gap, token_divergence, token_logprob_and_entropy

__all__ = [
    "AGG_MODES",
    "ROUTE_VARIANTS",
    "ExposureTracker",
    "GlobalCounts",
    "KLSchedule",
    "LossConfig",
    "LossInputs",
    "Route",
    "RouteVariant",
    "Stats",
    "build_routes",
    "rollout_mismatch",
    "routed_loss",
    "tis_weights",
    "TIS_MODES",
    "token_argmax",
    "token_argmax_prob_gap",
    "token_divergence",
    "token_logprob_and_entropy",
]

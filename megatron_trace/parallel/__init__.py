"""Distributed setup. The only package that touches Megatron's `parallel_state`."""

from .spawn import RankFailure, free_port, launch, launch_layout, resolve_dp, run_on_ranks
from .state import ParallelGroups, destroy, initialize

__all__ = ["ParallelGroups", "RankFailure", "destroy", "free_port", "initialize", "launch", "launch_layout", "resolve_dp",
           "run_on_ranks"]

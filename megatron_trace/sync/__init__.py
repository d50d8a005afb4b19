"""Megatron actor -> rollout engine weight sync."""

from .weights import PerRankSync, SyncReport, WeightSyncError, sync_weights, verify_engine

__all__ = ["PerRankSync", "SyncReport", "WeightSyncError", "sync_weights", "verify_engine"]

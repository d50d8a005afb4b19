"""Megatron actor -> rollout engine weight sync."""

from .weights import SyncReport, WeightSyncError, sync_weights, verify_engine

__all__ = ["SyncReport", "WeightSyncError", "sync_weights", "verify_engine"]

"""Scaling reports: a sweep's run directories -> tables, paired differences, compute and plots
(`megatron-trace report`; build.py)."""

from .build import build_report
from .runs import MANIFEST, Run, discover

__all__ = ["MANIFEST", "Run", "build_report", "discover"]

"""Measuring models: MACs and parameters, latency (eager PyTorch, torch.compile, ONNX Runtime,
OpenVINO: outputs verified first), file size.

>>> from prunekit.measure import count, latency, profile, compare_latency
"""

from __future__ import annotations

from .counting import count
from .profiler import onnx_latency, profile
from .runtimes import RUNTIMES, RuntimeUnavailable, profile_runtimes
from .timing import LAYOUTS, compare_latency, latency

__all__ = ["LAYOUTS", "RUNTIMES", "RuntimeUnavailable", "count", "latency", "compare_latency",
           "onnx_latency", "profile", "profile_runtimes"]

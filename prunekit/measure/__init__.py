"""Measuring models: MACs and parameters, latency (PyTorch and ONNX Runtime), file size.

>>> from prunekit.measure import count, latency, profile, compare_latency
"""

from __future__ import annotations

from .counting import count
from .profiler import onnx_latency, profile
from .timing import LAYOUTS, compare_latency, latency

__all__ = ["LAYOUTS", "count", "latency", "compare_latency", "onnx_latency", "profile"]

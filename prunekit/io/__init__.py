"""Saving and loading (pruned) checkpoints, and ONNX export.

>>> from prunekit.io import save, load, export_onnx
"""

from __future__ import annotations

from .checkpoint import layer_shapes, load, read, resize_layers, save
from .onnx_export import export_onnx

__all__ = ["save", "load", "read", "layer_shapes", "resize_layers", "export_onnx"]

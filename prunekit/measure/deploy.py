"""Inference-time rewrites applied before timing a model the way it would be deployed.

:func:`fold_batchnorm` folds every eval-mode BatchNorm that directly follows a convolution into
that convolution's weight and bias (``w' = w * gamma / sqrt(var + eps)``,
``b' = (b - mean) * gamma / sqrt(var + eps) + beta``). The result computes the same function
in eval mode, up to float rounding, with one memory pass fewer per layer. Deployment runtimes
(ONNX Runtime, TensorRT, oneDNN graphs) do this fold themselves, so latency "as deployed" is
measured on the folded network. Pruned and original models get the same treatment.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batchnorm"]


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, attr = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


class _Tracer(fx.Tracer):
    """fx's tracer, with the stand-ins of removed residual branches as leaves (they compute
    their output shape from their input's, which symbolic tracing cannot follow)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from ..engine.depth import BranchConstant, Vanished

        return isinstance(m, (BranchConstant, Vanished)) or super().is_leaf_module(m, qualname)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each conv -> BatchNorm pair folded into one conv.

    A BatchNorm is folded when its input is the output of an ``nn.Conv1d/2d/3d`` that nothing
    else reads, both modules are called once, and it keeps running statistics; any other
    BatchNorm (for instance DenseNet's BN-ReLU-conv after a concatenation) stays. The copy is
    a :class:`torch.fx.GraphModule`. A model that :func:`torch.fx.symbolic_trace` cannot trace
    is returned as a plain eval-mode copy, with a :class:`RuntimeWarning`.

    Parameters
    ----------
    model : nn.Module
        The network; it is not modified.

    Returns
    -------
    nn.Module
        The folded copy (eval mode), computing the same outputs as ``model.eval()``.
    """
    m = copy.deepcopy(model).eval()
    try:
        gm = fx.GraphModule(m, _Tracer().trace(m))
    except Exception as e:  # noqa: BLE001 - any tracing failure means "cannot fold"
        warnings.warn(f"fold_batchnorm: the model cannot be traced ({type(e).__name__}); "
                      "timing it without folding", RuntimeWarning, stacklevel=2)
        return m
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        bn = modules[node.target]
        src = node.args[0] if node.args else None
        if (not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1
                or calls[src.target] != 1 or calls[node.target] != 1
                or not isinstance(modules[src.target], (nn.Conv1d, nn.Conv2d, nn.Conv3d))
                or bn.running_mean is None or not bn.track_running_stats):
            continue
        with torch.no_grad():
            fused = fuse_conv_bn_eval(modules[src.target], bn)
        _set_submodule(gm, src.target, fused)
        modules[src.target] = fused
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()

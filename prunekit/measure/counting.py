"""Counting multiply-accumulates (MACs) and parameters.

The count comes from torch-pruning's module-hook counter
(``torch_pruning.utils.count_ops_and_params``, wrapped once in
:func:`prunekit.engine.budget.count_macs_params`) so that the numbers prunekit reports agree with
the ones the pruning engine targets. Its convention, per image:

* ``nn.Conv*d``: ``Cout * Cin / groups * prod(kernel) * prod(output spatial)``, plus
  ``Cout * prod(output spatial)`` when the conv has a bias;
* ``nn.Linear``: ``in_features * out_features`` (per sample), plus ``out_features`` for a bias;
* ``nn.BatchNorm*d`` (affine): ``2 * numel(input)``; ``numel(input)`` when not affine;
* ``nn.ReLU`` / ``ReLU6`` / ``LeakyReLU`` / ``PReLU`` / ``ELU`` / ``GELU`` modules:
  ``numel(output)``;
* pooling modules (max, average, adaptive): ``numel(input)``;
* anything done functionally (``F.relu``, ``x + y``, ``torch.cat``, ``flatten``): zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import module_device

__all__ = ["count"]


def _first_sample(x: Any, device: torch.device) -> Any:
    """Keep only the first sample of every tensor (counts are per image anyway)."""
    if isinstance(x, torch.Tensor):
        x = x[:1] if x.dim() > 0 and x.shape[0] > 1 else x
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _first_sample(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_first_sample(v, device) for v in x)
    return x


def count(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """MACs and parameters of ``model`` for one input sample.

    Parameters
    ----------
    model : nn.Module
        Any module; it is not modified (the counter works on a deep copy in eval mode).
    example_inputs : Tensor, tuple/list of Tensors or dict
        Example input(s) as ``model`` takes them. Only the first sample of the batch is used;
        the result is per image whatever the batch size.

    Returns
    -------
    macs : int
        Multiply-accumulates for one image, in torch-pruning's convention (see the module
        docstring: convs and linears, plus BN, activation and pooling modules).
    params : int
        Number of parameters (buffers such as BN running statistics are not counted).

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False))
    >>> count(net, torch.randn(1, 3, 10, 10))
    (13824, 216)
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"count() needs an nn.Module, got {type(model).__name__}")
    from ..engine.budget import count_macs_params

    return count_macs_params(model, _first_sample(example_inputs, module_device(model)))

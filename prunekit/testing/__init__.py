"""Test helpers shipped with prunekit: a seeded generator of random CNNs and the fuzzing
harness that checks the pruning engine's properties on them (:mod:`prunekit.testing.fuzz`).

Used by the tests and ``bench/fuzz.py``; nothing in the library imports it.
"""

import torch
from torch import nn

from .fuzz import (
    FuzzNet,
    Outcome,
    build,
    calibration_set,
    check_architecture,
    random_spec,
    spec_features,
    summarise,
)

__all__ = ["FuzzNet", "Outcome", "build", "calibration_set", "check_architecture", "random_spec",
           "randomise_bn", "spec_features", "summarise"]


def randomise_bn(model: nn.Module, seed: int | torch.Generator = 0) -> nn.Module:
    """Give every BatchNorm2d non-trivial affine parameters and running statistics (in place),
    so that exactness checks (outputs unchanged by a merge) are not vacuous; returns ``model``."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model

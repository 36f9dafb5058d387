"""Two small plain CNNs that exercise the pruning engine's special cases.

``simplecnn`` ends in ``Flatten -> Linear(C * H * W)`` with no global pooling: removing one
conv filter removes ``H * W`` consecutive input features of the classifier. ``mlpcnn`` ends
in global pooling followed by two linear layers, so the hidden linear layer is prunable too.

Both share the feature stack conv3x3-BN-ReLU x 4 with widths 16, 32, 32, 64 and a
``MaxPool2d(2)`` after the 2nd and the 4th conv.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .common import check_args, conv3x3, init_weights, scaled
from .registry import register

__all__ = ["MLPCNN", "SimpleCNN", "mlpcnn", "simplecnn"]

_WIDTHS = (16, 32, 32, 64)


def _features(in_channels: int, width: float) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    channels = in_channels
    for i, c in enumerate(_WIDTHS):
        out = scaled(c, width)
        layers += [conv3x3(channels, out), nn.BatchNorm2d(out), nn.ReLU()]
        if i in (1, 3):
            layers.append(nn.MaxPool2d(2))
        channels = out
    return nn.Sequential(*layers), channels


class SimpleCNN(nn.Module):
    """Conv stack followed by ``Flatten`` and one ``Linear`` over all spatial positions.

    Parameters
    ----------
    num_classes : int, default 10
    in_channels : int, default 3
    width : float, default 1.0
        Multiplier of every channel width (rounded, at least 1).
    input_size : int, default 32
        Side of the square input images; the classifier has
        ``64 * (input_size // 4) ** 2`` inputs (4096 for 32, 3136 for 28).

    Notes
    -----
    Input ``[N, in_channels, input_size, input_size]`` -> logits ``[N, num_classes]``.
    Other input sizes fail in the classifier, by design.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 input_size: int = 32) -> None:
        super().__init__()
        check_args(num_classes, in_channels, width)
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 4:
            raise ConfigError(f"input_size must be an integer >= 4, got {input_size!r}")
        self.features, channels = _features(in_channels, width)
        side = input_size // 4
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(channels * side * side, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


class MLPCNN(nn.Module):
    """Conv stack, global average pooling, then ``Linear(64, 128)-ReLU-Linear(128, classes)``.

    Parameters
    ----------
    num_classes : int, default 10
    in_channels : int, default 3
    width : float, default 1.0
        Multiplier of every channel width and of the hidden linear width.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        check_args(num_classes, in_channels, width)
        self.features, channels = _features(in_channels, width)
        hidden = scaled(128, width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


@register("simplecnn")
def simplecnn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
              input_size: int = 32) -> SimpleCNN:
    """Plain CNN ending in ``Flatten -> Linear`` (no global pooling); see :class:`SimpleCNN`."""
    return SimpleCNN(num_classes=num_classes, in_channels=in_channels, width=width,
                     input_size=input_size)


@register("mlpcnn")
def mlpcnn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> MLPCNN:
    """Plain CNN ending in global pooling and two linear layers; see :class:`MLPCNN`."""
    return MLPCNN(num_classes=num_classes, in_channels=in_channels, width=width)

"""DenseNet-40 (k = 12) for CIFAR: the basic DenseNet of Huang et al. (2017).

Three dense blocks of 12 layers each; every layer is BN-ReLU-Conv3x3 producing ``k = 12``
new feature maps that are concatenated (``torch.cat`` along dim 1) to its input. No
bottleneck layers, no compression: the transitions are BN-ReLU-Conv1x1 (same width) followed
by 2x2 average pooling. The stem is a 3x3 conv to ``2k = 24`` channels and the head is
BN-ReLU, global average pooling and a linear layer. Channels: 24 -> 168 -> 312 -> 456.
With 10 classes this is 1,059,298 parameters; the paper rounds it to 1.0M.

References
----------
Huang, G., Liu, Z., van der Maaten, L. and Weinberger, K. Q. (2017). Densely connected
convolutional networks. CVPR.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .common import check_args, conv1x1, conv3x3, init_weights, scaled
from .registry import register

__all__ = ["DenseLayer", "DenseNetCifar", "Transition", "densenet40"]


class DenseLayer(nn.Module):
    """BN-ReLU-Conv3x3 whose ``growth`` outputs are appended to its input.

    Notes
    -----
    Shapes: ``[N, C, H, W] -> [N, C + growth, H, W]``.
    """

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.conv = conv3x3(in_planes, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], dim=1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1-AvgPool2d(2) between dense blocks (``ceil_mode`` so 7x7 -> 4x4)."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__(nn.BatchNorm2d(in_planes), nn.ReLU(), conv1x1(in_planes, out_planes),
                         nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True))


class DenseNetCifar(nn.Module):
    """Basic DenseNet for CIFAR (no bottleneck, no compression), depth ``3n + 4``.

    Parameters
    ----------
    depth : int, default 40
        ``depth - 4`` must be a positive multiple of 3; each block has ``(depth - 4) / 3``
        layers.
    growth_rate : int, default 12
    num_classes : int, default 10
    in_channels : int, default 3
    width : float, default 1.0
        Multiplier of the growth rate and the stem width (rounded, at least 1).

    Notes
    -----
    Input ``[N, in_channels, H, W]`` -> logits ``[N, num_classes]``; 32x32 gives 8x8 maps
    in the last block and 28x28 gives 7x7.
    """

    def __init__(self, depth: int = 40, growth_rate: int = 12, num_classes: int = 10,
                 in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        check_args(num_classes, in_channels, width)
        if depth < 7 or (depth - 4) % 3:
            raise ConfigError(f"DenseNet depth must be 3n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 3
        growth = scaled(growth_rate, width)
        channels = scaled(2 * growth_rate, width)

        self.conv1 = conv3x3(in_channels, channels)
        blocks: list[nn.Module] = []
        for b in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            blocks.append(nn.Sequential(*layers))
            if b < 2:
                blocks.append(Transition(channels, channels))
        self.block1, self.trans1, self.block2, self.trans2, self.block3 = blocks
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.trans1(self.block1(x))
        x = self.trans2(self.block2(x))
        x = self.relu(self.bn(self.block3(x)))
        return self.fc(self.flatten(self.avgpool(x)))


@register("densenet40")
def densenet40(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> DenseNetCifar:
    """DenseNet-40 with growth rate 12 for CIFAR (1.06M parameters, "1.0M" in the paper).

    See :class:`DenseNetCifar` and Huang et al. (2017).
    """
    return DenseNetCifar(40, 12, num_classes=num_classes, in_channels=in_channels, width=width)

"""CIFAR-style ResNets: basic-block ResNet-8/20/32/44/56/110 and pre-activation ResNet-164.

The basic-block networks follow Section 4.2 of He et al. (2016a): a 3x3 stem with 16
filters, three stages of ``n`` blocks with 16, 32 and 64 filters (stride 2 at the start of
stages 2 and 3), global average pooling and one linear layer; depth = 6n + 2. Where a block
changes stride or width its shortcut is a projection (1x1 convolution + BatchNorm, the
paper's option B) rather than option A's zero padding, which a channel-dependency tracer
cannot follow; this adds 2,752 parameters to ResNet-20 (about 1%).

ResNet-164 is the pre-activation bottleneck network of He et al. (2016b): depth = 9n + 2
with n = 18, bottleneck widths 16/32/64 expanded 4x to 64/128/256.

References
----------
He, K., Zhang, X., Ren, S. and Sun, J. (2016a). Deep residual learning for image
recognition. CVPR.

He, K., Zhang, X., Ren, S. and Sun, J. (2016b). Identity mappings in deep residual networks.
ECCV.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .common import check_args, conv1x1, conv3x3, init_weights, scaled
from .registry import register

__all__ = ["BasicBlock", "PreActBottleneck", "PreActResNetCifar", "ResNetCifar"]

_STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (post-activation).

    Parameters
    ----------
    in_planes, planes : int
        Input and output channels.
    stride : int, default 1
        Stride of the first convolution (and of the projection shortcut).

    Notes
    -----
    Shapes: ``[N, in_planes, H, W] -> [N, planes, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(conv1x1(in_planes, planes, stride),
                                                     nn.BatchNorm2d(planes))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """Basic-block ResNet for 32x32 (or 28x28) images, depth ``6n + 2``.

    Parameters
    ----------
    depth : int
        Total number of weighted layers; ``depth - 2`` must be a positive multiple of 6.
    num_classes : int, default 10
    in_channels : int, default 3
    width : float, default 1.0
        Multiplier of every channel width (rounded, at least 1).

    Notes
    -----
    Input ``[N, in_channels, H, W]`` -> logits ``[N, num_classes]``; any ``H, W >= 4`` work.
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0) -> None:
        super().__init__()
        check_args(num_classes, in_channels, width)
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"basic-block CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        widths = [scaled(c, width) for c in _STAGE_WIDTHS]

        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: (BN-ReLU-conv) 1x1, 3x3 (strided), 1x1 expanding 4x.

    Parameters
    ----------
    in_planes : int
        Input channels.
    planes : int
        Bottleneck width; the block outputs ``planes * 4`` channels.
    stride : int, default 1
        Stride of the 3x3 convolution and of the projection shortcut.

    Notes
    -----
    When the stride or the channel count changes, the shortcut is a 1x1 projection applied
    to the pre-activated input (the output of ``bn1``-``relu1``); otherwise it is the identity
    on the raw input. No activation follows the addition (He et al., 2016b).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu3 = nn.ReLU()
        self.conv3 = conv1x1(planes, out_planes)
        if stride != 1 or in_planes != out_planes:
            self.shortcut: nn.Module = conv1x1(in_planes, out_planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        residual = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return out + residual


class PreActResNetCifar(nn.Module):
    """Pre-activation bottleneck ResNet for CIFAR, depth ``9n + 2`` (He et al., 2016b).

    Parameters
    ----------
    depth : int
        ``depth - 2`` must be a positive multiple of 9 (164 gives n = 18).
    num_classes : int, default 10
    in_channels : int, default 3
    width : float, default 1.0
        Multiplier of every channel width (rounded, at least 1).

    Notes
    -----
    Stem: a 3x3 conv to 16 channels with no BN after it (the first block pre-activates).
    Head: BN-ReLU, global average pooling, flatten, linear.
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0) -> None:
        super().__init__()
        check_args(num_classes, in_channels, width)
        if depth < 11 or (depth - 2) % 9:
            raise ConfigError(f"bottleneck CIFAR ResNet depth must be 9n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 9
        widths = [scaled(c, width) for c in _STAGE_WIDTHS]

        self.conv1 = conv3x3(in_channels, widths[0])
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBottleneck(in_planes, planes, stride))
                in_planes = planes * PreActBottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(self.flatten(self.avgpool(x)))


def _basic(depth: int):
    def builder(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNetCifar:
        return ResNetCifar(depth, num_classes=num_classes, in_channels=in_channels, width=width)

    builder.__name__ = builder.__qualname__ = f"resnet{depth}"
    builder.__doc__ = (f"ResNet-{depth} for CIFAR (basic blocks, n = {(depth - 2) // 6} per stage, "
                       "option-B shortcuts); see :class:`ResNetCifar` and He et al. (2016a).")
    return builder


resnet8 = register("resnet8")(_basic(8))
resnet20 = register("resnet20")(_basic(20))
resnet32 = register("resnet32")(_basic(32))
resnet44 = register("resnet44")(_basic(44))
resnet56 = register("resnet56")(_basic(56))
resnet110 = register("resnet110")(_basic(110))


@register("resnet164")
def resnet164(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> PreActResNetCifar:
    """Pre-activation bottleneck ResNet-164 for CIFAR (about 1.70M parameters).

    See :class:`PreActResNetCifar` and He et al. (2016b), "Identity mappings in deep
    residual networks", ECCV.
    """
    return PreActResNetCifar(164, num_classes=num_classes, in_channels=in_channels, width=width)

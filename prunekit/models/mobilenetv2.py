"""MobileNetV2 for CIFAR-sized images (Sandler et al., 2018).

The ImageNet network adapted to 32x32 inputs in the usual way: the stem 3x3 conv has stride
1 and the second bottleneck stage (t=6, c=24) has stride 1, so only three stride-2 stages
remain (32 -> 16 -> 8 -> 4; 28 -> 14 -> 7 -> 4). Everything else follows the paper:
inverted residual blocks (1x1 expansion, 3x3 depthwise, linear 1x1 projection), ReLU6, a
residual add when the stride is 1 and the widths match, a final 1x1 conv to 1280 channels,
global average pooling and a linear classifier. 2.24M parameters with 10 classes.

References
----------
Sandler, M., Howard, A., Zhu, M., Zhmoginov, A. and Chen, L.-C. (2018). MobileNetV2:
inverted residuals and linear bottlenecks. CVPR.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import check_args, conv1x1, conv3x3, init_weights, scaled
from .registry import register

__all__ = ["CIFAR_SETTINGS", "InvertedResidual", "MobileNetV2Cifar", "mobilenetv2"]

#: ``(t, c, n, s)``: expansion, output channels, repeats, stride of the first repeat.
CIFAR_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def _conv_bn_relu6(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU6())


class InvertedResidual(nn.Module):
    """Inverted residual block: [1x1 expand-BN-ReLU6] -> 3x3 depthwise-BN-ReLU6 -> 1x1-BN.

    Parameters
    ----------
    in_planes, out_planes : int
        Input and output channels.
    stride : int
        Stride of the depthwise convolution.
    expand_ratio : int
        Hidden width is ``in_planes * expand_ratio``; with 1 the expansion conv is omitted.

    Notes
    -----
    The input is added to the output when ``stride == 1`` and ``in_planes == out_planes``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_planes * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(conv1x1(in_planes, hidden)))
        layers.append(_conv_bn_relu6(conv3x3(hidden, hidden, stride, groups=hidden)))
        layers += [conv1x1(hidden, out_planes), nn.BatchNorm2d(out_planes)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_planes == out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 with the CIFAR strides (stem stride 1, second stage stride 1).

    Parameters
    ----------
    num_classes : int, default 10
    in_channels : int, default 3
    width : float, default 1.0
        Multiplier of every channel width, the final 1280 included (rounded, at least 1).
        Unlike the paper, widths are not rounded to multiples of 8.

    Notes
    -----
    Input ``[N, in_channels, H, W]`` -> logits ``[N, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        check_args(num_classes, in_channels, width)
        channels = scaled(32, width)
        layers: list[nn.Module] = [_conv_bn_relu6(conv3x3(in_channels, channels))]
        for t, c, n, s in CIFAR_SETTINGS:
            out = scaled(c, width)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        last = scaled(1280, width)
        layers.append(_conv_bn_relu6(conv1x1(channels, last)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


@register("mobilenetv2")
def mobilenetv2(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> MobileNetV2Cifar:
    """MobileNetV2 for CIFAR (2.24M parameters with 10 classes).

    See :class:`MobileNetV2Cifar` and Sandler et al. (2018).
    """
    return MobileNetV2Cifar(num_classes=num_classes, in_channels=in_channels, width=width)

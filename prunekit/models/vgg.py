"""VGG-16 with BatchNorm, CIFAR variant (one linear classifier).

Thirteen 3x3 conv-BN-ReLU layers in five stages (Simonyan & Zisserman, 2015, configuration
D) with BatchNorm after every convolution, as is usual for CIFAR since Zagoruyko's
"92.45% on CIFAR-10 in Torch" and the pruning literature built on it (Li et al., 2017; Liu et
al., 2017). The 4096-wide fully connected layers are replaced by a single
``Linear(512, num_classes)``. Max pooling uses ``ceil_mode=True`` so a 28x28 input shrinks
28 -> 14 -> 7 -> 4 -> 2 -> 1 just as 32x32 shrinks to 1x1.

References
----------
Simonyan, K. and Zisserman, A. (2015). Very deep convolutional networks for large-scale
image recognition. ICLR.

Li, H., Kadav, A., Durdanovic, I., Samet, H. and Graf, H. P. (2017). Pruning filters for
efficient ConvNets. ICLR.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .common import check_args, conv3x3, init_weights, scaled
from .registry import register

__all__ = ["VGG", "VGG16_CFG", "vgg16_bn"]

#: Channel widths of the 13 convolutions; ``"M"`` is a 2x2 max pooling.
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """Plain VGG feature stack with BatchNorm, global pooling and a linear classifier.

    Parameters
    ----------
    cfg : sequence of int or "M"
        Conv output widths, ``"M"`` for ``MaxPool2d(2, 2, ceil_mode=True)``.
    num_classes : int, default 10
    in_channels : int, default 3
    width : float, default 1.0
        Multiplier of every channel width (rounded, at least 1).

    Notes
    -----
    Input ``[N, in_channels, H, W]`` -> logits ``[N, num_classes]``. Each conv has no bias
    (the BatchNorm after it has one).
    """

    def __init__(self, cfg: Sequence[int | str] = VGG16_CFG, num_classes: int = 10,
                 in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        check_args(num_classes, in_channels, width)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                out = scaled(int(item), width)
                layers += [conv3x3(channels, out), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


@register("vgg16_bn")
def vgg16_bn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG:
    """CIFAR VGG-16 with BatchNorm and one linear classifier (about 14.72M parameters).

    See :class:`VGG` and Simonyan & Zisserman (2015).
    """
    return VGG(VGG16_CFG, num_classes=num_classes, in_channels=in_channels, width=width)

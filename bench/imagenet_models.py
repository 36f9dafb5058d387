"""ImageNet-shaped (224x224) ResNet-18 and MobileNetV2 built from prunekit's own blocks, for
``--model bench/imagenet_models.py:resnet18`` and the runtime benchmark (the zoo's networks
have CIFAR strides; torchvision is not in the default environment).

* ``resnet18``: He et al., CVPR 2016 - 7x7 stride-2 stem, 3x3 max pool, four stages of two
  basic blocks (64, 128, 256, 512 channels; stride 2 from the second stage), global average
  pool, 1000 classes. 11.7M parameters, 1.82 GMACs at 224x224.
* ``mobilenetv2``: Sandler et al., CVPR 2018 - 3x3 stride-2 stem (32), the paper's seven
  bottleneck stages (t, c, n, s) with ImageNet strides, 1x1 conv to 1280, 1000 classes.
  3.5M parameters, 0.3 GMACs at 224x224.
"""

from __future__ import annotations

from torch import nn

from prunekit.models.common import conv1x1, conv3x3, init_weights
from prunekit.models.mobilenetv2 import InvertedResidual
from prunekit.models.resnet_cifar import BasicBlock

IMAGENET_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                     (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """ResNet-18 for 224x224 images."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    planes_in = 64
    for i, planes in enumerate((64, 128, 256, 512)):
        for j in range(2):
            layers.append(BasicBlock(planes_in, planes, 2 if (i > 0 and j == 0) else 1))
            planes_in = planes
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(512, num_classes))
    init_weights(net)
    return net.eval()


def mobilenetv2(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """MobileNetV2 (width 1.0) for 224x224 images."""
    layers: list[nn.Module] = [conv3x3(in_channels, 32, 2), nn.BatchNorm2d(32), nn.ReLU6()]
    channels = 32
    for t, c, n, s in IMAGENET_SETTINGS:
        for i in range(n):
            layers.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
            channels = c
    layers += [conv1x1(channels, 1280), nn.BatchNorm2d(1280), nn.ReLU6()]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(1280, num_classes))
    init_weights(net)
    return net.eval()

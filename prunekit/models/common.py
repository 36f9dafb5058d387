"""Small building blocks shared by the zoo: width scaling, argument checks, init."""

from __future__ import annotations

import math
import numbers

from torch import nn

from ..errors import ConfigError

__all__ = ["check_args", "conv1x1", "conv3x3", "init_weights", "scaled"]


def check_args(num_classes: int, in_channels: int, width: float) -> None:
    """Validate the arguments every zoo model takes.

    Raises
    ------
    ConfigError
        If ``num_classes`` or ``in_channels`` is not an integer >= 1, or ``width`` is not a
        finite number > 0.
    """
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")
    if (isinstance(width, bool) or not isinstance(width, numbers.Real)
            or not math.isfinite(width) or width <= 0):
        raise ConfigError(f"width must be a finite number > 0, got {width!r}")


def scaled(channels: int, width: float) -> int:
    """Return ``channels * width`` rounded half-up, at least 1.

    Examples
    --------
    >>> scaled(64, 0.25), scaled(16, 0.01)
    (16, 1)
    """
    return max(1, int(math.floor(channels * float(width) + 0.5)))


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm always follows or precedes)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1,
                     groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution with no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def init_weights(model: nn.Module) -> None:
    """Standard initialisation used by the zoo.

    Convolutions: Kaiming normal (``fan_out``, ReLU gain), bias 0. BatchNorm: weight 1,
    bias 0. Linear: PyTorch's default (uniform), bias 0.

    References
    ----------
    He, K., Zhang, X., Ren, S. and Sun, J. (2015). Delving deep into rectifiers: surpassing
    human-level performance on ImageNet classification. ICCV.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

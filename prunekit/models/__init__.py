"""The model zoo: CIFAR-style CNNs built by name.

>>> from prunekit.models import create, list_models
>>> model = create("resnet56", num_classes=10, in_channels=1)

Every model accepts any ``num_classes`` and ``in_channels``, works on 3x32x32 and 1x28x28
inputs, and takes a ``width`` multiplier. The forward passes never hard-code a channel count,
so a model whose Conv/BN/Linear layers were replaced by narrower ones still runs.
``create`` records how a model was built in ``model.prunekit_arch``.

Families (one module each): ``resnet_cifar`` (resnet8/20/32/44/56/110, resnet164),
``vgg`` (vgg16_bn), ``densenet`` (densenet40), ``mobilenetv2`` (mobilenetv2) and
``simple`` (simplecnn, mlpcnn).

Your own model: ``build("path/to/net.py:make_net")``, ``build("torchvision:resnet18")``,
``build("timm:convnext_nano")``, ``build("hf:resnet")`` (see :mod:`prunekit.models.spec`).
"""

from __future__ import annotations

from . import densenet, mobilenetv2, resnet_cifar, simple, vgg  # noqa: F401  (registers the builders)
from .registry import create, list_models, register
from .spec import OutputAdapter, build, load_weights, logits_of

__all__ = ["OutputAdapter", "build", "create", "list_models", "load_weights", "logits_of",
           "register"]

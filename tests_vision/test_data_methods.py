"""Data-driven methods (C-SGD, ThiNet, Taylor) on real torchvision architectures at 64x64 (a plain
residual net, inverted residuals with depthwise convs, grouped convs, ConvNeXt's channel-last
blocks), with a small labelled image set built here."""

from __future__ import annotations

import pytest
import torch
from conftest import prune_and_check

from prunekit.data import ImageDataset
from prunekit.models import build


def images(n: int, seed: int) -> ImageDataset:
    """``n`` 3x64x64 images of 4 classes, each class a different mean colour plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    base = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])[labels]
    noise = torch.randint(-40, 40, (n, 3, 64, 64), generator=g)
    pixels = (base[:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
    return ImageDataset(pixels, labels, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], num_classes=4,
                        name="colours")


OPTIONS = {"csgd": dict(centripetal_epochs=1, batch_size=16, calib_images=32, recalibrate_samples=32),
           "thinet": dict(calib_images=32, batch_size=16),
           "taylor": dict(steps=1, calib_images=32, calib_batch_size=16, finetune_epochs_per_step=0)}


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "resnext50_32x4d", "convnext_tiny"])
@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_data_method_on_a_torchvision_model(arch, method, tmp_path, seeded):
    model = build(f"torchvision:{arch}", num_classes=4)
    train, test = images(48, 0), images(16, 1)
    x = torch.stack([test[i][0] for i in range(4)])
    assert prune_and_check(model, x, tmp_path, method=method, data=(train, test),
                           **OPTIONS[method]) == "ok"

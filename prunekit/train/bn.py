"""Re-estimating BatchNorm statistics after the weights changed (pruning, merging, training
that was too short for the running averages to follow)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..data.batches import count, iter_batches
from ..errors import DataError
from ..utils import module_device


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Any, samples: int = 2048, batch_size: int = 128,
                   device: str | torch.device | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics as the exact average over ``samples``
    training inputs (no augmentation, no gradients, weights untouched).

    Centripetal SGD uses it at the end of S3: once a cluster's filters are identical their
    channels are identical, so recalibrated statistics are identical too and the S4 merge is
    exact even when training was too short for the running averages (momentum 0.1) to forget
    the pre-training values.

    Parameters
    ----------
    model : nn.Module
        The network (its mode is restored afterwards).
    data : ImageDataset, Dataset, DataLoader or Tensor
        Inputs (see :func:`prunekit.data.batches.iter_batches`); labels are not read.
    samples : int
        Inputs averaged (the first ones).
    batch_size : int
        Batch size for datasets and tensors.
    device : str or torch.device, optional
        Where to run (default: the model's device).

    Returns
    -------
    int
        The number of inputs used (0 when the model has no BatchNorm with running statistics).
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    if data is None:
        raise DataError("re-estimating BatchNorm statistics needs data")
    n = count(data, samples)
    if n <= 0:
        raise DataError("re-estimating BatchNorm statistics needs at least one input")
    dev = torch.device(device) if device is not None else module_device(model)
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        for x, _ in iter_batches(data, n, batch_size):
            model(x.to(dev))
    finally:
        for m, (mom, tr) in zip(bns, saved, strict=True):
            m.momentum = mom
            m.train(tr)
        model.train(was_training)
    return n

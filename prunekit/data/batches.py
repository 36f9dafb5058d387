"""One way to read data batch by batch, whatever the user holds.

:func:`iter_batches` accepts a prunekit :class:`~prunekit.data.ImageDataset` (its fast in-memory
``batch`` path), any map-style ``torch.utils.data.Dataset`` yielding ``(image, label)`` or
``image``, a ``DataLoader`` (iterated as it is, never materialised) or a tensor of normalised
inputs, and stops after the first ``samples`` inputs, so a method reads only what it needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from ..errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor | None]


def _split(item: Any) -> Batch:
    """``(inputs, labels or None)`` from what a dataset or loader yields."""
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        y = item[1] if len(item) > 1 else None
        return item[0], torch.as_tensor(y, dtype=torch.long) if y is not None else None
    raise DataError(f"a batch must be a tensor or an (inputs, labels) pair, got {type(item).__name__}")


def count(data: Any, samples: int | None = None) -> int:
    """How many inputs :func:`iter_batches` yields for ``samples`` (``None``: all)."""
    if data is None:
        raise DataError("no data given")
    n = len(data.dataset) if isinstance(data, DataLoader) else len(data)
    return n if samples is None else min(int(samples), n)


def iter_batches(data: Any, samples: int | None = None, batch_size: int = 64) -> Iterator[Batch]:
    """The first ``samples`` inputs of ``data`` (all when ``None``), as ``(x, y)`` batches.

    Parameters
    ----------
    data : ImageDataset, Dataset, DataLoader or Tensor
        Where the inputs come from; a ``DataLoader`` keeps its own batch size, order and
        workers (the last batch is cut to ``samples``).
    samples : int, optional
        Inputs to read.
    batch_size : int
        Batch size for datasets and tensors.

    Yields
    ------
    x : Tensor [B, ...]
        Normalised inputs.
    y : LongTensor [B] or None
        Labels, where the data has them.

    Raises
    ------
    DataError
        No data, or an empty selection.
    """
    n = count(data, samples)
    if n <= 0:
        raise DataError("the data set is empty")
    if isinstance(data, DataLoader):
        seen = 0
        for item in data:
            x, y = _split(item)
            take = min(len(x), n - seen)
            yield x[:take], (y[:take] if y is not None else None)
            seen += take
            if seen >= n:
                return
        return
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        if isinstance(data, torch.Tensor):
            yield data[idx], None
        elif callable(getattr(data, "batch", None)):
            yield data.batch(idx)
        else:
            yield _split(default_collate([data[int(i)] for i in idx]))


def first_input(data: Any) -> torch.Tensor:
    """One input of ``data``, batch dimension kept (``[1, ...]``)."""
    if callable(getattr(data, "example_input", None)):
        return data.example_input(1)
    x, _ = next(iter_batches(data, 1, 1))
    return x[:1]

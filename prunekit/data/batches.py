"""One way to read data batch by batch, whatever the user holds.

Every data-driven step (criteria, reconstruction, surveys, gates, BatchNorm re-estimation,
training and evaluation) reads its inputs through this module, from any of:

* a prunekit :class:`~prunekit.data.ImageDataset` -- the fast in-memory path: batches are
  gathered by index with its ``batch`` method;
* any map-style ``torch.utils.data.Dataset`` yielding ``(image, label)`` or just ``image``
  (collated like a ``DataLoader``; a dataset with a ``num_workers`` attribute above 0, such as
  the streamed image folder :class:`~prunekit.data.stream.ImageFolderStream`, is read through a
  ``DataLoader`` with that many worker processes, so only a few batches are ever in memory);
* a ``DataLoader``, iterated as it is (its batch size, order, workers and collate function),
  never materialised;
* a tensor of normalised inputs ``[N, ...]`` (no labels).

:func:`iter_batches` reads the first ``samples`` inputs once; :func:`select` chooses a fixed set
(a seeded random subset of an indexable dataset, the first ``samples`` of a ``DataLoader``)
that can be read several times in identical batches, for methods that pass over their
calibration images more than once (ThiNet, LASSO). Labels are returned where the data has
them; :func:`labels_of` raises a clear :class:`~prunekit.errors.DataError` for a method that
needs them when there are none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset
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


def labels_of(y: torch.Tensor | None, what: str) -> torch.Tensor:
    """``y``, or a :class:`DataError` saying that ``what`` needs labels the data does not have."""
    if y is None:
        raise DataError(f"{what} needs labels, but the data yields images only "
                        "(give a dataset or DataLoader of (image, label) pairs)")
    return y


def is_loader(data: Any) -> bool:
    """Whether ``data`` is a ``DataLoader`` (read by iterating it, not by index)."""
    return isinstance(data, DataLoader)


def _loader_size(loader: DataLoader) -> int | None:
    """Inputs one pass of ``loader`` yields, when that is known without iterating it."""
    bs = loader.batch_sampler
    if isinstance(bs, BatchSampler) and bs.batch_size is not None:
        try:
            n = len(bs.sampler)
        except TypeError:
            return None
        return (n // bs.batch_size) * bs.batch_size if bs.drop_last else n
    try:
        return len(loader.dataset)
    except TypeError:  # an IterableDataset without __len__
        return None


def count(data: Any, samples: int | None = None) -> int:
    """How many inputs :func:`iter_batches` yields for ``samples`` (``None``: all).

    A ``DataLoader`` counts the samples one pass yields (its sampler's length, so a loader over
    a subset counts the subset); an iterable one without a length counts ``samples``.
    """
    if data is None:
        raise DataError("no data given")
    if isinstance(data, DataLoader):
        n = _loader_size(data)
        if n is None:
            if samples is None:
                raise DataError("this DataLoader has no length (an IterableDataset); "
                                "give a sample count")
            return int(samples)
    elif isinstance(data, torch.Tensor):
        n = data.shape[0]
    else:
        n = len(data)
    return n if samples is None else min(int(samples), n)


def is_empty(data: Any) -> bool:
    """``True`` for ``None`` or data with no sample (a length-less loader counts as not empty)."""
    if data is None:
        return True
    try:
        return count(data) == 0
    except DataError:
        return False


def num_batches(data: Any, samples: int, batch_size: int) -> int:
    """Batches :func:`iter_batches` yields for ``samples`` inputs (for progress bars)."""
    if isinstance(data, DataLoader):
        batch_size = data.batch_size or 1
    return max(1, math.ceil(samples / max(1, batch_size)))


def _workers(data: Any) -> int:
    """Worker processes an indexable dataset asks to be read with (``num_workers`` attribute)."""
    n = getattr(data, "num_workers", 0)
    return int(n) if isinstance(n, int) and n > 0 else 0


def index_batches(data: Any, batches: Sequence[torch.Tensor]) -> Iterator[Batch]:
    """``(x, y)`` for each batch of indices of an indexable ``data``, in order.

    An ImageDataset (anything with a ``batch(idx)`` method) gathers in memory; a tensor is
    indexed; any other map-style dataset is collated like a ``DataLoader`` -- through a
    ``DataLoader`` with ``data.num_workers`` processes when that attribute is above 0 (the
    batches are then decoded in parallel, a few ahead), else in this process.
    """
    if isinstance(data, torch.Tensor):
        for idx in batches:
            yield data[idx], None
        return
    if callable(getattr(data, "batch", None)):
        for idx in batches:
            yield data.batch(idx)
        return
    workers = _workers(data)
    if workers and batches:
        loader = DataLoader(data, batch_sampler=[[int(i) for i in idx] for idx in batches],
                            num_workers=min(workers, len(batches)))
        for item in loader:
            yield _split(item)
        return
    for idx in batches:
        yield _split(default_collate([data[int(i)] for i in idx]))


def _cut(items: Iterable[Any], n: int) -> Iterator[Batch]:
    """The batches of a loader, the last one cut so that exactly ``n`` inputs come out."""
    seen = 0
    for item in items:
        x, y = _split(item)
        take = min(len(x), n - seen)
        yield x[:take], (y[:take] if y is not None else None)
        seen += take
        if seen >= n:
            return


def iter_batches(data: Any, samples: int | None = None, batch_size: int = 64) -> Iterator[Batch]:
    """The first ``samples`` inputs of ``data`` (all when ``None``), as ``(x, y)`` batches.

    Parameters
    ----------
    data : ImageDataset, Dataset, DataLoader, Tensor or Selection
        Where the inputs come from; a ``DataLoader`` (and a :class:`Selection`) keeps its own
        batch size, order and workers (the last batch is cut to ``samples``).
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
    if isinstance(data, Selection):  # a fixed selection: its own batches, cut to n
        yield from _cut(data, n)
        return
    if isinstance(data, DataLoader):
        yield from _cut(data, n)
        return
    yield from index_batches(data, list(torch.arange(n).split(batch_size)))


class Selection:
    """A fixed set of inputs of some data, read in the same batches on every pass.

    Made by :func:`select`. Iterating yields ``(x, y)`` batches (``y`` ``None`` without labels);
    ``len`` is the number of inputs; ``indices`` the chosen indices of an indexable dataset
    (``None`` for a loader read as it is).
    """

    def __init__(self, data: Any, batches: list[torch.Tensor] | None, n: int,
                 loader: DataLoader | None = None) -> None:
        self.data, self.batches, self.n, self._loader = data, batches, n, loader

    @property
    def indices(self) -> torch.Tensor | None:
        if self.batches is None:
            return None
        return torch.cat(self.batches) if self.batches else torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Batch]:
        if self._loader is not None:
            if self.batches is None:  # an iterable loader, read as it is
                yield from _cut(self._loader, self.n)
                return
            yield from (_split(item) for item in _frozen_loader(self._loader, self.batches))
            return
        yield from index_batches(self.data, self.batches)


def _frozen_loader(loader: DataLoader, batches: list[torch.Tensor]) -> DataLoader:
    """``loader``'s settings (collate function, workers ...) over fixed batches of indices."""
    workers = loader.num_workers
    kw: dict[str, Any] = {}
    if workers > 0:
        kw.update(prefetch_factor=loader.prefetch_factor,
                  multiprocessing_context=loader.multiprocessing_context)
    return DataLoader(loader.dataset, batch_sampler=[[int(i) for i in b] for b in batches],
                      num_workers=workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, **kw)


def select(data: Any, samples: int | None = None, batch_size: int = 64, *,
           generator: torch.Generator | None = None) -> Selection:
    """``samples`` inputs of ``data`` (all when ``None``), fixed so that every pass over the
    returned :class:`Selection` reads the same inputs in the same batches.

    Parameters
    ----------
    data : ImageDataset, Dataset, DataLoader or Tensor
    samples : int, optional
    batch_size : int
        Batch size for indexable data (a ``DataLoader`` keeps its own).
    generator : torch.Generator, optional
        For indexable data: choose a random subset, ``torch.randperm(len(data),
        generator=generator)[:samples]`` in that order; without it, the first ``samples``.
        Ignored for a ``DataLoader``.

    Returns
    -------
    Selection

    Notes
    -----
    A ``DataLoader`` over a map-style dataset contributes the first ``samples`` indices its
    sampler yields (drawn once: a shuffling loader gives one random subset, kept for every
    pass), read with its own batch size, collate function and workers; without shuffling these
    are its first ``samples`` inputs in order, exactly what iterating it gives. A loader over an
    ``IterableDataset`` (or without automatic batching) is iterated as it is on every pass, so
    it must yield the same inputs each time. Random per-sample transforms in the dataset make
    passes differ: calibrate with deterministic preprocessing.
    """
    n = count(data, samples)
    if n <= 0:
        raise DataError("the data set is empty")
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset) or data.batch_sampler is None:
            return Selection(data, None, n, loader=data)
        batches, seen = [], 0
        for b in data.batch_sampler:
            b = torch.as_tensor(list(b), dtype=torch.long)[:n - seen]
            batches.append(b)
            seen += len(b)
            if seen >= n:
                break
        return Selection(data, batches, seen, loader=data)
    if generator is not None:
        idx = torch.randperm(count(data), generator=generator)[:n]
    else:
        idx = torch.arange(n)
    return Selection(data, list(idx.split(batch_size)), n)


def first_input(data: Any) -> torch.Tensor:
    """One input of ``data``, batch dimension kept (``[1, ...]``; for tracing: any input does)."""
    if isinstance(data, DataLoader) and callable(getattr(data.dataset, "example_input", None)):
        return data.dataset.example_input(1)  # no worker start for one image
    if callable(getattr(data, "example_input", None)):
        return data.example_input(1)
    x, _ = next(iter_batches(data, 1, 1))
    return x[:1]


__all__ = ["Batch", "Selection", "count", "first_input", "index_batches", "is_empty", "is_loader",
           "iter_batches", "labels_of", "num_batches", "select"]

"""An image folder read lazily: each image is decoded, resized and normalised when it is read.

:func:`stream_image_folder` understands exactly the layouts, classes and train/test split of
:func:`prunekit.data.folder.load_image_folder` and decodes each image the same way (Pillow,
converted to RGB -- or grayscale ``L`` -- and fitted to ``image_size`` by
:func:`~prunekit.data.folder.fit_image`: aspect ratio kept, centre crop), so a streamed item equals the
in-memory dataset's item bit for bit when both use the same mean and std. Nothing but the file
list is kept in memory: the datasets carry ``num_workers``, and prunekit's data helpers
(:mod:`prunekit.data.batches`, the trainer) read them through a ``DataLoader`` with that many
worker processes, so memory is bounded by a few batches, not by the folder.

Two choices differ from the in-memory loader because they would otherwise need every image:

* **mean and standard deviation** are measured on a bounded, deterministic sample of the
  training images (at most ``stats_samples``, default 1000, evenly spaced over the sorted file
  list; exact per-channel histograms of the resized ``uint8`` pixels). A folder with at most
  that many training images gets the in-memory values (equal up to float round-off). Fixed
  values such as ImageNet's can be given instead (``mean=``, ``std=``);
* **grayscale or colour** is decided on the same sample: one channel when every sampled image
  is grayscale, else three (a colour image met later in a grayscale dataset is converted to
  grayscale; a grayscale one in a colour dataset is replicated, as in memory).

``prunekit.data.load("folder:PATH")`` streams automatically when the folder would not fit the
in-memory bound (:func:`prunekit.data.in_memory_limit`); ``"folder+stream:PATH"`` or
``stream=True`` always streams.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..utils import progress
from .folder import _decode, image_hw, scan_image_folder

STATS_SAMPLES = 1000
"""Training images (at most) the streamed mean and std are measured on."""

WORKERS_ENV = "PRUNEKIT_NUM_WORKERS"


def default_workers() -> int:
    """Decoding processes for a streamed folder: ``$PRUNEKIT_NUM_WORKERS``, else one less than
    the CPU count, at most 8 (0: decode in the reading process)."""
    env = os.environ.get(WORKERS_ENV)
    if env is not None:
        try:
            n = int(env)
        except ValueError:
            raise ConfigError(f"{WORKERS_ENV} must be a whole number, got {env!r}") from None
        if n < 0:
            raise ConfigError(f"{WORKERS_ENV} must be >= 0, got {n}")
        return n
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class ImageFolderStream(Dataset):
    """Image files with labels, decoded one at a time (see the module docstring).

    ``__getitem__`` returns ``(normalised float image [C, S, S], int label)``. The object
    offers what prunekit reads from its in-memory :class:`~prunekit.data.ImageDataset`:
    ``len``, ``num_classes``, ``classes``, ``name``, ``mean``, ``std``, ``in_channels``,
    ``image_size``, ``targets``, :meth:`example_input` and :meth:`subset`, and ``num_workers``
    (worker processes the data helpers read it with).
    """

    def __init__(self, root: str | os.PathLike, files: Sequence[str], labels: Sequence[int], *,
                 image_size: int | Sequence[int], gray: bool, mean: Sequence[float], std: Sequence[float],
                 classes: Sequence[str], name: str, num_workers: int | None = None) -> None:
        if len(files) != len(labels):
            raise DataError(f"{name}: {len(files)} files but {len(labels)} labels")
        self.root = str(root)
        # numpy arrays, not lists of Python objects: worker processes reading them do not touch
        # reference counts, so the forked pages stay shared (no copy-on-read growth)
        self._files = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)
        self._labels = np.asarray(labels, dtype=np.int64)
        self.size = image_hw(image_size)
        self.gray = bool(gray)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        channels = 1 if self.gray else 3
        if len(self.mean) != channels or len(self.std) != channels:
            raise ConfigError(f"{name}: mean and std need {channels} value(s), got {self.mean}, {self.std}")
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.name = name
        self.num_workers = default_workers() if num_workers is None else int(num_workers)
        self._mean_t = torch.tensor(self.mean).view(-1, 1, 1)
        self._std_t = torch.tensor(self.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def in_channels(self) -> int:
        return 1 if self.gray else 3

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size

    @property
    def targets(self) -> torch.Tensor:
        """All labels ``int64 [N]`` (cheap: no image is read)."""
        return torch.from_numpy(self._labels.copy())

    def path(self, i: int) -> Path:
        return Path(self.root) / os.fsdecode(bytes(self._files[i]))

    def raw(self, i: int) -> torch.Tensor:
        """Image ``i`` decoded and resized, ``uint8 [C, S, S]``."""
        a, is_gray = _decode(self.path(i), self.size)
        if self.gray and not is_gray:
            a = np.asarray(Image.fromarray(a).convert("L"), dtype=np.uint8)
        if self.gray:
            out = a[None]
        else:
            out = (a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2)).transpose(2, 0, 1)
        return torch.from_numpy(np.array(out, dtype=np.uint8, order="C"))  # a writable copy

    def normalize(self, image_u8: torch.Tensor) -> torch.Tensor:
        """uint8 [C, H, W] (or [B, C, H, W]) -> normalised float32, the ImageDataset's formula."""
        x = image_u8.float().div_(255.0)
        return (x - self._mean_t) / self._std_t

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        return self.normalize(self.raw(i)), int(self._labels[i])

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A normalised batch of the first images, for tracing and profiling."""
        return torch.stack([self[i][0] for i in range(min(batch_size, len(self)))])

    def subset(self, n_or_indices: int | Sequence[int] | torch.Tensor) -> ImageFolderStream:
        """The first ``n`` items (an ``int``) or the given indices; same mean, std and classes."""
        if isinstance(n_or_indices, int):
            if n_or_indices <= 0:
                raise ConfigError(f"sample count must be positive, got {n_or_indices}")
            idx = np.arange(min(n_or_indices, len(self)))
        else:
            idx = torch.as_tensor(n_or_indices, dtype=torch.long).numpy()
            if idx.size == 0:
                raise DataError(f"{self.name}: empty subset")
        return ImageFolderStream(self.root, [os.fsdecode(bytes(f)) for f in self._files[idx]],
                                 self._labels[idx].tolist(), image_size=self.size, gray=self.gray,
                                 mean=self.mean, std=self.std, classes=self.classes, name=self.name,
                                 num_workers=self.num_workers)

    def __repr__(self) -> str:
        return (f"ImageFolderStream({self.name!r}, n={len(self)}, shape=({self.in_channels}, "
                f"{self.size[0]}, {self.size[1]}), classes={self.num_classes}, "
                f"workers={self.num_workers})")


def _sample_positions(n: int, k: int) -> list[int]:
    """At most ``k`` positions spread evenly over ``range(n)`` (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def _measure(files: list[Path], size: int, threads: int, desc: str
             ) -> tuple[bool, list[float], list[float]]:
    """Gray or not, and per-channel mean/std in [0, 1] units of ``files`` resized to ``size``,
    from exact pixel histograms (a std below 1e-6 is taken as 1, as in memory)."""
    with ThreadPoolExecutor(max(1, threads)) as pool:  # Pillow decodes with the GIL released
        decoded = list(progress(pool.map(lambda f: _decode(f, size), files), desc=desc,
                                total=len(files)))
    gray = all(g for _, g in decoded)
    channels = 1 if gray else 3
    hist = np.zeros((channels, 256), dtype=np.int64)
    for a, _ in decoded:
        if gray:
            hist[0] += np.bincount(a.reshape(-1), minlength=256)
        else:
            a3 = a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2)
            for c in range(3):
                hist[c] += np.bincount(a3[:, :, c].reshape(-1), minlength=256)
    levels = np.arange(256, dtype=np.float64) / 255.0
    total = hist.sum(1).astype(np.float64)
    mean = (hist * levels).sum(1) / total
    var = (hist * (levels[None, :] - mean[:, None]) ** 2).sum(1) / total
    std = np.sqrt(var)
    std = np.where(std > 1e-6, std, 1.0)
    return gray, mean.tolist(), std.tolist()


def stream_image_folder(path: str | os.PathLike, image_size: int | Sequence[int] = 32, *,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                        stats_samples: int = STATS_SAMPLES, num_workers: int | None = None,
                        ) -> tuple[ImageFolderStream, ImageFolderStream]:
    """The ``(train, test)`` splits of an image folder as lazily decoding datasets.

    Parameters
    ----------
    path : path
        The dataset folder (layouts: :mod:`prunekit.data.folder`).
    image_size : int or (int, int)
        Side of the square, or ``(height, width)``, every image is fitted to.
    mean, std : sequence of float, optional
        Fixed normalisation (one value per channel, in [0, 1] units; e.g. ImageNet's
        ``(0.485, 0.456, 0.406)``, ``(0.229, 0.224, 0.225)``); both or neither. Default:
        measured on at most ``stats_samples`` training images.
    stats_samples : int
        Training images decoded up front to measure mean/std and decide gray or colour.
    num_workers : int, optional
        Decoding processes the data helpers read with (default :func:`default_workers`).

    Returns
    -------
    train, test : ImageFolderStream
        Sharing mean, std and classes.

    Raises
    ------
    DataError
        As :func:`~prunekit.data.folder.load_image_folder` (a file that cannot be decoded is
        reported when it is read).
    ConfigError
        A non-positive ``image_size`` or ``stats_samples``, or only one of ``mean`` / ``std``.
    """
    image_size = image_hw(image_size)
    if isinstance(stats_samples, bool) or not isinstance(stats_samples, int) or stats_samples <= 0:
        raise ConfigError(f"stats_samples must be a positive integer, got {stats_samples!r}")
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std, or neither")
    root, classes, train_items, test_items = scan_image_folder(path)
    workers = default_workers() if num_workers is None else int(num_workers)
    sample = [train_items[i][0] for i in _sample_positions(len(train_items), stats_samples)]
    gray, m, s = _measure(sample, image_size, workers, f"measuring {root.name}")
    if mean is not None:
        m, s = [float(v) for v in mean], [float(v) for v in std]
        if any(v <= 0 for v in s):
            raise ConfigError(f"std must be positive, got {s}")
        if len(m) == 3 and gray:
            gray = False  # colour statistics given: read the images as RGB
        elif len(m) == 1 and not gray:
            gray = True
    common = dict(image_size=image_size, gray=gray, mean=m, std=s, classes=classes,
                  name=f"folder:{root}", num_workers=workers)

    def split(items: list[tuple[Path, int]]) -> ImageFolderStream:
        return ImageFolderStream(root, [f.relative_to(root).as_posix() for f, _ in items],
                                 [y for _, y in items], **common)

    return split(train_items), split(test_items)


__all__ = ["STATS_SAMPLES", "ImageFolderStream", "default_workers", "stream_image_folder"]

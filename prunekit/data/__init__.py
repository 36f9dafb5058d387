"""Datasets: Fashion-MNIST, CIFAR-10/100 and image folders.

Everything is read from local files; nothing is ever downloaded. :func:`load` is the entry
point::

    train, test = prunekit.data.load("fashion-mnist", train_samples=5000)
    x, y = train.batch(range(128))          # normalised float [128, 1, 28, 28], int64 [128]

The built-in datasets and small image folders are held in memory as ``uint8`` tensors
(:class:`ImageDataset`); an image folder too large for that is streamed
(:class:`~prunekit.data.stream.ImageFolderStream`: decoded image by image in worker processes).
Every method also takes any map-style ``Dataset`` or ``DataLoader`` of its own
(:mod:`prunekit.data.batches`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .augment import random_crop_flip
from .cifar import load_cifar10, load_cifar100
from .dataset import ImageDataset
from .fashion_mnist import load_fashion_mnist
from .folder import load_image_folder
from .locate import ENV_VAR
from .stream import ImageFolderStream, stream_image_folder

DATASETS: list[str] = ["fashion-mnist", "cifar10", "cifar100", "folder:PATH", "images:PATH"]
"""Names :func:`load` accepts; ``folder:PATH`` stands for any image folder path (one sub-folder
per class), ``images:PATH`` for unlabeled images (calibration only: no test set)."""

_ALIASES = {
    "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar10": "cifar10", "cifar-10": "cifar10", "cifar_10": "cifar10",
    "cifar100": "cifar100", "cifar-100": "cifar100", "cifar_100": "cifar100",
}
_LOADERS = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10, "cifar100": load_cifar100}

__all__ = ["DATASETS", "ENV_VAR", "MEMORY_ENV", "ImageDataset", "ImageFolderStream", "in_memory_limit",
           "load", "load_cifar10", "load_cifar100", "load_fashion_mnist", "load_image_folder",
           "random_crop_flip", "resize", "stream_image_folder"]

MEMORY_ENV = "PRUNEKIT_IN_MEMORY_LIMIT"
DEFAULT_IN_MEMORY_LIMIT = 2 * 1024**3
"""Bytes of ``uint8`` pixels up to which ``folder:PATH`` is loaded into memory (2 GiB)."""


def in_memory_limit() -> int:
    """Bytes of decoded ``uint8`` pixels up to which ``folder:PATH`` is held in memory:
    ``$PRUNEKIT_IN_MEMORY_LIMIT`` (bytes, or with a ``K``/``M``/``G`` suffix; ``0``: always
    stream), else 2 GiB."""
    raw = os.environ.get(MEMORY_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_IN_MEMORY_LIMIT
    text = raw.strip().upper().removesuffix("B")
    scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise ConfigError(f"{MEMORY_ENV} must be a byte count such as 4G or 500M, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{MEMORY_ENV} must be >= 0, got {raw!r}")
    return int(value)


def _folder_bytes(path: str, size: int | tuple[int, int]) -> int:
    """``uint8`` bytes an image folder takes in memory at ``size`` (three channels assumed)."""
    from .folder import image_hw, scan_image_folder

    _, _, train_items, test_items = scan_image_folder(path)
    h, w = image_hw(size)
    return (len(train_items) + len(test_items)) * 3 * h * w


def resize(dataset: ImageDataset, size: int, chunk: int = 4096) -> ImageDataset:
    """A copy of ``dataset`` with every image resized (bilinear, antialiased) to ``size`` square.

    Mean, std, classes and labels are kept. Returns ``dataset`` itself when nothing changes.
    """
    if dataset.image_size == (size, size):
        return dataset
    parts = []
    for start in range(0, len(dataset), chunk):
        x = dataset.images[start:start + chunk].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        parts.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return ImageDataset(torch.cat(parts), dataset.targets, mean=dataset.mean, std=dataset.std,
                        num_classes=dataset.num_classes, name=dataset.name, classes=dataset.classes)


def load(name: str, root: str | os.PathLike | None = None, train_samples: int | None = None,
         image_size: int | None = None, stream: bool | None = None):
    """Load a dataset from local files as ``(train, test)``.

    Parameters
    ----------
    name : str
        ``"fashion-mnist"``, ``"cifar10"``, ``"cifar100"`` (case and ``-``/``_`` spellings such
        as ``"CIFAR-10"`` are accepted) or ``"folder:PATH"`` for an image folder
        (``"folder+stream:PATH"``: the same folder, always streamed).
    root : path, optional
        Directory holding the dataset's files (or their conventional folder). Without it:
        ``$PRUNEKIT_DATA/<folder>``, ``$PRUNEKIT_DATA``, then the dataset's default place
        (``/usr/share/datasets/fashion-mnist``, ``~/.cache/prunekit/cifar-10-batches-py``,
        ``~/.cache/prunekit/cifar-100-python``). Ignored for ``folder:PATH``.
    train_samples : int, optional
        Keep only the first ``train_samples`` training images (quick runs).
    image_size : int or (int, int), optional
        Image size: a square side, or ``(height, width)`` for image folders (each image is
        resized with its aspect ratio kept and centre-cropped, see
        :func:`~prunekit.data.folder.fit_image`). Image folders default to 32; the built-in
        datasets keep their native size (28 or 32) unless asked (a square).
    stream : bool, optional
        Image folders only. ``True``: read lazily, image by image
        (:func:`~prunekit.data.stream.stream_image_folder`: memory bounded by a few batches;
        mean/std measured on at most 1000 training images); ``False``: decode everything into
        memory (:func:`~prunekit.data.folder.load_image_folder`); ``None`` (default): stream
        when the decoded folder (images x 3 x size x size bytes) would exceed
        :func:`in_memory_limit` (2 GiB unless ``$PRUNEKIT_IN_MEMORY_LIMIT`` says otherwise).

    Returns
    -------
    train, test : ImageDataset or ImageFolderStream
        ``uint8`` images ``[N, C, H, W]`` with labels, mean/std and class names, or their
        streamed equivalent (same items, same attributes but ``images``).

    Raises
    ------
    ConfigError
        Unknown name (the message lists :data:`DATASETS`), non-positive ``train_samples``
        or ``image_size``, ``stream=True`` for a built-in dataset.
    DataError
        Data missing (the message names every searched place and how to get it), corrupt,
        or a pickle carrying code.

    Examples
    --------
    >>> train, test = load("fashion-mnist", train_samples=1000)  # doctest: +SKIP
    >>> train.images.shape                                         # doctest: +SKIP
    torch.Size([1000, 1, 28, 28])
    """
    if train_samples is not None and (isinstance(train_samples, bool) or train_samples <= 0):
        raise ConfigError(f"train_samples must be positive, got {train_samples}")
    if image_size is not None:
        from .folder import image_hw

        hw = image_hw(image_size)
        image_size = hw[0] if hw[0] == hw[1] else hw
    if not isinstance(name, str):
        raise ConfigError(f"dataset name must be a string, got {name!r}")
    if stream is not None and not isinstance(stream, bool):
        raise ConfigError(f"stream must be True, False or None, got {stream!r}")
    lowered = name.strip().lower()
    if lowered.startswith("images:"):  # unlabeled calibration images: no test set, no labels
        from .unlabeled import UnlabeledImages

        path = name.strip()[len("images:"):]
        if not path:
            raise ConfigError("images: needs a path, as in images:/data/calibration")
        images = UnlabeledImages(path, image_size=image_size or 32)
        if train_samples is not None:
            images.files = images.files[:int(train_samples)]
        return images, None
    prefix = next((p for p in ("folder:", "folder+stream:") if lowered.startswith(p)), None)
    if prefix is not None:
        path = name.strip()[len(prefix):]
        if not path:
            raise ConfigError(f"{prefix} needs a path, as in {prefix}/data/my-images")
        if prefix == "folder+stream:":
            if stream is False:
                raise ConfigError(f"{name!r} asks for streaming but stream=False was given")
            stream = True
        size = image_size or 32
        if stream is None:
            stream = _folder_bytes(path, size) > in_memory_limit()
        if stream:
            train, test = stream_image_folder(path, image_size=size)
            if train_samples is not None:
                train = train.subset(int(train_samples))
            return train, test
        train, test = load_image_folder(path, image_size=size)
    else:
        if stream:
            raise ConfigError(f"stream=True applies to image folders; {name!r} is a built-in "
                              "dataset, always held in memory")
        key = _ALIASES.get(lowered)
        if key is None:
            raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
        train, test = _LOADERS[key](root)
    if train_samples is not None:
        train = train.subset(int(train_samples))
    if image_size is not None and prefix is None:  # a folder was read at its size
        if not isinstance(image_size, int):
            raise ConfigError(f"a built-in dataset is resized to a square; got image_size {image_size!r}")
        train, test = resize(train, image_size), resize(test, image_size)
    return train, test

"""Datasets: Fashion-MNIST, CIFAR-10/100 and image folders, as in-memory ``uint8`` tensors.

Everything is read from local files; nothing is ever downloaded. :func:`load` is the entry
point::

    train, test = prunekit.data.load("fashion-mnist", train_samples=5000)
    x, y = train.batch(range(128))          # normalised float [128, 1, 28, 28], int64 [128]
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

DATASETS: list[str] = ["fashion-mnist", "cifar10", "cifar100", "folder:PATH"]
"""Names :func:`load` accepts; ``folder:PATH`` stands for any image folder path."""

_ALIASES = {
    "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar10": "cifar10", "cifar-10": "cifar10", "cifar_10": "cifar10",
    "cifar100": "cifar100", "cifar-100": "cifar100", "cifar_100": "cifar100",
}
_LOADERS = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10, "cifar100": load_cifar100}

__all__ = ["DATASETS", "ENV_VAR", "ImageDataset", "load", "load_cifar10", "load_cifar100",
           "load_fashion_mnist", "load_image_folder", "random_crop_flip", "resize"]


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
         image_size: int | None = None) -> tuple[ImageDataset, ImageDataset]:
    """Load a dataset from local files as ``(train, test)``.

    Parameters
    ----------
    name : str
        ``"fashion-mnist"``, ``"cifar10"``, ``"cifar100"`` (case and ``-``/``_`` spellings such
        as ``"CIFAR-10"`` are accepted) or ``"folder:PATH"`` for an image folder.
    root : path, optional
        Directory holding the dataset's files (or their conventional folder). Without it:
        ``$PRUNEKIT_DATA/<folder>``, ``$PRUNEKIT_DATA``, then the dataset's default place
        (``/usr/share/datasets/fashion-mnist``, ``~/.cache/prunekit/cifar-10-batches-py``,
        ``~/.cache/prunekit/cifar-100-python``). Ignored for ``folder:PATH``.
    train_samples : int, optional
        Keep only the first ``train_samples`` training images (quick runs).
    image_size : int, optional
        Resize images to this square size. Image folders default to 32; the built-in
        datasets keep their native size (28 or 32) unless asked.

    Returns
    -------
    train, test : ImageDataset
        ``uint8`` images ``[N, C, H, W]`` with labels, mean/std and class names.

    Raises
    ------
    ConfigError
        Unknown name (the message lists :data:`DATASETS`), non-positive ``train_samples``
        or ``image_size``.
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
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size <= 0):
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    if not isinstance(name, str):
        raise ConfigError(f"dataset name must be a string, got {name!r}")
    if name.strip().lower().startswith("folder:"):
        path = name.strip()[len("folder:"):]
        if not path:
            raise ConfigError("folder: needs a path, as in folder:/data/my-images")
        train, test = load_image_folder(path, image_size=image_size or 32)
    else:
        key = _ALIASES.get(name.strip().lower())
        if key is None:
            raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
        train, test = _LOADERS[key](root)
    if train_samples is not None:
        train = train.subset(int(train_samples))
    if image_size is not None:
        train, test = resize(train, image_size), resize(test, image_size)
    return train, test

"""CIFAR-10 and CIFAR-100 from the standard "python version" batches in a local folder.

The batches are pickles; they are read with :mod:`prunekit.data.safe_pickle`, which refuses
any pickle that names something other than NumPy arrays and plain containers.

References
----------
A. Krizhevsky. "Learning Multiple Layers of Features from Tiny Images", tech. report, 2009.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .dataset import ImageDataset
from .locate import ENV_VAR, cache_dir, find_dataset_dir
from .safe_pickle import load_pickle

# Per-channel mean and standard deviation of the training pixels (in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _get(d: dict, key: str) -> Any:
    """``d[b"key"]`` (Python 2 pickles read with ``encoding="bytes"``) or ``d["key"]``."""
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 3, 32, 32]`` and labels ``int64 [N]`` of one batch file."""
    batch = load_pickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict, found {type(batch).__name__}; not a CIFAR batch")
    data, labels = _get(batch, "data"), _get(batch, label_key)
    if data is None or labels is None:
        raise DataError(f"{path}: missing 'data' or '{label_key}'; not a CIFAR python batch")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' is {data.dtype} {list(data.shape)}, expected uint8 [N, 3072]")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: '{label_key}' are not integers ({e})") from e
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels span {labels.min()}..{labels.max()}, expected "
                        f"0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_split(root: Path, files: tuple[str, ...], label_key: str, num_classes: int,
                mean: tuple[float, ...], std: tuple[float, ...], name: str,
                classes: list[str]) -> ImageDataset:
    parts = [_read_batch(root / f, label_key, num_classes) for f in files]
    images = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    labels = np.concatenate([p[1] for p in parts])
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), mean=mean, std=std,
                        num_classes=num_classes, name=name, classes=classes)


def _class_names(meta_path: Path, key: str, fallback: list[str]) -> list[str]:
    """Class names from the meta file when present and well-formed, else ``fallback``."""
    if not meta_path.is_file():
        return fallback
    meta = load_pickle(meta_path)
    names = _get(meta, key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != len(fallback):
        raise DataError(f"{meta_path}: '{key}' should list {len(fallback)} class names")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def _how_to_get(title: str, folder: str, tarball: str) -> str:
    return (f"put the python version of {title} ({folder}, unpacked from {tarball}) at "
            f"{cache_dir() / folder} or in ${ENV_VAR}, or pass --data-dir (root=); "
            "prunekit never downloads")


def load_cifar10(root: str | os.PathLike | None = None) -> tuple[ImageDataset, ImageDataset]:
    """Load CIFAR-10 from ``data_batch_1..5``, ``test_batch`` and (optional) ``batches.meta``.

    Parameters
    ----------
    root : path, optional
        The ``cifar-10-batches-py`` folder or a directory containing it. Without it:
        ``$PRUNEKIT_DATA/cifar-10-batches-py``, ``$PRUNEKIT_DATA``, then
        ``~/.cache/prunekit/cifar-10-batches-py``.

    Returns
    -------
    train, test : ImageDataset
        ``uint8 [50000, 3, 32, 32]`` and ``[10000, 3, 32, 32]``, labels 0..9.

    Raises
    ------
    DataError
        Files missing (the message lists the searched places), corrupt, or carrying code.
    """
    how = _how_to_get("CIFAR-10", CIFAR10_FOLDER, "cifar-10-python.tar.gz")
    d = find_dataset_dir("CIFAR-10", root, (CIFAR10_FOLDER,), cache_dir() / CIFAR10_FOLDER,
                         (*CIFAR10_TRAIN, "test_batch"), how)
    classes = _class_names(d / "batches.meta", "label_names", list(CIFAR10_CLASSES))
    common = dict(label_key="labels", num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                  name="cifar10", classes=classes)
    return _read_split(d, CIFAR10_TRAIN, **common), _read_split(d, ("test_batch",), **common)


def load_cifar100(root: str | os.PathLike | None = None) -> tuple[ImageDataset, ImageDataset]:
    """Load CIFAR-100 (the 100 fine labels) from ``train``, ``test`` and (optional) ``meta``.

    Parameters
    ----------
    root : path, optional
        The ``cifar-100-python`` folder or a directory containing it. Without it:
        ``$PRUNEKIT_DATA/cifar-100-python``, ``$PRUNEKIT_DATA``, then
        ``~/.cache/prunekit/cifar-100-python``.

    Returns
    -------
    train, test : ImageDataset
        ``uint8 [50000, 3, 32, 32]`` and ``[10000, 3, 32, 32]``, labels 0..99.

    Raises
    ------
    DataError
        Files missing (the message lists the searched places), corrupt, or carrying code.
    """
    how = _how_to_get("CIFAR-100", CIFAR100_FOLDER, "cifar-100-python.tar.gz")
    d = find_dataset_dir("CIFAR-100", root, (CIFAR100_FOLDER,), cache_dir() / CIFAR100_FOLDER,
                         ("train", "test"), how)
    classes = _class_names(d / "meta", "fine_label_names", [str(i) for i in range(100)])
    common = dict(label_key="fine_labels", num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD,
                  name="cifar100", classes=classes)
    return _read_split(d, ("train",), **common), _read_split(d, ("test",), **common)

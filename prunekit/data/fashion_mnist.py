"""Fashion-MNIST from its four IDX files (plain or gzipped), read straight into tensors.

The Debian package ``dataset-fashion-mnist`` installs the gzipped files under
``/usr/share/datasets/fashion-mnist``; that is the default location.

References
----------
H. Xiao, K. Rasul, R. Vollgraf. "Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms", arXiv:1708.07747, 2017. The IDX format is the one of MNIST
(Y. LeCun et al.).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import ImageDataset
from .locate import ENV_VAR, find_dataset_dir

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` puts the files."""

MEAN = (0.2860,)
STD = (0.3530,)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped or not) into an array.

    Parameters
    ----------
    path : path
        The file. Gzip compression is recognised from the content, not the name.
    magic : int
        The expected magic number: 2051 for ``[N, rows, cols]`` images, 2049 for ``[N]``
        labels. Its last byte is the number of dimensions.

    Returns
    -------
    ndarray of uint8
        Shape given by the header; a writable copy.

    Raises
    ------
    DataError
        Naming the file, when it cannot be read or decompressed, has another magic number,
        or its length does not match its header (truncated or padded).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except OSError as e:  # includes gzip.BadGzipFile
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    except (EOFError, zlib.error) as e:
        raise DataError(f"cannot decompress {path}: truncated or corrupt gzip ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header (truncated)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: magic number {found}, expected {magic}; not the right IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes, too short for its {ndim}-D IDX header (truncated)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(dims)
    if len(raw) != header + count:
        raise DataError(f"{path}: {len(raw)} bytes but its header {list(dims)} needs "
                        f"{header + count} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(dims).copy()


def _file(root: Path, name: str) -> Path:
    """``root/name`` when present, else ``root/name.gz``."""
    plain = root / name
    return plain if plain.is_file() else root / (name + ".gz")


def _read_split(root: Path, split: str) -> ImageDataset:
    img_name, lbl_name = FILES[split]
    img_path, lbl_path = _file(root, img_name), _file(root, lbl_name)
    images = read_idx(img_path, IDX_IMAGES_MAGIC)
    labels = read_idx(lbl_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{img_path}: images are {images.shape[1]}x{images.shape[2]}, "
                        "Fashion-MNIST images are 28x28")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{lbl_path}: {labels.shape[0]} labels for {images.shape[0]} images "
                        f"in {img_path}")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise DataError(f"{lbl_path}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
    return ImageDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long(),
                        mean=MEAN, std=STD, num_classes=len(CLASSES),
                        name="fashion-mnist", classes=CLASSES)


def find_root(root: str | os.PathLike | None = None) -> Path:
    """The directory holding the four Fashion-MNIST files (see :func:`load_fashion_mnist`)."""
    required = [n for pair in FILES.values() for n in pair]
    return find_dataset_dir(
        "Fashion-MNIST", root, ("fashion-mnist", "FashionMNIST/raw"), DEFAULT_ROOT, required,
        suffixes=("", ".gz"),
        how_to_get=("install it with `apt-get install dataset-fashion-mnist`, or put the four "
                    "IDX files (train-images-idx3-ubyte[.gz], ...) in a folder and pass "
                    f"--data-dir (root=) or set {ENV_VAR}"))


def load_fashion_mnist(root: str | os.PathLike | None = None) -> tuple[ImageDataset, ImageDataset]:
    """Load Fashion-MNIST from local IDX files.

    Parameters
    ----------
    root : path, optional
        A directory holding the files, or holding a ``fashion-mnist`` folder with them.
        Without it: ``$PRUNEKIT_DATA/fashion-mnist``, ``$PRUNEKIT_DATA``, then
        ``/usr/share/datasets/fashion-mnist``.

    Returns
    -------
    train, test : ImageDataset
        ``uint8 [60000, 1, 28, 28]`` and ``[10000, 1, 28, 28]`` with labels 0..9.

    Raises
    ------
    DataError
        Files missing (the message lists the searched places), unreadable or corrupt.
    """
    d = find_root(root)
    return _read_split(d, "train"), _read_split(d, "test")

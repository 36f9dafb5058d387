"""An image folder: one sub-folder per class, images decoded with Pillow into memory.

(:mod:`prunekit.data.stream` reads the same layouts lazily, one image at a time, for folders
too large for memory.)

Layouts understood, for ``folder:PATH``:

* ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (``val`` is accepted for ``test``);
* ``PATH/train/<class>/*`` alone, or ``PATH/<class>/*`` with no split: a deterministic split
  puts every fifth image of each class (in sorted file-name order: the 5th, 10th, ...) in the
  test set and the other four fifths in the training set. The two sets never overlap.

Classes are the sorted names of the training sub-folders; files may sit in nested folders
below a class folder. Every image is converted to RGB, or to grayscale ``L`` when all images
of both splits are grayscale, and fitted to ``image_size`` (a side, or ``(height, width)``) by
:func:`fit_image`: resized (bilinear) keeping its aspect ratio until it covers the size, then
centre-cropped (an image of the target's shape is only resized). Mean and standard deviation
are measured on the training images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError
from ..utils import progress
from .dataset import ImageDataset

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm"})
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "F"})
TEST_EVERY = 5
"""Without a ``test`` folder, image ``i`` of each class goes to test when ``i % 5 == 4``."""


def _visible_subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(d: Path) -> list[Path]:
    """Image files below ``d`` (recursively), sorted by relative path; hidden ones skipped."""
    found = [p for p in d.rglob("*")
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
             and not any(part.startswith(".") for part in p.relative_to(d).parts)]
    return sorted(found, key=lambda p: p.relative_to(d).as_posix())


def _scan(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and ``(file, label)`` pairs of one split folder.

    With ``classes=None`` the folder defines the classes and each must hold an image;
    otherwise (a test folder) its class folders must be among ``classes`` and may be empty.
    """
    dirs = _visible_subdirs(split_dir)
    names = [d.name for d in dirs]
    defining = classes is None
    if classes is None:
        if not names:
            raise DataError(f"{split_dir}: no class sub-folders (expected {split_dir}/<class>/<images>)")
        classes = names
    else:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise DataError(f"{split_dir}: class folders {unknown} do not exist in the training set")
    index = {c: i for i, c in enumerate(classes)}
    items: list[tuple[Path, int]] = []
    for d in dirs:
        files = _images_under(d)
        if not files and defining:
            raise DataError(f"{d}: class folder holds no images "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
        items.extend((f, index[d.name]) for f in files)
    return classes, items


def _split(items: list[tuple[Path, int]]) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Every fifth image of each class (by sorted position) to test, the rest to train."""
    seen: dict[int, int] = {}
    train, test = [], []
    for f, y in items:
        k = seen.get(y, 0)
        seen[y] = k + 1
        (test if k % TEST_EVERY == TEST_EVERY - 1 else train).append((f, y))
    return train, test


def image_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from a side or a ``(height, width)`` pair.

    Raises
    ------
    ConfigError
        Not a positive integer or a pair of them.
    """
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in pair):
        raise ConfigError(f"image_size must be a positive integer or a (height, width) pair of them, "
                          f"got {size!r}")
    return int(pair[0]), int(pair[1])


def fit_image(im: Image.Image, size: int | Sequence[int]) -> Image.Image:
    """``im`` resized (bilinear) to cover ``size`` with its aspect ratio kept, then
    centre-cropped to exactly ``size`` (a side or ``(height, width)``), as the resize and
    centre-crop of the usual evaluation transforms; an image of the target's aspect ratio is
    only resized."""
    h, w = image_hw(size)
    scale = max(h / im.height, w / im.width)
    nw, nh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
    if (nw, nh) != im.size:
        im = im.resize((nw, nh), Image.BILINEAR)
    if (nw, nh) == (w, h):
        return im
    left, top = (nw - w) // 2, (nh - h) // 2
    return im.crop((left, top, left + w, top + h))


def _decode(path: Path, size: int | Sequence[int]) -> tuple[np.ndarray, bool]:
    """``uint8 [H, W]`` for a grayscale file or ``[H, W, 3]`` (:func:`fit_image` to ``size``);
    and whether it is gray."""
    try:
        with Image.open(path) as im:
            gray = im.mode in GRAY_MODES
            im = fit_image(im.convert("L" if gray else "RGB"), size)
            return np.asarray(im, dtype=np.uint8), gray
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from e


def _stack(arrays: list[np.ndarray], gray: bool) -> torch.Tensor:
    """``uint8 [N, C, H, W]``: one channel if ``gray``, else three (gray images replicated)."""
    if gray:
        out = np.stack(arrays)[:, None]
    else:
        out = np.stack([a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays])
        out = out.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(out))


def _mean_std(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units (std of a constant channel is taken as 1)."""
    c = images.shape[1]
    x = images.transpose(0, 1).reshape(c, -1).double().div_(255.0)
    mean = x.mean(dim=1)
    std = x.std(dim=1, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean.tolist(), std.tolist()


def scan_image_folder(path: str | os.PathLike) -> tuple[Path, list[str], list[tuple[Path, int]],
                                                   list[tuple[Path, int]]]:
    """The layout of an image folder, without decoding any image.

    Returns
    -------
    root, classes, train_items, test_items
        The folder, the sorted class names, and the ``(file, label)`` pairs of each split
        (see the module docstring for the layouts and the split rule).

    Raises
    ------
    DataError
        The folder is missing or holds no class folders / images, or a test class is unknown.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (expected {root}/train/<class>/<images>, "
                        f"{root}/test/<class>/<images>, or {root}/<class>/<images>)")
    train_dir = root / "train"
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if test_dir is not None and not train_dir.is_dir():
        raise DataError(f"{root}: has {test_dir.name}/ but no train/ folder")
    if train_dir.is_dir():
        classes, train_items = _scan(train_dir, None)
        if test_dir is not None:
            _, test_items = _scan(test_dir, classes)
        else:
            train_items, test_items = _split(train_items)
    else:
        classes, items = _scan(root, None)
        train_items, test_items = _split(items)
    if not train_items:
        raise DataError(f"{root}: no training images found")
    if not test_items:
        raise DataError(f"{root}: no test images (add {root}/test/<class>/<images>, "
                        f"or at least {TEST_EVERY} images in a class)")
    return root, classes, train_items, test_items


def load_image_folder(path: str | os.PathLike, image_size: int | Sequence[int] = 32
                      ) -> tuple[ImageDataset, ImageDataset]:
    """Load an image-per-file dataset into memory (see the module docstring for layouts).

    Parameters
    ----------
    path : path
        The dataset folder.
    image_size : int or (int, int)
        Side of the square, or ``(height, width)``, every image is fitted to
        (:func:`fit_image`: aspect ratio kept, centre crop).

    Returns
    -------
    train, test : ImageDataset
        ``uint8 [N, C, H, W]`` with ``C`` 1 (all grayscale) or 3; both use the training set's
        mean and std and list the same classes.

    Raises
    ------
    DataError
        The folder is missing or holds no class folders / images, a test class is unknown,
        or an image cannot be decoded (the message names the file).
    ConfigError
        ``image_size`` is not a positive integer.
    """
    image_size = image_hw(image_size)
    root, classes, train_items, test_items = scan_image_folder(path)
    decoded = [_decode(f, image_size) for f, _ in
               progress(train_items + test_items, desc=f"reading {root.name}")]
    gray = all(g for _, g in decoded)
    n = len(train_items)
    train_images = _stack([a for a, _ in decoded[:n]], gray)
    test_images = _stack([a for a, _ in decoded[n:]], gray)
    mean, std = _mean_std(train_images)
    common = dict(mean=mean, std=std, num_classes=len(classes), name=f"folder:{root}",
                  classes=classes)
    return (ImageDataset(train_images, torch.tensor([y for _, y in train_items]), **common),
            ImageDataset(test_images, torch.tensor([y for _, y in test_items]), **common))

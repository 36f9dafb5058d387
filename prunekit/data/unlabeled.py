"""Unlabeled images for calibration: ``images:PATH``, every image file below a folder.

Pruning without retraining (``--method reconstruct``) needs a few hundred images the model
normally sees and no labels. ``images:PATH`` reads every image file below ``PATH`` (nested
folders allowed, hidden files skipped, sorted by relative path), decoded on access (nothing but
the file list and the normalisation statistics is held in memory), converted to grayscale when
every image is grayscale (else RGB) or to the channels asked for, fitted to ``image_size``
(:func:`~prunekit.data.folder.fit_image`: aspect ratio kept, centre crop) and normalised by
the mean and standard deviation measured on up to ``stats_images`` of them, as
``folder:PATH`` does with its training images. Items are image tensors only: there is no
label to read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from .folder import GRAY_MODES, IMAGE_EXTENSIONS, fit_image, image_hw

__all__ = ["UnlabeledImages"]


def _files(root: Path) -> list[Path]:
    found = [p for p in root.rglob("*")
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class UnlabeledImages(Dataset):
    """Every image below ``root``, as normalised ``float32 [C, H, W]`` tensors (no labels).

    Parameters
    ----------
    root : str or PathLike
        The folder.
    image_size : int or (int, int)
        Side of the square, or ``(height, width)``, the images are fitted to.
    channels : {None, 1, 3}
        Force grayscale (1) or RGB (3); ``None``: grayscale when every image is.
    stats_images : int
        Images (the first ones) the per-channel mean and std are measured on.

    Raises
    ------
    DataError
        Missing folder, no image in it, or an image that cannot be decoded.
    """

    def __init__(self, root: str | os.PathLike, image_size: int | tuple[int, int] = 32,
                 channels: int | None = None,
                 stats_images: int = 512) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        self.files = _files(self.root)
        if not self.files:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"{self.root}: no image files (extensions: {exts})")
        self.image_size = image_hw(image_size)
        if channels is None:
            channels = 1 if all(self._mode(p) in GRAY_MODES for p in self.files) else 3
        self.in_channels = int(channels)
        self.num_classes = None
        self.name = f"images:{self.root}"
        first = torch.stack([self._pixels(p) for p in self.files[:stats_images]])
        self.mean = first.mean((0, 2, 3))
        self.std = first.std((0, 2, 3)).clamp_min(1e-6)

    @staticmethod
    def _mode(path: Path) -> str:
        try:
            with Image.open(path) as im:
                return im.mode
        except Exception as e:  # PIL raises many types for a broken file
            raise DataError(f"cannot decode image {path}: {e}") from e

    def _pixels(self, path: Path) -> torch.Tensor:
        """``[C, H, W]`` in [0, 1]."""
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.in_channels == 1 else "RGB")
                im = fit_image(im, self.image_size)
                a = np.asarray(im, dtype=np.float32) / 255.0
        except Exception as e:
            raise DataError(f"cannot decode image {path}: {e}") from e
        t = torch.from_numpy(a.copy())
        return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self._pixels(self.files[int(i)])
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def example_input(self, n: int = 1) -> torch.Tensor:
        """The first ``n`` images as a batch."""
        return torch.stack([self[i] for i in range(min(n, len(self)))])

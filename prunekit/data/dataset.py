"""In-memory image dataset shared by every loader, the trainer and the pruning methods.

All datasets prunekit reads fit in memory as ``uint8`` tensors (Fashion-MNIST, CIFAR, a resized
image folder), so batches are gathered by index with no per-sample Python work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError


class ImageDataset(Dataset):
    """Images ``uint8 [N, C, H, W]`` and labels ``int64 [N]`` with their normalisation.

    ``__getitem__`` returns ``(float image [C, H, W] normalised, int label)`` so the object
    also works with a plain :class:`torch.utils.data.DataLoader`; :meth:`batch` is the fast
    path the trainer uses.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, *, mean: Sequence[float],
                 std: Sequence[float], num_classes: int, name: str,
                 classes: Sequence[str] | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"{name}: images must be uint8 [N, C, H, W], got {images.dtype} "
                            f"{tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise DataError(f"{name}: {images.shape[0]} images but {targets.shape[0]} labels")
        self.images = images
        self.targets = targets.to(torch.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.num_classes = int(num_classes)
        self.name = name
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
        self._mean_t = torch.tensor(self.mean).view(1, -1, 1, 1)
        self._std_t = torch.tensor(self.std).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.images.shape[2], self.images.shape[3])

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> normalised float32."""
        x = images_u8.float().div_(255.0)
        mean, std = self._mean_t.to(x.device), self._std_t.to(x.device)
        return (x - mean) / std

    def batch(self, idx: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images ``[B, C, H, W]`` and labels ``[B]`` for the given indices."""
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return self.normalize(self.images[idx_t]), self.targets[idx_t]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch([int(i)])
        return x[0], int(y[0])

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A normalised batch of the first images, for tracing and profiling."""
        return self.batch(torch.arange(min(batch_size, len(self))))[0]

    def subset(self, n_or_indices: int | Sequence[int] | torch.Tensor) -> ImageDataset:
        """The first ``n`` samples (an ``int``) or the given indices."""
        if isinstance(n_or_indices, int):
            if n_or_indices <= 0:
                raise ConfigError(f"sample count must be positive, got {n_or_indices}")
            idx = torch.arange(min(n_or_indices, len(self)))
        else:
            idx = torch.as_tensor(n_or_indices, dtype=torch.long)
            if idx.numel() == 0:
                raise DataError(f"{self.name}: empty subset")
        return ImageDataset(self.images[idx], self.targets[idx], mean=self.mean, std=self.std,
                            num_classes=self.num_classes, name=self.name, classes=self.classes)

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, "
                f"classes={self.num_classes})")

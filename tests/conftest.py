"""Shared test settings."""

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on busy shared cores two OpenMP threads stall each other badly
    (measured up to 7x slower), and results do not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_image_folder(root: Path, sizes: dict[str, int]) -> Path:
    """A tiny grayscale image folder under ``root``: classes "dark" and "light", ``sizes[split]``
    8x8 PNGs per class and split (e.g. ``{"train": 8, "test": 2}``); returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in sizes.items():
        for label, cls in enumerate(("dark", "light")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (8, 8)) + 120 * label
                Image.fromarray(pixels.astype(np.uint8), mode="L").save(d / f"{i}.png")
    return root

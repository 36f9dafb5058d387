"""Shared test settings, data and models.

Two kinds of data only, and no silent substitutes:

* :func:`gratings` -- synthetic, LEARNABLE images (the class decides a grating's orientation and
  period; phase and noise are random), for every test that needs a task a small CNN can learn
  but not real images. A ResNet-8 learns it to 100 % in two short epochs.
* the real Fashion-MNIST files, through the ``fashion_mnist_root`` fixture, which FAILS (never
  skips) when they are missing.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on busy shared cores two OpenMP threads stall each other badly
    (measured up to 7x slower), and results do not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------- real Fashion-MNIST
def fashion_mnist_missing(root: Path = FASHION_MNIST_DIR) -> list[str]:
    """The Fashion-MNIST files (gzipped or not) missing under ``root``."""
    return [f for f in FASHION_MNIST_FILES
            if not (root / f).is_file() and not (root / f"{f}.gz").is_file()]


@pytest.fixture(scope="session")
def fashion_mnist_root() -> Path:
    """The real Fashion-MNIST directory. A test that needs the real images FAILS without it:
    a missing dataset is a broken set-up, not a reason to pass quietly."""
    missing = fashion_mnist_missing()
    if missing:
        pytest.fail(f"real Fashion-MNIST missing at {FASHION_MNIST_DIR} ({', '.join(missing)}): "
                    "run `make data` or `sudo apt-get install dataset-fashion-mnist`", pytrace=False)
    return FASHION_MNIST_DIR


# ------------------------------------------------------------------------- synthetic, learnable
def gratings(n: int, size: int = 16, num_classes: int = 10, seed: int = 0, channels: int = 1,
             noise: float = 40.0):
    """``n`` learnable ``uint8`` images as an :class:`~prunekit.data.ImageDataset`.

    Class ``k`` is a sine grating: orientation ``(k mod m) * 180 / m`` degrees with
    ``m = ceil(num_classes / 2)``, period 4 px for the first ``m`` classes and 8 px for the
    rest; each image has a random phase and Gaussian pixel noise of ``noise`` grey levels.
    Classes are balanced and shuffled; different seeds give different images of the same
    classes (use one seed for training, another for testing). Local texture decides the class,
    so convolutions and global pooling learn it fast (ResNet-8: 100 % after two epochs on
    512 images)."""
    from prunekit.data import ImageDataset

    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    m = math.ceil(num_classes / 2)
    angle = (y % m).double() * math.pi / m
    period = torch.where(y < m, 4.0, 8.0).double()
    phase = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    r = torch.arange(size, dtype=torch.float64)
    rows, cols = torch.meshgrid(r, r, indexing="ij")
    u = cols[None] * angle.cos()[:, None, None] + rows[None] * angle.sin()[:, None, None]
    wave = torch.sin(2 * math.pi * u / period[:, None, None] + phase[:, None, None])
    pixels = 128 + 60 * wave[:, None].expand(n, channels, size, size)
    pixels = pixels + noise * torch.randn(n, channels, size, size, generator=g, dtype=torch.float64)
    return ImageDataset(pixels.round().clamp(0, 255).to(torch.uint8), y, mean=(0.5,) * channels,
                        std=(0.25,) * channels, num_classes=num_classes, name="gratings")


def top1(model: nn.Module, dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent, written out here (normalisation by hand from the raw uint8
    images, eval mode, argmax) so that tests do not check prunekit's numbers against
    prunekit's own evaluation."""
    mean = torch.tensor(dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std).view(1, -1, 1, 1)
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            raw = dataset.images[start:start + batch_size]
            x = (raw.float() / 255.0 - mean) / std
            correct += int((model(x).argmax(1) == dataset.targets[start:start + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(dataset)


@pytest.fixture(scope="session")
def grating_data():
    """512 training and 500 test gratings (16x16, one channel, ten classes)."""
    return gratings(512, seed=0), gratings(500, seed=1)


@pytest.fixture(scope="session")
def _trained_resnet8(grating_data):
    from prunekit.models import create
    from prunekit.train import TrainConfig, fit

    train, _ = grating_data
    torch.manual_seed(0)
    model = create("resnet8", num_classes=10, in_channels=1)
    fit(model, train, TrainConfig(epochs=2, batch_size=32, lr=0.1, augment=False, device="cpu",
                                  eval_every=0, seed=0))
    return model.eval()


@pytest.fixture
def trained_resnet8(_trained_resnet8):
    """A fresh copy of a ResNet-8 trained on :func:`grating_data` (100 % test accuracy)."""
    return copy.deepcopy(_trained_resnet8)


# ------------------------------------------------------------------------- image folders
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


def random_images(n: int, seed: int):
    """``n`` random 1x16x16 images with random labels of 4 classes (an ImageDataset)."""
    from prunekit.data import ImageDataset

    g = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8),
                        torch.randint(0, 4, (n,), generator=g), mean=[0.5], std=[0.25],
                        num_classes=4, name="random")


def import_file(path: Path, name: str, register: bool = False):
    """The module defined by the Python file ``path`` (a factory file a test wrote), imported as
    ``name``; ``register`` puts it in ``sys.modules`` (pickling, dataclasses need it)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def run(capsys, *argv) -> tuple[int, str, str]:
    """``prunekit ARGV`` in process: (exit code, stdout, stderr)."""
    from prunekit import cli

    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, out: str, err: str, match: str | None = None) -> str:
    """Bad input: exit 2, nothing on stdout, one ``prunekit: error:`` line on stderr (containing
    ``match`` when given), no traceback; returns that line."""
    assert code == 2, (code, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("prunekit: error: ") and "Traceback" not in err
    if match is not None:
        assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]
